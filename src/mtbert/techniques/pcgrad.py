"""PCGrad gradient surgery (Yu et al., 2020) on the shared encoder [papers 001, 002, 003].

Each task's gradient on the shared parameters is projected onto the normal plane of every other
task gradient it conflicts with (negative inner product), visiting the others in random order;
the projected gradients are then summed (or averaged). Heads and loss-weight parameters belong to
one task each and keep their ordinary gradients. Needs several tasks per step (`interleaved`).
Memory: one flattened copy of the shared gradient per task, nothing more.
"""
from __future__ import annotations

import random

import torch

from . import Technique, register


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


@register
class PCGrad(Technique):
    name = "pcgrad"
    summary = "project conflicting per-task gradients on the shared encoder (gradient surgery)"
    paper = "001, 002, 003; Yu et al. 2020"

    def __init__(self, reduction: str = "sum", seed: int = 0):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError("pcgrad.reduction must be 'sum' or 'mean'")
        self.reduction, self.rng = reduction, random.Random(seed)

    def setup(self, trainer):
        model = trainer.model
        shared_modules = [model.encoder, model.pooler] + ([model.shared_pair] if model.shared_pair is not None else [])
        self.shared = [p for m in shared_modules for p in m.parameters() if p.requires_grad]
        ids = {id(p) for p in self.shared}
        self.private = [p for g in trainer.optimizer.param_groups for p in g["params"] if id(p) not in ids]
        if not self.shared:
            raise ValueError("pcgrad needs a trainable shared encoder (model.finetune=full)")

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])

    def backward(self, trainer, losses, total):
        if len(losses) < 2:
            return False  # nothing to project against: ordinary backward
        scale = trainer.scaler.scale
        # Per-task terms of the weighted total (every weighting is a sum of per-task terms).
        terms = [trainer.weighting({t: l}) for t, l in losses.items()]
        flat = []
        for term in terms:
            g = torch.autograd.grad(scale(term), self.shared, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                   for x, p in zip(g, self.shared)]))
            del g
        if trainer.dist.world > 1:
            # Project the global per-task gradients (mean over ranks), so every rank does the same
            # surgery; the shared gradients set below are then already global: only the private
            # ones are left for the trainer to average.
            flat = list(trainer.dist.average_(torch.stack(flat)))
            trainer.grads_to_average = self.private
        projected = project_conflicting(flat, self.rng)
        combined = torch.stack(projected).sum(0)
        if self.reduction == "mean":
            combined /= len(projected)
        del flat, projected
        private = [p for p in self.private if p.requires_grad]
        if private:
            torch.autograd.backward(scale(sum(terms)), inputs=private)
        offset = 0
        for p in self.shared:
            n = p.numel()
            p.grad = combined[offset: offset + n].view_as(p).to(p.dtype)
            offset += n
        return True
