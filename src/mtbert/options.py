"""Option checking shared by the name-chosen strategies (schedules, weightings, techniques)."""
from __future__ import annotations

import inspect


def check_options(cls, what: str, options: dict, not_options=("self",)) -> None:
    """Raise a clear error naming options that `cls.__init__` does not take (a typo must not be ignored)."""
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in not_options]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{what} got unknown options {unknown}; it takes {known or 'none'}")
