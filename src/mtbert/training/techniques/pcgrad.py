"""PCGrad gradient surgery (Yu et al., 2020) on the shared encoder [papers 001, 002, 003].

Each task's gradient on the shared parameters is projected onto the normal plane of every other
task gradient it conflicts with (negative inner product), visiting the others in random order;
the projected gradients are then summed (or averaged). Heads and loss-weight parameters belong to
one task each and keep their ordinary gradients. Needs several tasks per step (`interleaved`).
The trainer computes the per-task gradients (training.gradients); this class only combines them.
Memory: one flattened copy of the shared gradient per task, nothing more.
"""
from __future__ import annotations

import random

import torch

from mtbert.core.errors import ConfigError
from mtbert.training.techniques.base import TECHNIQUES, GradientCombiner


def project_conflicting(grads: list[torch.Tensor], rng: random.Random) -> list[torch.Tensor]:
    """PCGrad's projection: g_i <- g_i - (g_i·g_j / ||g_j||²) g_j whenever g_i·g_j < 0."""
    projected = []
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(len(grads)) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g -= dot / grads[j].pow(2).sum().clamp_min(1e-20) * grads[j]
        projected.append(g)
    return projected


@TECHNIQUES.register
class PCGrad(GradientCombiner):
    name = "pcgrad"
    summary = "project conflicting per-task gradients on the shared encoder (gradient surgery)"
    paper = "001, 002, 003; Yu et al. 2020"

    def __init__(self, reduction: str = "sum", seed: int = 0):
        if reduction not in ("sum", "mean"):
            raise ConfigError("pcgrad.reduction must be 'sum' or 'mean'")
        self.reduction, self.rng = reduction, random.Random(seed)

    def combine(self, grads):
        combined = torch.stack(project_conflicting(grads, self.rng)).sum(0)
        return combined / len(grads) if self.reduction == "mean" else combined

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])
