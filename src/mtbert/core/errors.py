"""The anticipated errors: each is one line for the user (the CLI prints it and exits 2)."""
from __future__ import annotations


class MtbertError(ValueError):
    """Base of mtbert's own errors (a ValueError, so `except ValueError` keeps working)."""


class ConfigError(MtbertError):
    """A config file, `--set` override or option is invalid."""


class DataError(RuntimeError):
    """A data file is missing or unreadable as a whole (bad rows are skipped and counted instead)."""


class CheckpointError(RuntimeError):
    """A checkpoint or backbone directory is missing, incomplete or does not match the model."""


class TrainingDiverged(RuntimeError):
    """A training loss or dev score became NaN or infinite: the run stops, its last good best/ is kept."""
