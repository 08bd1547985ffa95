"""The run directory's guards: never train over a run by accident, and stop a run that diverges.

A run directory holds a trained model and its results; training into one that holds a run is
refused unless the run is resumed or explicitly overwritten. An overwritten run is moved aside
(RUN/.replaced-PID/) and deleted only once the new run has written its first checkpoint; if the
new run fails before that, the old one is moved back. A NaN or infinite loss or dev score ends
training with TrainingDiverged, before it can replace the last good best/ or write bare NaN.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from mtbert.core.distributed import Dist
from mtbert.core.errors import ConfigError, TrainingDiverged
from mtbert.core.io import process_alive, remove_path
from mtbert.core.rundir import CONFIG, RUN_FILES, SUMMARY, RunDir


class ReplacedRun:
    """A run that --overwrite moved aside: `release()` deletes it (the new run has a checkpoint),
    `restore()` puts it back (the new run failed first). As a context manager: released on
    success, restored on any exception."""

    PREFIX = ".replaced-"

    def __init__(self, out: Path, names: list[str]):
        self.out = out
        self.held = Path(tempfile.mkdtemp(dir=out, prefix=f"{self.PREFIX}{os.getpid()}-"))
        moved = []
        try:
            for name in names:
                os.replace(out / name, self.held / name)
                moved.append(name)
        except BaseException:  # all or nothing: what moved goes back
            for name in moved:
                os.replace(self.held / name, out / name)
            self.held.rmdir()
            raise

    def release(self) -> None:
        """Delete the old run, and any a killed writer left aside (an older attempt to replace it)."""
        shutil.rmtree(self.held, ignore_errors=True)
        for other in self.out.glob(f"{self.PREFIX}*"):
            pid = re.match(rf"{re.escape(self.PREFIX)}(\d+)(-|$)", other.name)
            if pid and not process_alive(int(pid.group(1))):
                shutil.rmtree(other, ignore_errors=True)

    def restore(self) -> None:
        """Put the old run back: every run entry in the directory now is the failed new run's."""
        if not self.held.exists():
            return
        for name in RUN_FILES:
            remove_path(self.out / name)
        for entry in self.held.iterdir():
            os.replace(entry, self.out / entry.name)
        self.held.rmdir()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self.restore() if kind is not None else self.release()


def run_dir_problem(out: Path, resume: bool, overwrite: bool, resumable: bool = True) -> str | None:
    """Why training into `out` is refused (read-only: nothing is created or moved), or None."""
    found = RunDir(out).present()
    if found and not resume and not RunDir(out).holds_run():  # (never delete the user's own folders)
        return f"{out} holds {', '.join(found)} but no mtbert run (no {CONFIG}, no checkpoint): choose another --out"
    if found and not resume and not overwrite:
        finished = "finished " if SUMMARY in found else ""
        resume_it = f"continue an unfinished run with `mtbert train --resume {out}`, " if resumable else ""
        return (f"{out} already holds a {finished}run ({', '.join(found)}): {resume_it}replace it with "
                f"--overwrite (deletes its model and metrics), or choose another --out")
    return None


def check_run_dir(out: Path, resume: bool, overwrite: bool, dist: Dist | None = None,
                  resumable: bool = True) -> None:
    """Refuse, before anything is built, to train into a directory that holds a run unless resuming
    or overwriting it; touches nothing. Every rank gets the main rank's verdict."""
    dist = dist or Dist()
    problem = run_dir_problem(out, resume, overwrite, resumable) if dist.main else None
    problem = dist.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, dist: Dist | None = None,
                    resumable: bool = True) -> ReplacedRun | None:
    """Make `out` ready to write, last, once everything that can fail on input has been checked:
    refuse a directory that holds a run unless resuming it or told to overwrite it; then its run
    files are moved aside (returned as a ReplacedRun, on the main rank), so no stale summary or
    model outlives the new run and the old one survives the new one's failure. The main rank looks
    and writes; every rank gets its verdict, so all stop together."""
    dist = dist or Dist()
    problem, replaced = None, None
    if dist.main:
        problem = run_dir_problem(out, resume, overwrite, resumable)
        if problem is None:
            try:
                _ensure_writable(out)
                found = RunDir(out).present()
                if overwrite and not resume and found:
                    replaced = ReplacedRun(out, found)
            except OSError as e:
                problem = ("OSError", str(e))
        if isinstance(problem, str):
            problem = ("ConfigError", problem)
    problem = dist.broadcast_object(problem)
    if problem:
        raise (OSError if problem[0] == "OSError" else ConfigError)(problem[1])
    return replaced


def check_finite_losses(losses: dict[str, float], step: int, dist: Dist, best_metrics: dict) -> None:
    """Stop the run (on every rank) once a training loss is NaN or infinite: the weights are
    ruined from here on, and best/ still holds the last good model."""
    bad = {t: v for t, v in losses.items() if not math.isfinite(v)}
    if dist.any(bool(bad)):
        where = ", ".join(f"{t} loss {v}" for t, v in bad.items()) or "a loss on another rank is not finite"
        raise TrainingDiverged(f"training diverged at step {step} ({where}); lower train.lr or set "
                               f"train.clip_norm; " + _kept(best_metrics))


def check_finite_score(score: float, step: int, best_metrics: dict) -> None:
    """A NaN dev score means the model outputs NaN (and NaN > best is False: the run would end
    without a model)."""
    if not math.isfinite(score):
        raise TrainingDiverged(f"dev score is {score} at step {step}: the model's outputs are not finite; "
                               + _kept(best_metrics))


def _kept(best_metrics: dict) -> str:
    if not best_metrics:
        return "no model was saved (the run diverged before its first good evaluation)"
    shown = ", ".join(f"{k} {v:.4f}" for k, v in best_metrics.items())
    return f"best/ keeps the best model so far (dev {shown})"


def _ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output directory {out} is not writable: {e}") from e
