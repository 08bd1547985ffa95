"""A run directory is data, not code.

People share trained runs, and loading one must be as safe as loading safetensors weights. A run's
config and model.json may name Python code: `plugins:` modules and `module:attr` import paths
wherever a registry name goes (a schedule, weighting, technique, pooler, head, task). mtbert imports
such code only from what the user gave it directly (their own --config), never from a directory it
reads as a run (resume, evaluate, predict, serve, load, a backbone or distillation teacher),
unless the user says they trust it: `--trust-run-code` on the command line, or
`trust_run_code=True` in Python (as `trust_remote_code` in transformers). docs/security.md states
the whole trust model.
"""
from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

from mtbert.core.errors import ConfigError

_READING_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("mtbert_reading_run", default=None)
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("mtbert_trust_run_code", default=False)
_CONFINED: contextvars.ContextVar[bool] = contextvars.ContextVar("mtbert_confine_run_data", default=False)


class UntrustedCodeError(ConfigError):
    """A run directory names code to import, and the user has not said they trust it."""


@contextlib.contextmanager
def run_code_trusted(enabled: bool = True):
    """Within this block, allow (enabled) the code that the run directories read name."""
    token = _TRUSTED.set(bool(enabled) or _TRUSTED.get())
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def run_code_is_trusted() -> bool:
    """Whether the code a run names may be imported here (inside run_code_trusted)."""
    return _TRUSTED.get()


@contextlib.contextmanager
def reading_run(source: str | Path, confine_data: bool = True):
    """While reading `source` (a run, checkpoint or ensemble directory), refuse the imports it names;
    with `confine_data`, the task files it declares are read only under the data directory the
    user gives (TaskSpec.path). Resuming the user's own run does not confine them: it trains on
    the files it was started with."""
    token = _READING_RUN.set(_READING_RUN.get() or str(source))
    confined = _CONFINED.set(confine_data or _CONFINED.get())
    try:
        yield
    finally:
        _CONFINED.reset(confined)
        _READING_RUN.reset(token)


def reading_run_source() -> str | None:
    """The run directory being read now (None: the user's own files)."""
    return _READING_RUN.get()


def run_data_confined() -> bool:
    """Whether task definitions read now come from a loaded run, whose files stay under --data-dir."""
    return _CONFINED.get() and _READING_RUN.get() is not None


def check_import(what: str, kind: str) -> None:
    """Called before importing `what` (a module or module:attr) named as a `kind`: refused while a
    run directory is being read, unless run code is trusted."""
    source = _READING_RUN.get()
    if source is not None and not _TRUSTED.get():
        raise UntrustedCodeError(
            f"{source} names code to import ({kind} {what!r}): a run directory is data, not code, so mtbert "
            f"imports nothing it names; pass --trust-run-code (Python: trust_run_code=True) only for a run "
            f"whose source you trust")
