"""`mtbert tune SPACE.yaml --n-trials N [--timeout S]`: hyperparameter search with Optuna.

A search-space file names a base config, overrides common to every trial, what to maximise and
the parameters to search, each over any config key (techniques and schedules included):

    config: ../quick.yaml                   # base config, relative to this file
    common: [train.max_steps=40, train.eval_every=10]
    metric: overall                         # overall (the selection score) or a task name
    sampler: {name: tpe, seed: 0}           # tpe | random
    pruner: {name: median, n_startup_trials: 2}   # median | percentile | hyperband | threshold | none
    params:
      train.lr: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}
      data.batch_size: {type: int, low: 8, high: 32, step: 8}
      train.schedule: {type: categorical, choices: [interleaved, annealed]}
      techniques: {type: categorical, choices: [{}, {pcgrad: {}}]}

Every key and choice is checked (config keys, technique / schedule / weighting names and their
options) before the first trial. Each trial trains an ordinary run directory,
RUNS_DIR/NAME/trial-NNN (report, ensemble and export work on it), reporting each evaluation's dev
value to Optuna, which may prune the trial there (it then stops like early stopping, with its
summary.json). The study lives in SQLite (RUNS_DIR/NAME/study.db): run the same command again after
a kill and finished trials are kept; `--n-trials` counts finished (complete + pruned) trials of
the whole study. A trial killed mid-run is marked failed once its heartbeat is older than twice
`heartbeat_s` (default 60 s) and its parameters are tried again. The results table goes to
RESULTS_DIR/NAME.md after every trial. Optuna is an optional extra (`pip install 'mtbert[tune]'`).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path

import yaml

from mtbert.core.config import Config, load_config
from mtbert.core.errors import ConfigError
from mtbert.core.io import atomic_write_text
from mtbert.core.tasks import selection_score
from mtbert.training.trainer import Trainer
from mtbert.training.validate import validate_run

log = logging.getLogger("mtbert")

SPACE_KEYS = {"config", "description", "budget", "common", "metric", "sampler", "pruner", "params", "heartbeat_s"}
PARAM_TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}


# ---------------------------------------------------------------- the search space

def _flow(value) -> str:
    """A value as a `--set` string that reads back as the same YAML value (1e-05 stays a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text[:-3].strip() if text.endswith("...") else text


class Param:
    def __init__(self, key: str, spec: dict, where: str):
        if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
            raise ConfigError(f"{where}: params.{key} needs `type`: one of {sorted(PARAM_TYPES)}")
        kind = spec["type"]
        unknown = set(spec) - PARAM_TYPES[kind] - {"type"}
        if unknown:
            raise ConfigError(f"{where}: params.{key} ({kind}) has unknown options {sorted(unknown)}; "
                              f"known: {sorted(PARAM_TYPES[kind])}")
        self.key, self.kind, self.spec = key, kind, spec
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: params.{key} needs a non-empty list of choices")
            # Optuna stores only plain values: mappings and lists are searched by their YAML text
            self.labels = [c if c is None or isinstance(c, (bool, int, float, str)) else _flow(c) for c in choices]
            self.values = dict(zip(map(str, self.labels), choices))
        else:
            try:
                low, high = (float(spec[k]) if kind == "float" else int(spec[k]) for k in ("low", "high"))
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{where}: params.{key} needs numeric low and high") from None
            if not low < high or (spec.get("log") and low <= 0):
                raise ConfigError(f"{where}: params.{key} needs low < high (and low > 0 with log)")
            self.low, self.high = low, high

    def examples(self) -> list:
        """Values that must all make a valid config (checked before the first trial)."""
        return list(self.values.values()) if self.kind == "categorical" else [self.low, self.high]

    def suggest(self, trial):
        if self.kind == "categorical":
            return self.values[str(trial.suggest_categorical(self.key, self.labels))]
        opts = {k: self.spec[k] for k in ("log", "step") if k in self.spec}
        suggest = trial.suggest_float if self.kind == "float" else trial.suggest_int
        return suggest(self.key, self.low, self.high, **opts)


class Space:
    def __init__(self, path: str | Path, extra: list[str] = ()):
        self.path = Path(path)
        if not self.path.exists():
            raise ConfigError(f"search space file not found: {self.path}")
        try:
            spec = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{self.path}: not a readable YAML search space ({str(e).splitlines()[0]})") from None
        where = str(self.path)
        unknown = set(spec) - SPACE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(SPACE_KEYS)}")
        if "config" not in spec:
            raise ConfigError(f"{where}: needs `config`, the base config file (relative to the space file)")
        if not isinstance(spec.get("params"), dict) or not spec["params"]:
            raise ConfigError(f"{where}: needs a non-empty `params` mapping of config key -> search range")
        self.spec, self.name = spec, self.path.stem
        self.base = (self.path.parent / spec["config"]).resolve()
        self.common = [*(spec.get("common") or []), *extra]
        self.params = [Param(k, v, where) for k, v in spec["params"].items()]
        self.metric = spec.get("metric", "overall")
        self.heartbeat_s = spec.get("heartbeat_s", 60)
        if not isinstance(self.heartbeat_s, int) or self.heartbeat_s < 1:
            raise ConfigError(f"{where}: heartbeat_s must be a whole number of seconds >= 1")
        # Refuse before the first trial: every key, every choice and both ends of every range.
        base_cfg = self.config({})
        if self.metric != "overall" and self.metric not in base_cfg.data.tasks:
            raise ConfigError(f"{where}: metric must be 'overall' or one of the tasks {base_cfg.data.tasks}")
        for p in self.params:
            for value in p.examples():
                try:
                    validate_run(self.config({p.key: value}), check_data=False)
                except (ValueError, KeyError, TypeError) as e:
                    raise ConfigError(f"{where}: params.{p.key} = {value!r}: {str(e).strip(chr(34) + chr(39))}") from None

    def config(self, values: dict) -> Config:
        return load_config(self.base, self.common + [f"{k}={_flow(v)}" for k, v in values.items()])

    def value(self, dev: dict) -> float:
        return selection_score(dev) if self.metric == "overall" else dev[self.metric]


# ---------------------------------------------------------------- Optuna pieces by name

def _build(kind: str, spec: dict | None, default: str, table: dict):
    spec = dict(spec or {"name": default})
    name = spec.pop("name", default)
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; choose from {sorted(table)}")
    try:
        return table[name](**spec)
    except TypeError as e:
        raise ConfigError(f"{kind} {name}: {e}") from None


def _study(space: Space, runs_dir: Path):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    pruners = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
               "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner,
               "none": optuna.pruners.NopPruner}
    sampler = _build("sampler", space.spec.get("sampler"), "tpe", samplers)
    pruner = _build("pruner", space.spec.get("pruner"), "median", pruners)
    (runs_dir / space.name).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(f"sqlite:///{(runs_dir / space.name / 'study.db').resolve()}",
                             heartbeat_interval=space.heartbeat_s, grace_period=2 * space.heartbeat_s,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    return optuna.create_study(study_name=space.name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


# ---------------------------------------------------------------- running

def run_tune(space_path: str | Path, n_trials: int, timeout: float | None = None, runs_dir: str | Path = "runs/tune",
             results_dir: str | Path = "results/tune", extra: list[str] = ()) -> Path:
    """Run (or continue) the search until the study holds `n_trials` finished trials or `timeout`
    seconds have passed (a running trial finishes first); returns the results table's path."""
    if n_trials < 1:
        raise ConfigError("--n-trials must be at least 1")
    space = Space(space_path, list(extra))
    try:
        import optuna
    except ImportError as e:
        raise ConfigError("mtbert tune needs optuna: pip install 'mtbert[tune]'") from e
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    runs_dir, results_dir = Path(runs_dir), Path(results_dir)
    study = _study(space, runs_dir)
    table = results_dir / f"{space.name}.md"

    def objective(trial) -> float:
        values = {p.key: p.suggest(trial) for p in space.params}
        out = runs_dir / space.name / f"trial-{trial.number:03d}"
        shutil.rmtree(out, ignore_errors=True)  # a number is used once; anything there is stale
        trial.set_user_attr("run_dir", str(out))
        try:
            trainer = Trainer(space.config(values), out)
        except (ValueError, KeyError, RuntimeError) as e:  # a combination the checks could not foresee
            trial.set_user_attr("error", str(e))
            raise
        pruned = []

        def report(row):
            value = space.value(row["dev"])
            trial.report(value, row["step"])
            if trial.should_prune():
                pruned.append(row["step"])
                return f"pruned by optuna at step {row['step']} (dev {space.metric} {value:.4f})"
            return None
        trainer.eval_callbacks.append(report)
        summary = trainer.run()
        atomic_write_text(out / "trial.json", json.dumps({"study": space.name, "number": trial.number,
                                                          "params": values, "space": str(space.path)}, indent=2))
        best = max(space.value(r["dev"]) for r in trainer.history)
        trial.set_user_attr("summary", {k: summary[k] for k in ("steps", "train_seconds", "best_dev")})
        trial.set_user_attr("best", best)
        if pruned:
            raise optuna.TrialPruned(summary["stopped"])
        return best

    def write_table(study, _trial=None) -> None:
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(table, format_results(space, study.get_trials(deepcopy=False)))

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done, timeout=timeout, catch=(ValueError, KeyError, RuntimeError),
                       callbacks=[MaxTrialsCallback(n_trials, states=finished), write_table])
    write_table(study)
    return table


def format_results(space: Space, trials) -> str:
    keys = [p.key for p in space.params]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and "best" in t.user_attrs]
    best = max(finished, key=lambda t: t.user_attrs["best"], default=None)
    tasks = sorted({k for t in finished for k in t.user_attrs["summary"]["best_dev"] if k != "overall"})
    head = ["trial", "state", f"best dev {space.metric}", *keys, *tasks, "steps", "train s", "run dir"]
    lines = [f"# Search: {space.name}", "", (space.spec.get("description") or "").strip(), "",
             f"Base config `{space.spec['config']}`; common overrides: "
             f"{' '.join(f'`{o}`' for o in space.common) or 'none'}; budget: {space.spec.get('budget', 'not stated')}.",
             f"Maximising dev {space.metric}; sampler {space.spec.get('sampler') or {'name': 'tpe'}}, "
             f"pruner {space.spec.get('pruner') or {'name': 'median'}}. Pruned trials stopped at the "
             "evaluation named in their summary; their value is the best dev value they reached.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(trials, key=lambda t: t.number):
        summary = t.user_attrs.get("summary", {})
        dev = summary.get("best_dev", {})
        value = t.user_attrs.get("best")
        cells = [f"**{t.number}**" if best is not None and t.number == best.number else str(t.number),
                 t.state.name.lower() + (f" ({t.user_attrs['error'][:60]})" if "error" in t.user_attrs else ""),
                 f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "—",
                 *(_cell(t.params.get(k, "—")) for k in keys),
                 *(f"{dev[k]:.4f}" if k in dev else "—" for k in tasks),
                 str(summary.get("steps", "—")), f"{summary['train_seconds']:.0f}" if summary else "—",
                 f"`{t.user_attrs.get('run_dir', '—')}`"]
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best: trial {best.number}, dev {space.metric} {best.user_attrs['best']:.4f}, "
                      + ", ".join(f"`{k}={_cell(v)}`" for k, v in best.params.items()) + "."]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value).replace("|", "\\|")
