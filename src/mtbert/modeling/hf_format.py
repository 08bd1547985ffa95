"""Our encoder in the Hugging Face format, and the task heads saved beside it.

`save_hf_encoder` writes a directory that `transformers.AutoModel.from_pretrained` and
`AutoTokenizer.from_pretrained` load as a `BertModel` / BERT tokenizer: config.json,
model.safetensors (Hugging Face parameter names; our fused QKV split back into query, key and
value), tokenizer.json, vocab.txt and the tokenizer config. `save_heads` adds everything else of
the multitask model (pooler, task heads, a shared pair layer) as HEADS_FILE with its options in
HEADS_SPEC; `load_hf_export` rebuilds the full MultitaskModel from such a directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtbert.core.errors import CheckpointError
from mtbert.core.io import read_json
from mtbert.core.tasks import TaskSpec, get_task, task_from_definition
from mtbert.core.trust import reading_run
from mtbert.data.tokenizer import BertTokenizer
from mtbert.modeling.encoder import BertModel, load_hf_encoder, load_state_checked
from mtbert.modeling.model import MultitaskModel

HEADS_FILE = "mtbert_heads.safetensors"
HEADS_SPEC = "mtbert_heads.json"

# our parameter name -> Hugging Face BertModel's, per layer ({i}) or global
_GLOBAL = {
    "embeddings.word.weight": "embeddings.word_embeddings.weight",
    "embeddings.position.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    "pooler.weight": "pooler.dense.weight",
    "pooler.bias": "pooler.dense.bias",
}
_LAYER = {
    "attention.out": "attention.output.dense",
    "attention.norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn.norm": "output.LayerNorm",
}


def to_hf_state_dict(encoder: BertModel) -> dict[str, torch.Tensor]:
    """Our encoder's weights under Hugging Face BertModel names (the inverse of
    encoder.convert_hf_state_dict). LoRA adapters must be merged first."""
    sd = {k: v.detach().float().contiguous().cpu() for k, v in encoder.state_dict().items()}
    if any("lora_" in k for k in sd):
        raise CheckpointError("the encoder still holds LoRA adapters: merge them first (modeling.adapters.merge_lora)")
    out = {hf: sd[ours] for ours, hf in _GLOBAL.items()}
    for i in range(encoder.config.num_hidden_layers):
        me, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for ours, theirs in _LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{hf}{theirs}.{kind}"] = sd[f"{me}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{me}attention.qkv.{kind}"].chunk(3, dim=0)
            for name, t in (("query", q), ("key", k), ("value", v)):
                out[f"{hf}attention.self.{name}.{kind}"] = t.contiguous()
    return out


def hf_config(encoder: BertModel) -> dict:
    """config.json of a Hugging Face BertModel with our encoder's architecture."""
    c = encoder.config
    return {"architectures": ["BertModel"], "model_type": "bert", **c.to_dict(),
            "position_embedding_type": "absolute", "torch_dtype": "float32"}


def save_hf_tokenizer(directory: Path, tokenizer: BertTokenizer) -> None:
    """tokenizer.json plus the files AutoTokenizer needs to treat it as a BERT tokenizer."""
    tokenizer.save(directory)
    vocab = tokenizer.tok.get_vocab()
    (directory / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    specials = {k: v for k, v in specials.items() if v in vocab}
    normalizer = json.loads(tokenizer.tok.to_str()).get("normalizer") or {}
    lower = bool(normalizer.get("lowercase", True))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": lower, "model_max_length": tokenizer.max_length,
         "clean_up_tokenization_spaces": False, **specials}, indent=2))


def save_hf_encoder(directory: str | Path, encoder: BertModel, tokenizer: BertTokenizer) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(encoder), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(encoder), indent=2))
    save_hf_tokenizer(directory, tokenizer)


def save_heads(directory: str | Path, model: MultitaskModel, dropout: float, max_length: int) -> None:
    """Every non-encoder parameter (pooler, heads, shared pair layer) and the options that rebuild them."""
    directory = Path(directory)
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if not k.startswith("encoder.") and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.detach().float().contiguous().cpu()
    save_file(state, str(directory / HEADS_FILE))
    tasks = {}
    for name, t in model.tasks.items():
        tasks[name] = {"kind": repr(t.kind), "num_labels": t.num_labels, "labels": list(t.label_names or []),
                       "label_range": list(t.label_range) if t.label_range else None, "metric": t.main_metric,
                       "pair_encoding": model.pair_encoding[name],
                       # the full definition, so a task that is not built in loads without its config
                       **({} if t.builtin else {"definition": t.definition})}
    spec = {"format": 1, "tasks": tasks, "pair_encoding": model.pair_encoding, "pooling": model.pooling,
            "bi_head": model.bi_head, "shared_pair_layer": model.shared_pair_layer, "dropout": dropout,
            "max_length": max_length}
    (directory / HEADS_SPEC).write_text(json.dumps(spec, indent=2))


def load_hf_export(directory: str | Path, device: str = "cpu") -> tuple[MultitaskModel, BertTokenizer]:
    """The full multitask model from a `mtbert export --format hf` directory: the encoder from the
    Hugging Face files, the pooler and task heads from HEADS_FILE. Returns (model, tokenizer)."""
    directory = Path(directory)
    if not (directory / HEADS_SPEC).exists():
        raise CheckpointError(f"{directory} has no {HEADS_SPEC}: not an mtbert Hugging Face export")
    with reading_run(directory):  # an export is data: nothing it names is imported (core.trust)
        return _load_hf_export(directory, device)


def _export_task(name: str, record) -> TaskSpec:
    """A task of an export: its stored definition (user tasks; exports written before they stored
    one need the task registered) or the built-in task of that name."""
    if isinstance(record, dict) and isinstance(record.get("definition"), dict):
        return task_from_definition(name, record["definition"])
    return get_task(name)


def _load_hf_export(directory: Path, device: str) -> tuple[MultitaskModel, BertTokenizer]:
    spec = read_json(directory / HEADS_SPEC)
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), dict):
        raise CheckpointError(f"{directory / HEADS_SPEC}: not an mtbert heads record (no `tasks` mapping)")
    encoder = load_hf_encoder(directory)
    try:
        model = MultitaskModel(encoder, [_export_task(t, r) for t, r in spec["tasks"].items()], spec["pair_encoding"],
                               spec["bi_head"], spec["pooling"], spec["dropout"], spec["shared_pair_layer"])
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory / HEADS_SPEC} does not describe a model: {e}") from e
    heads = load_file(str(directory / HEADS_FILE))
    full = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **heads}
    load_state_checked(model, full, str(directory))
    tokenizer = BertTokenizer.from_dir(directory, max_length=spec["max_length"])
    return model.to(device).eval(), tokenizer
