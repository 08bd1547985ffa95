"""Training techniques from the papers, each a small plug-in chosen by name under `techniques:`.

A technique overrides only the hooks it needs; the training loop calls every enabled technique at
each hook. See docs/techniques.md for what each one does, its paper and its options.
"""
from __future__ import annotations

from ..options import check_options

TECHNIQUES: dict[str, type] = {}
# Techniques that are a stage or a command rather than a training-loop plug-in (pre-training,
# ensembles): name -> (one-line summary, paper, how to run it). Listed by `mtbert techniques`.
STAGES: dict[str, tuple[str, str, str]] = {}


def register_stage(name: str, summary: str, paper: str, usage: str) -> None:
    STAGES[name] = (summary, paper, usage)


def register(cls):
    TECHNIQUES[cls.name] = cls
    return cls


class Technique:
    name: str = ""
    summary: str = ""
    paper: str = ""

    def __init__(self, **options):
        if options:
            raise ValueError(f"technique {self.name!r} got unknown options {sorted(options)}")

    def prepare_model(self, trainer) -> None:
        """Change the model's structure (e.g. insert adapters) before the optimizer is built. A
        technique that does so records its spec in `model.extensions[name]`, so that checkpoints
        can rebuild the structure through `restore`."""

    @classmethod
    def restore(cls, model, spec: dict) -> None:
        """Re-apply a structural change recorded in a checkpoint, before its weights are loaded."""

    def param_groups(self, trainer, groups: list[dict]) -> list[dict]:
        """Adjust optimizer parameter groups before the optimizer is built."""
        return groups

    def setup(self, trainer) -> None:
        """Called once the model, optimizer and data exist."""

    def task_loss(self, trainer, task: str, batch: dict, logits, loss):
        """Return the task loss with this technique's regulariser added."""
        return loss

    def backward(self, trainer, losses: dict, total) -> bool:
        """Back-propagate in a special way; return True if done (default backward is skipped)."""
        return False

    def after_step(self, trainer) -> None:
        """After each optimizer step."""

    def on_eval(self, trainer, metrics: dict) -> None:
        """After each dev evaluation."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (saved in RUN_DIR/last): tensors, numbers,
        strings and containers of them. Stateless techniques keep the empty default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; called after `setup` when resuming."""


def build_techniques(spec: dict) -> list[Technique]:
    out = []
    for name, options in (spec or {}).items():
        if options is False or (isinstance(options, dict) and options.get("enabled") is False):
            continue
        if name not in TECHNIQUES:
            raise ValueError(f"unknown technique {name!r}; see `mtbert techniques` for {sorted(TECHNIQUES)}")
        opts = {k: v for k, v in (options if isinstance(options, dict) else {}).items() if k != "enabled"}
        check_options(TECHNIQUES[name], f"technique {name!r}", opts, not_options=("self", "options"))
        out.append(TECHNIQUES[name](**opts))
    return out


# Register the built-in techniques (imported for their @register side effect).
from . import bregman, lora, lr_schedules, pcgrad, smart, uda  # noqa: E402,F401
