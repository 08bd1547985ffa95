"""Bregman proximal point optimisation with momentum (Jiang et al., 2020, SMART §3) [paper 004].

An exponential-moving-average teacher θ̃ ← (1 − β) θ + β θ̃ follows the student after every
step; the student pays μ · divergence(f(x; θ), f(x; θ̃)) on each batch, which keeps each update
close to the previous iterates (a proximal step). β can ramp linearly from `beta` to `beta_end`.
"""
from __future__ import annotations

import copy

import torch

from mtbert.core.errors import ConfigError
from mtbert.training.techniques.base import TECHNIQUES, Technique


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, beta: float) -> None:
    """θ̃ ← (1 − β) θ + β θ̃ for every parameter and buffer."""
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        if t.dtype.is_floating_point:
            t.mul_(beta).add_(s.detach(), alpha=1 - beta)
        else:
            t.copy_(s)


@TECHNIQUES.register
class Bregman(Technique):
    name = "bregman"
    summary = "Bregman proximal point: EMA teacher and a proximal penalty to its outputs"
    paper = "004; Jiang et al. 2020"

    def __init__(self, mu: float = 1.0, beta: float = 0.75, beta_end: float | None = None):
        if not 0 <= beta < 1 or (beta_end is not None and not 0 <= beta_end < 1):
            raise ConfigError("bregman.beta must be in [0, 1)")
        self.mu, self.beta0, self.beta1 = mu, beta, beta_end if beta_end is not None else beta
        self.teacher = None

    def beta(self, step: int, total: int) -> float:
        return self.beta0 + (self.beta1 - self.beta0) * min(step / max(total, 1), 1.0)

    def setup(self, ctx):
        self.teacher = copy.deepcopy(ctx.model).eval().requires_grad_(False)

    def task_loss(self, ctx, task, batch, logits, loss):
        with torch.no_grad(), ctx.autocast():
            target = self.teacher(task, batch["inputs"])
        return loss + self.mu * ctx.kind(task).divergence(logits, target)

    def after_step(self, ctx):
        ema_update(self.teacher, ctx.model, self.beta(ctx.step, ctx.total_steps))

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state["teacher"])
