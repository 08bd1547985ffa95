"""The run directory's layout: the one place that knows what a run directory holds and what each
entry is called. Everything else asks a RunDir for paths instead of spelling names.

    RUN/
      config.yaml      the run's full config (what `--resume` continues)
      command.txt      the command that started it (model cards)
      metrics.jsonl    one JSON row per evaluation
      summary.json     written when the run ends (its presence means: finished)
      best/            the best checkpoint so far (best.old: the previous one, during a swap)
      epochs/N/        epoch N's checkpoint, with train.keep_epochs (members of epoch ensembles)
      last/            the resumable state (last.old: the previous one, during a swap)
      pretrain/        a contrastive pre-training stage run inside this run
      .replaced-PID/   a run that --overwrite moved aside until this one's first checkpoint

A checkpoint directory (best/, last/, a pretrain stage's best/) holds model.safetensors,
model.json, tokenizer.json, config.yaml and meta.json (modeling.checkpoint), plus
int8_check.json in best/ and train_state.pt in last/.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mtbert.core.errors import ConfigError
from mtbert.core.io import read_json, read_run_text

BEST, BEST_OLD, LAST, LAST_OLD, PRETRAIN, EPOCHS = "best", "best.old", "last", "last.old", "pretrain", "epochs"
CONFIG, COMMAND, METRICS, SUMMARY = "config.yaml", "command.txt", "metrics.jsonl", "summary.json"
INT8_CHECK, TRAIN_STATE = "int8_check.json", "train_state.pt"
# what a run directory holds: any of these there means a run lives in it
RUN_FILES = (CONFIG, METRICS, SUMMARY, BEST, BEST_OLD, LAST, LAST_OLD, PRETRAIN, EPOCHS, COMMAND)


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @staticmethod
    def of_checkpoint(checkpoint: str | Path) -> Path:
        """The run directory a checkpoint belongs to (best/ or best.old/ -> its parent, a kept epoch
        RUN/epochs/N -> RUN); a bare checkpoint directory is its own."""
        checkpoint = Path(checkpoint)
        if RunDir.is_kept_epoch(checkpoint):
            return _absolute(checkpoint).parent.parent
        return checkpoint.parent if checkpoint.name in (BEST, BEST_OLD) else checkpoint

    @staticmethod
    def is_kept_epoch(checkpoint: str | Path) -> bool:
        """Whether `checkpoint` is RUN/epochs/N of a run (train.keep_epochs)."""
        checkpoint = _absolute(checkpoint)
        return checkpoint.parent.name == EPOCHS and checkpoint.name.isascii() and checkpoint.name.isdigit() \
            and RunDir(checkpoint.parent.parent).holds_run()

    @staticmethod
    def label(checkpoint: str | Path) -> str:
        """A short display name for a run or checkpoint: the run's name, with `-epochN` for an epoch
        kept in RUN/epochs/N (so one run's epochs stay apart in an ensemble or a report)."""
        checkpoint = _absolute(checkpoint)
        if RunDir.is_kept_epoch(checkpoint):
            return f"{checkpoint.parent.parent.name}-epoch{checkpoint.name}"
        return RunDir.of_checkpoint(checkpoint).name

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def best_old(self) -> Path:
        return self.path / BEST_OLD

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def last_old(self) -> Path:
        return self.path / LAST_OLD

    @property
    def pretrain(self) -> Path:
        return self.path / PRETRAIN

    @property
    def epochs(self) -> Path:
        return self.path / EPOCHS

    def epoch(self, n: int) -> Path:
        """Epoch n's checkpoint (0-based, as metrics.jsonl counts), kept with train.keep_epochs."""
        return self.epochs / str(n)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def command(self) -> Path:
        return self.path / COMMAND

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    def checkpoints(self) -> tuple[Path, Path]:
        """Where its best model is, in order: best/, then best.old/ (left by a crash mid-swap)."""
        return self.best, self.best_old

    def states(self) -> tuple[Path, Path]:
        """Where its resumable state is, in order: last/, then last.old/."""
        return self.last, self.last_old

    def present(self) -> list[str]:
        """The run entries this directory holds (empty: no run lives here)."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def holds_run(self) -> bool:
        """Whether an mtbert run lives here (its config or a checkpoint), not only look-alike names."""
        checkpoints = (*self.checkpoints(), *self.states(), self.pretrain / BEST)
        return self.config.is_file() or any((d / "model.json").is_file() for d in checkpoints)

    def read_summary(self) -> dict | None:
        """summary.json (None before the run ends); a corrupt one is one CheckpointError."""
        return read_json(self.summary) if self.summary.exists() else None

    def read_command(self) -> str | None:
        return read_run_text(self.command).strip() if self.command.exists() else None


def _absolute(path: str | Path) -> Path:
    """`path` made absolute and normalised ("." and ".." named), keeping the names of symlinks."""
    return Path(os.path.abspath(path))


def check_output_outside(out: str | Path, read: str | Path, flag: str = "--out") -> None:
    """Refuse an output that would write over what a command reads: the run, ensemble or checkpoint
    directory `read` itself, anything inside its checkpoints (best/, last/ and their .old), or a
    file it holds (its summary, metrics, config, ensemble.json...)."""
    out, read = Path(out).resolve(), Path(read).resolve()
    run = RunDir(read)
    checkpoints = [d.resolve() for d in (*run.checkpoints(), *run.states(), run.epochs)]
    if (read / "model.json").exists():  # a checkpoint directory given itself
        checkpoints.append(read)
    inside = out == read or any(out == d or d in out.parents for d in checkpoints)
    if inside or (out.parent == read and out.exists()):
        raise ConfigError(f"{flag} {out} would write into {read}, which this command reads: choose a path outside it")
