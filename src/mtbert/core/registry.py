"""One registry type for every name-chosen piece: tasks, schedules, weightings, techniques,
augmentations, poolers, pair heads, checkpoint extensions and stages.

A registry maps names to entries (classes, functions or objects). `build(name, *args, **options)`
checks the options against the entry's signature first, so a typo is an error, not a silent
default. Users add entries from outside the package in two ways:
- an import path in the config, `my_package.module:Name`, wherever a name is expected: the module
  is imported and `Name` is registered under that path (never while reading a run directory,
  unless run code is trusted: core.trust);
- a Python entry point in the group `mtbert.<kind>s` (e.g. `mtbert.weightings`), loaded the
  first time a name is not found.
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, TypeVar

from mtbert.core.errors import ConfigError, RegistryError
from mtbert.core.trust import check_import

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind                    # "weighting": used in messages and the entry-point group
        self.hint = hint                    # appended to the unknown-name error, e.g. "see `mtbert techniques`"
        self._entries: dict[str, T] = {}
        self._plugins_loaded = False
        self._imported: set[str] = set()   # names that are import paths (not registered entries)

    # ------------------------------------------------------------ registering
    def register(self, entry: T | None = None, *, name: str | None = None):
        """`@REG.register` (name from the entry's `name` attribute or __name__), `@REG.register(name="x")`,
        or `REG.register(obj, name="x")`."""
        def add(e: T) -> T:
            key = name or getattr(e, "name", None) or getattr(e, "__name__", None)
            if not key or not isinstance(key, str):
                raise RegistryError(f"cannot register a {self.kind} without a name: {e!r}")
            if key in self._entries and self._entries[key] is not e:
                raise RegistryError(f"{self.kind} {key!r} is registered twice")
            if isinstance(e, type) and "name" not in vars(e):
                e.name = key  # classes know their registered name (logs, state keys)
            self._entries[key] = e
            return e
        return add(entry) if entry is not None else add

    def replace(self, name: str, entry: T) -> T:
        """Register `entry` under `name`, replacing an earlier entry of that name (a user task
        declared again by another config loaded in the same process)."""
        self._entries[name] = entry
        return entry

    # ------------------------------------------------------------ looking up
    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        if isinstance(name, str) and ":" in name:  # my_package.module:Name
            return self._import(name)
        self._load_plugins()
        if name in self._entries:
            return self._entries[name]
        hint = f" ({self.hint})" if self.hint else ""
        raise RegistryError(f"unknown {self.kind} {name!r}; choose from {sorted(self._entries)}{hint}")

    def build(self, name: str, *args, **options) -> Any:
        """Construct entry `name` with positional `args` (supplied by mtbert) and user `options`.
        An entry reached by import path whose signature takes **kwargs is refused: its options
        could not be checked, and any callable would do (`subprocess:run`)."""
        factory = self.get(name)
        if name in self._imported and _takes_any_keyword(factory):
            raise ConfigError(f"{self.kind} {name!r} takes **kwargs, so its options cannot be checked: give it "
                              f"explicit parameters, or register it (an entry point in mtbert.{self._group})")
        check_options(factory, f"{self.kind} {name!r}", options, skip=len(args))
        return factory(*args, **options)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def names(self) -> list[str]:
        return list(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    # ------------------------------------------------------------ plug-ins
    def _import(self, path: str) -> T:
        check_import(path, self.kind)
        module, _, attr = path.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise RegistryError(f"{self.kind} {path!r}: cannot import it ({e})") from e
        if path not in self._entries:
            self._entries[path] = entry
            self._imported.add(path)
        return self._entries[path]

    @property
    def _group(self) -> str:
        return f"{self.kind.replace(' ', '_')}s"

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=f"mtbert.{self._group}"):
            if ep.name not in self._entries:
                self._entries[ep.name] = ep.load()


def _takes_any_keyword(factory: Callable) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing can be checked either
        return True


def check_options(factory: Callable, what: str, options: dict, skip: int = 0) -> None:
    """Raise a clear error naming options that `factory` does not take (a typo must not be
    ignored). The first `skip` positional parameters are supplied by mtbert, not the user."""
    params = list(inspect.signature(factory).parameters.values())[skip:]  # a class's: without self
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RegistryError(f"{what} got unknown options {unknown}; it takes {known or 'none'}")


# Stages and commands that are techniques of the papers but not training-loop plug-ins
# (contrastive pre-training, ensembles): name -> (summary, paper, usage). `mtbert techniques`
# lists them. It lives here because both the training and the inference layers add to it.
STAGES: Registry[tuple[str, str, str]] = Registry("stage")


def register_stage(name: str, summary: str, paper: str, usage: str) -> None:
    if name not in STAGES:
        STAGES.register((summary, paper, usage), name=name)
