"""The technique interface: small plug-ins chosen by name under `techniques:`.

A technique overrides only the hooks it needs. Hooks see a `StepContext` (the model, the step
counter, autocast, the loss scale, the training sets), never the trainer, and they return values
instead of changing other objects: `task_loss` returns the loss, `param_groups` the groups,
`on_eval` a learning-rate factor.

Techniques run in the order the YAML lists them; their loss hooks only add terms (task_loss), so
that order changes nothing, and a gradient combiner is a slot of its own.

Gradient combiners (PCGrad and its successors) are a separate slot: a `GradientCombiner` gets
the per-task gradients of the shared parameters (`model.shared_parameters()`) and returns the one
gradient to apply. At most one combiner can be configured.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from mtbert.core.distributed import Dist
from mtbert.core.errors import ConfigError
from mtbert.core.registry import Registry

TECHNIQUES: Registry[type] = Registry("technique", hint="see `mtbert techniques`")


@dataclass
class StepContext:
    """What techniques may read. The trainer updates `step` and `loss_scale` as it goes."""
    model: torch.nn.Module                       # the MultitaskModel being trained
    total_steps: int
    device: torch.device = torch.device("cpu")
    tokenizer: object = None
    train_sets: dict = field(default_factory=dict)  # task -> EncodedDataset
    seed: int = 0
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    step: int = 0                                # optimizer steps taken so far
    loss_scale: float = 1.0                      # fp16 loss scale (1.0 when loss scaling is off)
    out_dir: Path | None = None                  # the run directory (caches beside the run)
    dist: Dist = field(default_factory=Dist)     # this process's place under torchrun

    def kind(self, task: str):
        return self.model.tasks[task].kind


class Technique:
    name: str = ""
    summary: str = ""
    paper: str = ""
    # False where the technique's forward depends on state set around the model's call (hooks,
    # routing), which a layer recomputed during backward (train.checkpoint_above_tokens) would miss
    recomputable: bool = True
    # the export formats that can hold a model this technique changed (modeling.adapters.EXTENSIONS),
    # and why not the others
    exports: tuple[str, ...] = ("hf", "sentence-transformers", "onnx")
    export_note: str = ""

    def prepare_model(self, model, finetune: str) -> None:
        """Change the model's structure (e.g. insert adapters) before the optimizer is built. A
        technique that does so records its spec in `model.extensions[name]`, and registers how to
        re-apply it in modeling.adapters.EXTENSIONS, so that checkpoints can rebuild it."""

    def param_groups(self, model, groups: list[dict]) -> list[dict]:
        """Return the optimizer parameter groups to use (each has "params", "names", "lr")."""
        return groups

    def setup(self, ctx: StepContext) -> None:
        """Called once the model, optimizer and data exist."""

    def task_loss(self, ctx: StepContext, task: str, batch: dict, logits: torch.Tensor,
                  loss: torch.Tensor) -> torch.Tensor:
        """Return `loss` plus this technique's terms. The order contract: a hook only adds (a term
        may stand in for the plain supervised loss as `+ (new - plain)`, as UDA's TSA and
        distillation do), never scales or replaces what it is given, so the techniques' order in
        the YAML (the order they run in) does not change the total (tests/test_technique_effects.py)."""
        return loss

    def after_step(self, ctx: StepContext) -> None:
        """After each optimizer step (ctx.step already counts it)."""

    def on_eval(self, score: float, train_loss: float) -> float:
        """After each dev evaluation (selection score, summed mean training loss since the last
        one); return a factor for every learning rate (1.0: leave them)."""
        return 1.0

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (saved in RUN_DIR/last): tensors, numbers,
        strings and containers of them. Stateless techniques keep the empty default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; called after `setup` when resuming."""


class GradientCombiner(Technique):
    """Combines the per-task gradients of the shared parameters into the one that is applied."""

    def combine(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """grads: one flattened gradient [N] per task -> the combined gradient [N]."""
        raise NotImplementedError


def build_techniques(spec: dict | None) -> list[Technique]:
    """`techniques:` config (name -> options, `false` or `enabled: false` to switch off) -> plug-ins."""
    out = []
    for name, options in (spec or {}).items():
        if options is False or (isinstance(options, dict) and options.get("enabled") is False):
            continue
        opts = {k: v for k, v in (options if isinstance(options, dict) else {}).items() if k != "enabled"}
        out.append(TECHNIQUES.build(name, **opts))
    combiners = [t.name for t in out if isinstance(t, GradientCombiner)]
    if len(combiners) > 1:
        raise ConfigError(f"techniques {combiners} all combine per-task gradients: enable at most one")
    return out


def gradient_combiner(techniques: list[Technique]) -> GradientCombiner | None:
    return next((t for t in techniques if isinstance(t, GradientCombiner)), None)
