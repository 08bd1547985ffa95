"""Tasks as data: what each task reads, how it is labelled and scored, and what it writes.

A task is a definition (YAML; see docs/custom-tasks.md): its files or dataset per split, their
format and columns, its text column(s), its label column and output kind, its metrics. The
built-in CS224N tasks are such definitions too (builtin_tasks.yaml); users declare theirs under
`tasks:` in a config. Definitions are checked when they are read, so a bad one is one clear error
before any model loads. The output kind (core.kinds) carries the loss and prediction rule; the
metrics come from core.metrics; the overall score that picks the best checkpoint is a pluggable
scorer (OVERALL_SCORES).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from mtbert.core.errors import ConfigError, DataError, RegistryError, UnknownTaskError
from mtbert.core.io import lies_under, text_encoding
from mtbert.core.kinds import OUTPUT_KINDS, OutputKind
from mtbert.core.metrics import METRICS, accuracy, pearson, rescaled  # noqa: F401  (accuracy, pearson: re-exported)
from mtbert.core.registry import Registry
from mtbert.core.trust import run_data_confined

FORMATS = {"csv": ",", "tsv": "\t", "jsonl": None}
PAIR_ENCODINGS = ("cross", "bi", "cross+cos")
DEFINITION_KEYS = {"files", "dataset", "format", "delimiter", "encoding", "header", "id_column", "text", "pair_encoding",
                   "label", "metrics", "main_metric", "leaderboard", "cs224n_output", "variant_of", "description",
                   "route"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]        # one column: single sentence; two: sentence pair
    label_column: str | None
    kind: OutputKind
    num_labels: int                      # classes (classification, binary, bins) or 1 (regression)
    metrics: tuple[str, ...]             # metric names; metrics[0] is the main metric
    files: dict = field(default_factory=dict, compare=False)  # split -> path (may hold "{data_dir}")
    dataset: dict | None = field(default=None, compare=False)  # Hugging Face datasets source instead
    format: str = "tsv"                  # csv | tsv | jsonl
    delimiter: str | None = None         # None: the format's
    encoding: str = "utf-8"              # the files' text encoding
    columns: tuple[str, ...] | None = None  # header names of files without a header row
    id_column: str | None = "id"         # None: ids are row numbers
    label_range: tuple[float, float] | None = None  # regression / binned: valid gold values
    label_names: tuple[str, ...] | None = None      # classification / binary: names in class order
    pair_encoding: str | None = None     # this task's default (model.pair_encoding overrides)
    variant_of: str | None = None        # same data, other head: counts as that task in the overall score
    leaderboard: str | None = None       # leaderboard group (the CS224N score)
    cs224n_output: dict | None = None    # {prefix, header}: `mtbert predict RUN --out DIR` files
    route: str | None = None             # a named route alias of `mtbert serve` (/v1/<route>) that answers it
    builtin: bool = False
    confined: bool = False               # a loaded run's task: its files are read only under the data directory
    definition: dict = field(default_factory=dict, compare=False)  # as declared (saved with runs)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def description(self) -> str:
        """The definition's `description:` ("Title: what it is"), '' if none."""
        return str(self.definition.get("description") or "")


    def path(self, split: str, data_dir: str | Path) -> Path:
        if split not in self.files:
            raise ConfigError(f"task {self.name} declares no {split!r} file (it has {sorted(self.files)})")
        path = Path(str(self.files[split]).replace("{data_dir}", str(data_dir)))
        if self.confined and not lies_under(path, data_dir):
            raise DataError(f"task {self.name}: its {split} file {path} lies outside the data directory {data_dir}; "
                            f"a loaded run's tasks read only under the data directory you give (--data-dir, MTBERT_DATA)")
        return path

    def has_split(self, split: str) -> bool:
        if self.dataset is not None:
            return split in (self.dataset.get("splits") or {"train": 1, "dev": 1, "test": 1})
        return split in self.files

    def file(self, split: str) -> str:
        """The file name of a split (for messages and data check)."""
        return Path(str(self.files.get(split, "")).replace("{data_dir}/", "")).name

    def parse_label(self, raw) -> int | float:
        """A raw label (string from CSV/TSV, or a JSON value) -> class index or score; ValueError
        if it is not a valid label of this task."""
        if isinstance(raw, bool):
            raw = int(raw)
        text = str(raw).strip()
        if self.kind.scores:
            value = float(text)
            lo, hi = self.label_range if self.label_range else (-math.inf, math.inf)
            if not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"label {text!r} outside [{lo}, {hi}]")
            return value
        if self.label_names and text in self.label_names:
            return self.label_names.index(text)
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"label {text!r} is not one of {list(self.label_names or [])}") from None
        if not math.isfinite(value) or value != int(value) or not 0 <= value < self.num_labels:
            raise ValueError(f"label {text!r} is not a class index in [0, {self.num_labels - 1}]")
        return int(value)

    def label_name(self, index: int) -> str:
        return self.label_names[index] if self.label_names else str(index)

    def metric(self, pred, gold) -> float:
        """The main metric."""
        return METRICS.get(self.main_metric)(pred, gold)

    def all_metrics(self, pred, gold) -> dict[str, float]:
        return {m: METRICS.get(m)(pred, gold) for m in self.metrics}


# ---------------------------------------------------------------- reading definitions

OUTPUT_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a prediction file's prefix, a header field

def task_from_definition(name: str, d: dict, base_dir: Path | None = None, builtin: bool = False) -> TaskSpec:
    """Check a YAML definition and build its TaskSpec; every problem is one ConfigError naming
    the task and the key. Relative file paths are taken from `base_dir` (the declaring file's folder)."""
    where = f"task {name!r}"

    def fail(msg: str):
        raise ConfigError(f"{where}: {msg}")

    if not isinstance(d, dict):
        fail(f"the definition must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - DEFINITION_KEYS)
    if unknown:
        fail(f"unknown key(s) {unknown}; known: {sorted(DEFINITION_KEYS)}")
    files, dataset = d.get("files"), d.get("dataset")
    if (files is None) == (dataset is None):
        fail("declare either `files` (per split) or `dataset` (Hugging Face datasets)")
    if files is not None:
        if not isinstance(files, dict) or not files or not set(files) <= {"train", "dev", "test"}:
            fail("files must map some of train / dev / test to a path")
        files = {s: _resolve(str(p), base_dir) for s, p in files.items()}
    if dataset is not None and (not isinstance(dataset, dict) or not ({"path", "name"} & set(dataset))):
        fail("dataset must be a mapping with `path` (a saved dataset) or `name` (a hub dataset), and `splits`")
    fmt = d.get("format") or _format_of(files, dataset)
    if not isinstance(fmt, str) or fmt not in FORMATS:
        fail(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    header = d.get("header", True)
    if not (header is True or (isinstance(header, list) and header and all(isinstance(h, str) for h in header))):
        fail("header must be true (the first row names the columns) or the list of column names")
    text = d.get("text")
    text_columns = (text,) if isinstance(text, str) else tuple(text or ())
    if not 1 <= len(text_columns) <= 2 or not all(isinstance(c, str) and c for c in text_columns):
        fail("text must be one column name (a sentence) or a list of two (a pair)")
    pair_encoding = d.get("pair_encoding")
    if pair_encoding is not None and (pair_encoding not in PAIR_ENCODINGS or len(text_columns) == 1):
        fail(f"pair_encoding is for pair tasks, one of {PAIR_ENCODINGS}")
    label = d.get("label")
    if not isinstance(label, dict) or "column" not in label or "kind" not in label:
        fail("label must be a mapping with `column` and `kind`")
    kind_name, names, rng = label["kind"], label.get("names"), label.get("range")
    if not isinstance(kind_name, str) or kind_name not in OUTPUT_KINDS:
        fail(f"label.kind must be one of {list(OUTPUT_KINDS)}, got {kind_name!r}")
    bad = sorted(set(label) - OUTPUT_KINDS[kind_name].label_keys)
    if bad:
        fail(f"label: unknown key(s) {bad} for a {kind_name} label")
    if names is not None:
        if not isinstance(names, list):
            fail("label.names must be a list of class names")
        names = tuple(str(n) for n in names)
        if len(set(names)) != len(names) or len(names) < 2:
            fail("label.names must be at least two distinct names, in class order")
    if rng is not None:
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng)
                and rng[0] < rng[1]):
            fail("label.range must be [low, high] with low < high")
        rng = (float(rng[0]), float(rng[1]))
    kind, num_labels = OUTPUT_KINDS[kind_name].from_label(label, names, rng, fail)
    if kind.scores and names is not None:
        fail(f"a {kind_name} label has a range, not names")
    metrics = d.get("metrics") or (["pearson"] if kind.scores else ["accuracy"])
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        fail("metrics must be a list of metric names")
    for m in metrics:
        if m not in METRICS:
            fail(f"unknown metric {m!r}; choose from {sorted(METRICS)}")
        if METRICS.get(m).for_scores != kind.scores:
            fail(f"metric {m!r} does not apply to a {kind_name} task "
                 f"({'score' if kind.scores else 'class'} metrics: "
                 f"{sorted(n for n, f in METRICS.items() if f.for_scores == kind.scores)})")
    if "f1" in metrics and num_labels != 2:
        fail("metric 'f1' is the positive class's F1, for two-class tasks; use macro_f1")
    if not isinstance(label["column"], str) or not label["column"]:
        fail("label.column must be a column name")
    if label["column"] in text_columns:
        fail(f"the label column {label['column']!r} is also a text column")
    delimiter = d.get("delimiter")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
        fail("delimiter must be one character")
    encoding = d.get("encoding", "utf-8")
    try:
        text_encoding(encoding)
    except ValueError as e:
        fail(f"encoding: {e}")
    main = d.get("main_metric", metrics[0])
    if main not in metrics:
        fail(f"main_metric {main!r} is not among its metrics {metrics}")
    metrics = [main] + [m for m in metrics if m != main]
    out = d.get("cs224n_output")
    if out is not None and (not isinstance(out, dict) or set(out) != {"prefix", "header"}):
        fail("cs224n_output must be {prefix: ..., header: ...}")
    if out is not None and not all(isinstance(out[k], str) and OUTPUT_WORD.fullmatch(out[k]) for k in out):
        # (a run's task definition must not name a path outside --out, nor write lines of its own)
        fail("cs224n_output's prefix and header must be words of letters, digits, '_' or '-' (at most 64)")
    route = d.get("route")
    if route is not None and not (isinstance(route, str) and OUTPUT_WORD.fullmatch(route)):
        fail("route must be a word of letters, digits, '_' or '-' (a server route alias, e.g. sentiment)")
    return TaskSpec(name=name, text_columns=text_columns, label_column=str(label["column"]), kind=kind,
                    num_labels=num_labels, metrics=tuple(metrics), files=files or {}, dataset=dataset,
                    format=fmt, delimiter=d.get("delimiter"), encoding=encoding, columns=tuple(header) if isinstance(header, list) else None,
                    id_column=d.get("id_column", "id" if builtin else None), label_range=rng, label_names=names,
                    pair_encoding=pair_encoding, variant_of=d.get("variant_of"), leaderboard=d.get("leaderboard"),
                    cs224n_output=out, route=route, builtin=builtin, confined=run_data_confined() and not builtin,
                    definition=_portable(d, files))


def _resolve(path: str, base_dir: Path | None) -> str:
    if path.startswith("{data_dir}") or base_dir is None or Path(path).is_absolute():
        return path
    return str((base_dir / path).resolve())


def _portable(d: dict, files: dict | None) -> dict:
    """The definition with resolved paths, as a run saves it in its config.yaml."""
    return {**d, "files": files} if files is not None else dict(d)


SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "tsv": (".tsv", ".tab"), "csv": (".csv",)}


def format_of_path(path: str | Path, default: str | None = "csv") -> str | None:
    """A data file's format from its suffix (`default` for any other suffix)."""
    suffix = Path(path).suffix.lower()
    return next((fmt for fmt, ends in SUFFIXES.items() if suffix in ends), default)


def _format_of(files: dict | None, dataset: dict | None) -> str:
    if dataset is not None:
        return "jsonl"  # rows arrive as mappings, like JSON Lines
    formats = {format_of_path(p, None) for p in files.values()}
    return formats.pop() if len(formats) == 1 and None not in formats else "csv"


# ---------------------------------------------------------------- the registry

TASKS: Registry[TaskSpec] = Registry("task")


# While a run is loaded for inference, the tasks its config declares go into this overlay instead
# of TASKS: the loaded model keeps its own TaskSpecs, and two runs that define one task name
# differently can live in one process (inference asks the model, never get_task, after loading).
_RUN_TASKS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mtbert_run_tasks", default=None)


@contextlib.contextmanager
def run_tasks():
    """Within this block, tasks registered (a loaded run's config) are visible only within it."""
    token = _RUN_TASKS.set({})
    try:
        yield
    finally:
        _RUN_TASKS.reset(token)


@contextlib.contextmanager
def using_tasks(specs):
    """Within this block, get_task answers with these TaskSpecs first (a loaded model's own tasks)."""
    token = _RUN_TASKS.set({**(_RUN_TASKS.get() or {}), **{spec.name: spec for spec in specs}})
    try:
        yield
    finally:
        _RUN_TASKS.reset(token)


def task_known(name) -> bool:
    return isinstance(name, str) and (name in (_RUN_TASKS.get() or {}) or name in TASKS)


def get_task(name: str) -> TaskSpec:
    overlay = _RUN_TASKS.get()
    if overlay is not None and name in overlay:
        return overlay[name]
    try:
        return TASKS.get(name)
    except RegistryError as e:
        raise UnknownTaskError(str(e)) from None


def register_tasks(definitions: dict, base_dir: Path | None = None) -> list[TaskSpec]:
    """Register a config's `tasks:` block (name -> definition). A user task may not reuse a
    built-in name; declaring a task again (another config in the same process) replaces it."""
    if not isinstance(definitions, dict):
        raise ConfigError(f"tasks must be a mapping of task name -> definition, got {type(definitions).__name__}")
    specs = []
    for name, d in definitions.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"task name {name!r} must be a word (letters, digits, _)")
        if name in TASKS and TASKS.get(name).builtin:
            raise ConfigError(f"task {name!r} is built in; give your task another name")
        specs.append(task_from_definition(name, d, base_dir))
    overlay = _RUN_TASKS.get()
    for spec in specs:
        if overlay is not None:
            overlay[spec.name] = spec
        else:
            TASKS.replace(spec.name, spec)
    for spec in specs:
        if spec.variant_of is not None and spec.variant_of not in TASKS and spec.variant_of not in (overlay or {}):
            raise ConfigError(f"task {spec.name!r}: variant_of names unknown task {spec.variant_of!r}")
    return specs


def _register_builtins() -> None:
    path = Path(__file__).with_name("builtin_tasks.yaml")
    for name, d in yaml.safe_load(path.read_text()).items():
        TASKS.register(task_from_definition(name, d, builtin=True), name=name)


_register_builtins()


# ---------------------------------------------------------------- the overall score

def leaderboard_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics keyed by leaderboard task: a task variant (e.g. sts_bins) counts as its base task."""
    return {(get_task(k).variant_of if task_known(k) and get_task(k).variant_of else k): v for k, v in metrics.items()}


class Leaderboard:
    """The mean of the group's tasks' main metrics on [0, 1] (core.metrics.rescaled), defined when
    every task of the group (or its variant) was scored. For `cs224n`: (SST acc + QQP acc +
    (STS r + 1) / 2) / 3."""

    def __init__(self, group: str = "cs224n"):
        self.group = group

    def __call__(self, metrics: dict[str, float]) -> float | None:
        members = [t for t in TASKS.values() if t.leaderboard == self.group and t.variant_of is None]
        m = leaderboard_metrics(metrics)
        if not members or any(t.name not in m for t in members):
            return None
        return sum(rescaled(t.main_metric, m[t.name]) for t in members) / len(members)


class WeightedMean:
    """Σ_t w_t · main metric_t / Σ_t w_t over the scored tasks (weights default to 1)."""

    def __init__(self, weights: dict | None = None):
        self.weights = {k: float(v) for k, v in (weights or {}).items()}
        if any(w < 0 for w in self.weights.values()) or (self.weights and sum(self.weights.values()) == 0):
            raise ConfigError("data.overall_weights must be non-negative and not all zero")

    def __call__(self, metrics: dict[str, float]) -> float | None:
        tasks = [t for t in metrics if "/" not in t and t != "overall"]
        unknown = sorted(set(self.weights) - set(tasks))
        if unknown:
            raise ConfigError(f"data.overall_weights names tasks that were not scored: {unknown}")
        total = sum(self.weights.get(t, 1.0) for t in tasks)
        return sum(self.weights.get(t, 1.0) * metrics[t] for t in tasks) / total if tasks and total else None


class Auto(Leaderboard):
    """The CS224N leaderboard score where its three tasks are scored; otherwise none (the best
    checkpoint is then picked by the mean main metric)."""


OVERALL_SCORES: Registry[Callable] = Registry("overall score")
OVERALL_SCORES.register(Auto, name="auto")
OVERALL_SCORES.register(Leaderboard, name="leaderboard")
OVERALL_SCORES.register(WeightedMean, name="mean")


def overall_scorer(name: str = "auto", weights: dict | None = None) -> Callable[[dict], float | None]:
    return OVERALL_SCORES.build(name, weights=weights) if name == "mean" else OVERALL_SCORES.build(name)


def overall_score(metrics: dict[str, float]) -> float:
    """(SST acc + QQP acc + (STS r + 1) / 2) / 3, the CS224N leaderboard score."""
    score = Leaderboard("cs224n")(metrics)
    if score is None:
        raise ConfigError("the leaderboard score needs sst, qqp and sts")
    return score


def with_overall(metrics: dict[str, float], scorer: Callable[[dict], float | None] | None = None) -> dict[str, float]:
    """`metrics` plus "overall" where the scorer (default: auto) defines one."""
    score = (scorer or Auto())(metrics)
    if score is not None:
        metrics["overall"] = score
    return metrics


def selection_score(metrics: dict) -> float:
    """What picks the best checkpoint: "overall" where defined, else the mean main metric."""
    main = [v for k, v in metrics.items() if "/" not in k]
    return metrics.get("overall", sum(main) / max(len(main), 1))
