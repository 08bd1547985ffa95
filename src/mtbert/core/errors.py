"""The anticipated errors: each is one line for the user (the CLI prints it and exits 2).

Everything mtbert raises on purpose about the user's input (config, data, checkpoints, names)
is an MtbertError; the CLI treats exactly MtbertError, OSError and YAML errors as the user's
(exit 2), and anything else as a bug (exit 1, the traceback under -v).
"""
from __future__ import annotations


class MtbertError(ValueError):
    """Base of mtbert's own errors (a ValueError, so `except ValueError` keeps working)."""


class ConfigError(MtbertError):
    """A config file, `--set` override or option is invalid."""


class RegistryError(ConfigError):
    """A name that no registry holds, or options its entry does not take."""


class UnknownTaskError(RegistryError, KeyError):
    """A task name that no definition declares (a KeyError too: a lookup that failed)."""

    def __str__(self) -> str:  # (KeyError would quote the message)
        return str(self.args[0]) if self.args else ""


class DataError(MtbertError):
    """A data file is missing or unreadable as a whole (bad rows are skipped and counted instead)."""


class CheckpointError(MtbertError):
    """A checkpoint or backbone directory is missing, incomplete or does not match the model."""


class TrainingDiverged(MtbertError):
    """A training loss or dev score became NaN or infinite: the run stops, its last good best/ is kept."""
