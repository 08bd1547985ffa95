"""The resumable training state in RUN_DIR/last: finding it, saving it, loading it.

At each evaluation (and every `train.save_every` steps) a run saves everything besides the
code that the rest of the run depends on: the weights, optimizer, LR schedule and loss scaler,
learned loss weights, technique state, the data generator and each task's remaining batches, the
global random generators of every rank, counters, the best score and the metrics history. On CPU
a resumed run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from mtbert.core.config import Config, load_config
from mtbert.core.errors import CheckpointError, ConfigError
from mtbert.core.io import read_yaml
from mtbert.core.rundir import CONFIG, SUMMARY, TRAIN_STATE, RunDir
from mtbert.core.runtime import rng_state, set_rng_state
from mtbert.modeling.checkpoint import save_checkpoint
from mtbert.modeling.encoder import load_state_checked

FORMAT = 1
COUNTERS = ("step", "epoch", "best_score", "last_recorded_step", "examples_seen", "loss_sums", "loss_counts")


@dataclass
class TrainState:
    """How far a run has come: what `--resume` restores besides the weights, the optimizer and
    the generators. The trainer holds one (`trainer.progress`) and reads its fields as attributes."""
    step: int = 0                         # optimizer steps taken
    epoch: int = 0
    best_score: float = -math.inf         # selection score of best/
    best_metrics: dict = field(default_factory=dict)
    last_recorded_step: int | None = None  # the step of the last evaluation
    examples_seen: int = 0
    loss_sums: dict = field(default_factory=dict)    # training losses since the last evaluation, per task
    loss_counts: dict = field(default_factory=dict)
    history: list = field(default_factory=list)      # one metrics row per evaluation
    elapsed: float = 0.0                  # training seconds before this process (a resumed run)
    plans: list = field(default_factory=list)        # each epoch's steps (tasks), as a time budget may fit them
    total_steps: int = 0                  # the planned steps
    sampling_positions: list = field(default_factory=list)  # each epoch's share of the schedule (annealing)


def capture(trainer) -> dict:
    """Everything besides the model weights that the rest of the run depends on. Collective
    under torchrun (the ranks' generators are gathered), so every rank calls it."""
    progress: TrainState = trainer.progress
    return {"format": FORMAT, **{k: getattr(progress, k) for k in COUNTERS},
            "elapsed_s": time.time() - trainer.t0,
            # as JSON: metric values of any float type, and weights_only loading accepts it
            "log": json.dumps({"history": progress.history, "best_metrics": progress.best_metrics}),
            # the plan, as a time budget may have fitted it (the LR factor is in the scheduler's state)
            "plan": json.dumps({"plans": progress.plans, "planned_steps": progress.total_steps,
                                "sampling_positions": progress.sampling_positions}),
            **trainer.updater.state_dict(), "weighting": trainer.weighting.state_dict(),
            "data_rng": trainer.rng.getstate(), "streams": {t: s.state_dict() for t, s in trainer.streams.items()},
            "techniques": {tech.name: tech.state_dict() for tech in trainer.techniques},
            "early_stopping": trainer.early_stopping.state_dict() if trainer.early_stopping else {},
            "rng": trainer.dist.gather_objects(rng_state())}  # per rank: each draws its own dropout masks


def save(trainer) -> None:
    state = capture(trainer)
    if trainer.dist.main:
        save_checkpoint(RunDir(trainer.out).last, trainer.model, trainer.tokenizer, trainer.cfg,
                        {"step": trainer.step, "epoch": trainer.epoch, "resumable": True}, extra_state=state)


def restore(trainer, directory: Path) -> None:
    """Load RUN_DIR/last into a freshly built trainer (same config, so same structure)."""
    try:
        state = torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        # (not torch's own text: it advises weights_only=False, which would run the file's pickled code)
        raise CheckpointError(f"cannot resume from {directory}: train_state.pt is corrupt or holds objects other "
                              f"than tensors and plain data ({type(e).__name__}); mtbert never unpickles code") from None
    _check_state(state, directory)
    try:
        weights = load_file(str(directory / "model.safetensors"), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot resume from {directory}: {e}") from e
    load_state_checked(trainer.model, weights, str(directory))
    try:
        _apply(trainer, state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {directory}: train_state.pt does not fit this run "
                              f"({type(e).__name__}: {e})") from e


# train_state.pt's top level: key -> the types its value may have
STATE_SCHEMA = {"format": int, "step": int, "epoch": int, "best_score": float, "examples_seen": int,
                "loss_sums": dict, "loss_counts": dict, "elapsed_s": float, "log": str, "weighting": dict,
                "data_rng": tuple, "streams": dict, "techniques": dict, "rng": list}


def _check_state(state, directory: Path) -> None:
    """The state's shape before any of it is applied: one CheckpointError naming what is wrong."""
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume from {directory}: train_state.pt is not a mapping")
    for key, kind in STATE_SCHEMA.items():
        value = state.get(key)
        ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if not ok:
            raise CheckpointError(f"cannot resume from {directory}: train_state.pt's {key!r} is "
                                  f"{type(value).__name__}, expected {kind.__name__}")
    if state["format"] != FORMAT:
        raise CheckpointError(f"cannot resume from {directory}: train_state.pt format {state['format']} "
                              f"(this mtbert reads format {FORMAT})")


def _apply(trainer, state: dict) -> None:
    trainer.updater.load_state_dict(state)
    trainer.weighting.load_state_dict(state["weighting"])
    for tech in trainer.techniques:
        tech.load_state_dict(state["techniques"].get(tech.name, {}))
    for t, s in trainer.streams.items():
        s.load_state_dict(state["streams"][t])
    if trainer.early_stopping and state.get("early_stopping"):
        trainer.early_stopping.load_state_dict(state["early_stopping"])
    trainer.rng.setstate(state["data_rng"])
    trainer.progress = progress_of(state, trainer.progress)
    rngs, dist = state["rng"], trainer.dist
    set_rng_state(rngs[dist.rank] if len(rngs) == dist.world else rngs[0])
    if len(rngs) != dist.world and dist.world > 1:  # another world size: fresh dropout streams
        torch.manual_seed(trainer.cfg.train.seed + trainer.step + dist.rank)


def progress_of(state: dict, built: TrainState) -> TrainState:
    """The TrainState a saved state holds; `built` (the plan as configured) fills what states saved
    before time budgets planned do not have."""
    log_ = json.loads(state["log"])
    plan = json.loads(state["plan"]) if "plan" in state else {}
    return TrainState(**{k: state[k] for k in COUNTERS}, history=log_["history"], best_metrics=log_["best_metrics"],
                      elapsed=state["elapsed_s"], plans=plan.get("plans", built.plans),
                      total_steps=plan.get("planned_steps", built.total_steps),
                      sampling_positions=plan.get("sampling_positions", built.sampling_positions))


def find_state(run_dir: str | Path) -> Path:
    """RUN_DIR/last (or last.old, left by a crash between the two renames of a save)."""
    run = RunDir(run_dir)
    if run.summary.exists() and not stopped_by_time_budget(run_dir):
        raise CheckpointError(f"{run_dir} already finished ({SUMMARY} exists): nothing to resume")
    for cand in run.states():
        if (cand / TRAIN_STATE).exists() and (cand / "model.safetensors").exists():
            return cand
    if not run.config.exists():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    raise CheckpointError(f"{run_dir} has no resumable state ({run_dir}/last is missing: the run stopped before "
                     "its first evaluation or save); start it again without --resume")


def stopped_by_time_budget(run_dir: Path) -> bool:
    """Whether the run's summary says the budget's hard limit stopped it (it kept RUN_DIR/last)."""
    try:
        return (RunDir(run_dir).read_summary() or {}).get("stopped") == "time budget"
    except (OSError, ValueError, AttributeError):  # (a corrupt summary: not a budget stop)
        return False


# what `--resume` may change: where the data is now, how long the run may take in all, and whether
# it keeps each epoch's checkpoint (extra files only: the training itself is the same)
RESUME_OVERRIDES = ("data.data_dir", "train.time_budget_min", "train.keep_epochs")


def resume_config(run_dir: str | Path, data_dir: str | None = None, overrides: list[str] = ()) -> Config:
    """The config the run was started with (RUN_DIR/config.yaml, as saved with its state);
    `data_dir` only says where the data is now, and `overrides` may set RESUME_OVERRIDES only."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUME_OVERRIDES:
            raise ConfigError(f"--resume continues the run with its own config: --set {key} cannot change it "
                             f"(only {', '.join(RESUME_OVERRIDES[1:])})")
    raw = read_yaml(find_state(run_dir) / CONFIG)
    return load_config(None, list(overrides) + ([f"data.data_dir={data_dir}"] if data_dir else []), base=raw)


def _progress_attribute(name: str) -> property:
    return property(lambda trainer: getattr(trainer.progress, name),
                    lambda trainer, value: setattr(trainer.progress, name, value),
                    doc=f"trainer.progress.{name}")


def progress_attributes(cls: type) -> type:
    """Class decorator: each TrainState field readable and writable as an attribute of the trainer
    (`trainer.step` is `trainer.progress.step`)."""
    for f in fields(TrainState):
        setattr(cls, f.name, _progress_attribute(f.name))
    return cls
