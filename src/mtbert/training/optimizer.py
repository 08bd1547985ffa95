"""The optimizer set-up shared by fine-tuning and contrastive pre-training: AdamW parameter
groups (no weight decay on biases and LayerNorm weights), linear warm-up then linear decay, and
one update step with fp16 loss scaling and gradient clipping."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

NO_DECAY = ("bias", "norm.weight")


def parameter_groups(model: nn.Module, lr: float, head_lr: float | None = None,
                     extra: nn.Module | None = None, extra_lr: float | None = None) -> list[dict]:
    """Encoder parameters at `lr`, everything else of `model` (heads, poolers) at `head_lr`
    (default `lr`), each split into decayed and not decayed; `extra` (a learned loss weighting)
    at `extra_lr` without decay. Each group lists its parameter names (for llrd). Frozen
    parameters are left out, and so are empty groups."""
    groups = []
    everything = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoder = [(n[len("encoder."):], p) for n, p in everything if n.startswith("encoder.")]
    rest = [(n, p) for n, p in everything if not n.startswith("encoder.")]
    for named, group_lr in ((encoder, lr), (rest, head_lr or lr)):
        decay = [(n, p) for n, p in named if not n.endswith(NO_DECAY)]
        no_decay = [(n, p) for n, p in named if n.endswith(NO_DECAY)]
        groups.append({"params": [p for _, p in decay], "lr": group_lr, "names": [n for n, _ in decay]})
        groups.append({"params": [p for _, p in no_decay], "lr": group_lr, "weight_decay": 0.0,
                       "names": [n for n, _ in no_decay]})
    if extra is not None and any(True for _ in extra.parameters()):
        groups.append({"params": list(extra.parameters()), "lr": extra_lr or lr, "weight_decay": 0.0,
                       "names": ["weighting"]})
    return groups


def adamw(groups: list[dict], lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over `groups`, fused (one kernel over all parameters) where torch has the fused
    kernel for their device. The default per-tensor loop spends a fifth of a MiniLM training step
    on the word-embedding update alone (a sqrt and a div over 30522 x 384 values, each a fresh
    45 MB temporary); fused, the step is 20% faster (RESULTS.md, training speed). The two differ
    only in rounding (about 1e-7 relative after a few steps)."""
    params = [p for g in groups for p in g["params"]]
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(non_empty(groups), lr=lr, weight_decay=weight_decay, fused=fused or None)


def non_empty(groups: list[dict]) -> list[dict]:
    return [g for g in groups if g["params"]]


class WarmupLinearDecay:
    """The LR factor at step s: (s + 1) / warm-up for the first steps, then linearly down to 0 at
    `total`. A time budget may refit the end earlier (refit); the factor lives in the scheduler's
    state (LambdaLR saves a callable object's attributes), so a resumed run keeps the fitted end."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total
        self.anchor_step: int | None = None    # after a refit past warm-up: decay from here ...
        self.anchor_factor: float | None = None  # ... and this factor, linearly to 0 at `total`

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / max(self.warmup, 1)
        if self.anchor_step is not None and s >= self.anchor_step:
            return self.anchor_factor * max(0.0, (self.total - s) / max(self.total - self.anchor_step, 1))
        return max(0.0, (self.total - s) / max(self.total - self.warmup, 1))

    def refit(self, step: int, total: int, warmup: int) -> None:
        """End the decay at `total` instead (the next factor used is the one for `step`). Still in
        the first warm-up, with no earlier refit: the new plan's own schedule (`warmup` steps, then
        down to 0 at `total`), as if trained with max_steps=total. Otherwise: from the factor the LR
        has now, linearly down to 0 at `total`. Never warms up again."""
        if self.anchor_step is None and step < self.warmup:
            self.warmup, self.total = warmup, total
        else:
            self.anchor_factor, self.anchor_step = self(step), step
            self.warmup, self.total = min(self.warmup, step), total


def warmup_linear_decay(optimizer: torch.optim.Optimizer, warmup_steps: int,
                        total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr · (s + 1) / warm-up for the first steps, then linearly down to 0 at `total_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(warmup_steps, total_steps))


class Updater:
    """One optimizer update: unscale (fp16), clip, step, and advance the LR schedule only if the
    step was really taken (an fp16 overflow skips it and lowers the scale)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, amp_dtype: torch.dtype | None,
                 clip_norm: float | None, clip_params: Callable[[], Iterable[torch.Tensor]]):
        self.optimizer, self.scheduler, self.clip_norm, self.clip_params = optimizer, scheduler, clip_norm, clip_params
        self.scaler = torch.amp.GradScaler(enabled=amp_dtype is torch.float16)

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def step(self) -> bool:
        self.scaler.unscale_(self.optimizer)
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.clip_params(), self.clip_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        taken = self.scaler.get_scale() >= scale  # a lowered scale means fp16 overflow: step skipped
        if taken:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return taken

    def scale_lr(self, factor: float) -> None:
        """Multiply every learning rate by `factor` from now on (the plateau rule)."""
        if factor != 1.0:
            # LambdaLR multiplies base_lrs by the warm-up/decay factor, so scaling them scales the lr
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]

    def refit(self, step: int, total: int, warmup: int) -> None:
        """End the LR decay at optimizer step `total` (a time budget's fitted plan:
        WarmupLinearDecay.refit). The schedule counts the steps really taken, fewer than `step` where
        fp16 overflows skipped some: the refit is made in its count."""
        factor, taken = self.scheduler.lr_lambdas[0], self.scheduler.last_epoch
        lag = step - taken
        factor.refit(taken, total - lag, max(warmup - lag, 0))
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor(taken)  # (the step about to be taken uses the new factor)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = dict(state["optimizer"])
        # A group's settings come back from the saved state, `fused` and `foreach` included: keep
        # this run's implementation (a state saved by the per-tensor loop resumes fused, and the
        # fp16 loss scaler, which hands a fused optimizer its found_inf, keeps working).
        impl = ("fused", "foreach")
        saved["param_groups"] = [{**g, **{k: c[k] for k in impl if k in c}}
                                 for g, c in zip(saved["param_groups"], self.optimizer.param_groups)]
        self.optimizer.load_state_dict(saved)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when loss scaling is off
            self.scaler.load_state_dict(state["scaler"])
