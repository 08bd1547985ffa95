"""Building a model from a config, and saving / loading run checkpoints atomically.

A checkpoint directory holds model.safetensors (encoder + heads), model.json (encoder config and
head options), tokenizer.json, config.yaml (the full run config) and meta.json (step, metrics);
a run's resumable state (RUN_DIR/last) adds train_state.pt (optimizer, generators, ...). It is
written to a temporary sibling and swapped in with renames, so a crash never leaves a half-written
checkpoint: at worst `best.old` (`last.old`) survives and is loaded instead. A failed write (full
disk) removes the temporary copy and leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtbert.core.config import Config, load_config
from mtbert.core.errors import CheckpointError, ConfigError
from mtbert.core.io import read_json, read_yaml, replace_dir, temporary_dir
from mtbert.core.rundir import TRAIN_STATE, RunDir
from mtbert.core.tasks import get_task, run_tasks
from mtbert.core.trust import UntrustedCodeError, reading_run
from mtbert.data.tokenizer import BertTokenizer
from mtbert.modeling.adapters import EXTENSIONS, merge_lora
from mtbert.modeling.backbones import ARCHIVES, BACKBONES
from mtbert.modeling.backbones import resolve as resolve_backbone
from mtbert.modeling.encoder import (
    BertConfig,
    BertModel,
    check_state_shapes,
    load_hf_encoder,
    load_state_checked,
)
from mtbert.modeling.model import MultitaskModel


def load_encoder(backbone: str) -> tuple[BertModel, Path]:
    """A named backbone, a Hugging Face BERT / RoBERTa / MPNet directory, or one of our
    checkpoints (its encoder weights are reused)."""
    path = resolve_backbone(backbone)
    if not path.exists():
        raise CheckpointError(f"backbone not found: {path} (give a checkpoint directory or one of the named "
                              f"backbones {', '.join(BACKBONES.names())})")
    ours = find_checkpoint(path, required=False)
    if ours is not None:
        model, _, _, _ = load_checkpoint(ours)
        if "lora_experts" in model.extensions:
            raise CheckpointError(f"{ours} holds per-task LoRA experts: it has no single encoder to start from")
        if "lora" in model.extensions:  # fold the adapters in: the new run starts from W0 + (α/r) B A
            merge_lora(model.encoder)
        return model.encoder.requires_grad_(True), ours
    try:
        return load_hf_encoder(path), path
    except CheckpointError as e:
        if backbone in ARCHIVES:  # an installed named backbone that does not load: say how to repair it
            raise CheckpointError(f"{e}; reinstall it: {ARCHIVES[backbone].install_hint} --force") from e
        raise


def build_model(cfg: Config) -> tuple[MultitaskModel, BertTokenizer]:
    tasks = [get_task(t) for t in cfg.data.tasks]
    backbone_dir = resolve_backbone(cfg.model.backbone)
    if cfg.model.tiny is not None:  # random init (tests, benchmarks); tokenizer from the backbone dir
        encoder = BertModel(BertConfig.from_dict(cfg.model.tiny))
        tok_dir = backbone_dir
    else:
        encoder, tok_dir = load_encoder(cfg.model.backbone)
    tokenizer = BertTokenizer.from_dir(tok_dir, max_length=cfg.model.max_length, style=encoder.family.pair_style)
    if cfg.model.max_length > encoder.config.max_tokens:
        raise ConfigError(f"model.max_length {cfg.model.max_length} exceeds the encoder's "
                         f"{encoder.config.max_tokens} positions")
    model = MultitaskModel(encoder, tasks, cfg.model.pair_encoding, cfg.model.bi_head,
                           cfg.model.pooling, cfg.model.dropout, cfg.model.shared_pair_layer)
    return model, tokenizer


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))


def save_checkpoint(directory: str | Path, model: MultitaskModel, tokenizer: BertTokenizer, cfg: Config,
                    meta: dict, extra_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint into `directory`, replacing any previous one atomically."""
    directory = Path(directory)
    tmp = temporary_dir(directory)
    try:
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            if v.data_ptr() not in seen:  # tied parameters are stored once (safetensors requires it)
                seen.add(v.data_ptr())
                state[k] = v.detach().contiguous().cpu()
        save_file(state, str(tmp / "model.safetensors"))
        _write_json(tmp / "model.json", {"encoder": model.encoder.config.to_dict(),
                                         "tasks": list(model.tasks), "pair_encoding": model.pair_encoding,
                                         "bi_head": model.bi_head, "pooling": model.pooling,
                                         "shared_pair_layer": model.shared_pair_layer,
                                         "dropout": cfg.model.dropout, "extensions": model.extensions})
        tokenizer.save(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _write_json(tmp / "meta.json", meta)
        if extra_state:
            torch.save(extra_state, tmp / TRAIN_STATE)
        replace_dir(tmp, directory, old=directory.with_name(directory.name + ".old"))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # full disk, lost permissions: say which checkpoint, and that none is lost
            err = OSError(f"could not save checkpoint {directory} ({e}); the previous {directory.name}/ is kept")
            err.errno = e.errno
            raise err from e
        raise
    return directory


def find_checkpoint(path: str | Path, required: bool = True) -> Path | None:
    """A checkpoint dir itself, or a run dir's best/ (falling back to best.old after a crash)."""
    path = Path(path)
    for cand in (path, *RunDir(path).checkpoints()):
        if (cand / "model.json").exists() and (cand / "model.safetensors").exists():
            return cand
    if required:
        raise CheckpointError(f"no mtbert checkpoint in {path} (expected model.json + model.safetensors, "
                              f"or a run directory with best/)")
    return None


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """-> (model, tokenizer, config, meta) with heads and options restored."""
    ckpt = find_checkpoint(path)
    # a checkpoint is data: nothing it names is imported (core.trust); the tasks it declares are
    # its own (the model keeps their specs), not registered for the rest of the process
    with reading_run(ckpt), run_tasks():
        return _load_checkpoint(ckpt, device)


def _load_checkpoint(ckpt: Path, device: str):
    spec = _model_spec(ckpt)
    try:
        cfg = load_config(None, base=read_yaml(ckpt / "config.yaml", dict))
    except UntrustedCodeError:
        raise
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}/config.yaml: {e}") from e
    meta = read_json(ckpt / "meta.json", dict) if (ckpt / "meta.json").exists() else {}
    try:  # model.json without model_type (written before RoBERTa and MPNet): BERT
        encoder_config = BertConfig.from_dict(spec["encoder"])
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt}/model.json: {e}") from e
    if cfg.model.max_length > encoder_config.max_tokens:
        raise CheckpointError(f"{ckpt}: model.max_length {cfg.model.max_length} exceeds the encoder's "
                              f"{encoder_config.max_tokens} positions")
    tasks = [get_task(t) for t in spec["tasks"]]
    with torch.device("meta"):  # the shapes model.json implies, against the file's, before allocating
        check_state_shapes(_model_of(spec, encoder_config, tasks, ckpt), _safetensors_shapes(ckpt),
                           f"{ckpt}/model.safetensors")
    model = _model_of(spec, encoder_config, tasks, ckpt)
    try:
        state = load_file(str(ckpt / "model.safetensors"), device=device)
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {ckpt}: {e}") from e
    load_state_checked(model, state, str(ckpt))
    tokenizer = BertTokenizer.from_dir(ckpt, max_length=cfg.model.max_length, style=model.encoder.family.pair_style)
    check_vocab(tokenizer, model.encoder, ckpt)
    return model.to(device).eval(), tokenizer, cfg, meta


# model.json: key -> (type, required)
MODEL_SPEC = {"encoder": (dict, True), "tasks": (list, True), "pair_encoding": (dict, True), "bi_head": (str, True),
              "pooling": (str, True), "dropout": ((int, float), True), "shared_pair_layer": (int, False),
              "extensions": (dict, False)}


def _model_spec(ckpt: Path) -> dict:
    """model.json, checked against MODEL_SPEC: one CheckpointError naming the file and the key."""
    spec = read_json(ckpt / "model.json", dict)
    for key, (kind, required) in MODEL_SPEC.items():
        if key not in spec:
            if required:
                raise CheckpointError(f"{ckpt}/model.json lacks {key!r}")
        elif not isinstance(spec[key], kind) or isinstance(spec[key], bool):
            raise CheckpointError(f"{ckpt}/model.json: {key} must be {getattr(kind, '__name__', 'a number')}, "
                                  f"got {spec[key]!r}")
    if not all(isinstance(t, str) for t in spec["tasks"]):  # (a pre-training stage has none)
        raise CheckpointError(f"{ckpt}/model.json: tasks must be a list of task names, got {spec['tasks']!r}")
    if not 0 <= spec["dropout"] < 1 or spec.get("shared_pair_layer", 0) not in range(0, 1 << 16):
        raise CheckpointError(f"{ckpt}/model.json: dropout or shared_pair_layer out of range")
    return spec


def _safetensors_shapes(ckpt: Path) -> dict[str, tuple]:
    """Tensor name -> shape, read from the safetensors header alone."""
    try:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {ckpt}: {e}") from e


def _model_of(spec: dict, encoder_config: BertConfig, tasks, ckpt: Path) -> MultitaskModel:
    """The model model.json describes, heads and extensions included (weights: random)."""
    try:
        model = MultitaskModel(BertModel(encoder_config), tasks, spec["pair_encoding"], spec["bi_head"],
                               spec["pooling"], spec["dropout"], spec.get("shared_pair_layer", 0))
    except UntrustedCodeError:
        raise
    except (ConfigError, TypeError, KeyError, AttributeError) as e:  # well-typed, naming parts that do not fit
        raise CheckpointError(f"{ckpt}/model.json does not describe a model: {e}") from e
    for name, ext in spec.get("extensions", {}).items():
        if name not in EXTENSIONS:
            raise CheckpointError(f"{ckpt} was trained with technique {name!r}, unknown to this mtbert")
        try:
            EXTENSIONS[name](model, ext)
        except (ConfigError, TypeError, KeyError) as e:
            raise CheckpointError(f"{ckpt}/model.json: extension {name}: {e}") from e
        model.extensions[name] = ext
    check_token_types(model, ckpt)
    return model


def check_token_types(model: MultitaskModel, ckpt: Path) -> None:
    """A BERT-style pair gives its second text token type 1: the encoder needs two type embeddings."""
    config = model.encoder.config
    if model.encoder.family.pair_style == "bert" and model.encoder.family.token_types and \
            any(spec.is_pair and model.pair_encoding[t] != "bi" for t, spec in model.tasks.items()) and \
            config.type_vocab_size < 2:
        raise CheckpointError(f"{ckpt}/model.json: type_vocab_size {config.type_vocab_size} cannot embed the "
                              f"second text of a pair (token type 1)")


def check_vocab(tokenizer: BertTokenizer, encoder: BertModel, where: Path) -> None:
    """A tokenizer whose ids run past the encoder's embeddings would fail on the first text that uses them."""
    size, rows = max(tokenizer.tok.get_vocab(with_added_tokens=True).values()) + 1, encoder.config.vocab_size
    if size > rows:
        raise CheckpointError(f"tokenizer in {where} has token ids up to {size - 1} but the encoder embeds only "
                              f"{rows}: they do not belong together")
