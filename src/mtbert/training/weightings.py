"""Loss weightings: how the per-task losses of one step become the loss we back-propagate.

Each weighting is an nn.Module (its parameters, if any, are trained with their own learning rate)
with `forward(losses: dict[task, loss]) -> total`. Select by name via `train.weighting`.

The contract every weighting keeps (tests/test_weighting.py checks it registry-wide): the total is
additive across tasks, w({a, b}) = w({a}) + w({b}), and affine in each task's loss,
w({t: x}) = α_t x + β_t, with α_t and β_t depending only on the weighting's own parameters. So a
step that sees some tasks only (sampled schedules) weights them as a step that sees all would, and
per-task gradients (PCGrad) can be taken from each term alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mtbert.core.errors import ConfigError
from mtbert.core.registry import Registry
from mtbert.core.tasks import TaskSpec

WEIGHTINGS: Registry[type] = Registry("weighting")


def build_weighting(name: str, tasks: list[TaskSpec], **options) -> nn.Module:
    return WEIGHTINGS.build(name, tasks, **options)


class Weighting(nn.Module):
    lr: float | None = None  # learning rate for this module's parameters; None = the model's

    def __init__(self, tasks: list[TaskSpec]):
        super().__init__()
        self.tasks = [t.name for t in tasks]

    def weights(self) -> dict[str, float]:
        """Current effective weight per task (for logs)."""
        return {t: 1.0 for t in self.tasks}


@WEIGHTINGS.register(name="sum")
class Sum(Weighting):
    """L = Σ_t w_t L_t with fixed weights (default 1)."""

    def __init__(self, tasks, weights: dict | None = None):
        super().__init__(tasks)
        unknown = sorted(set(weights or {}) - set(self.tasks))
        if unknown:
            raise ConfigError(f"sum weighting: weights for unknown tasks {unknown}; tasks are {self.tasks}")
        self.fixed = {t: float((weights or {}).get(t, 1.0)) for t in self.tasks}

    def forward(self, losses):
        return sum(self.fixed[t] * l for t, l in losses.items())

    def weights(self):
        return dict(self.fixed)


@WEIGHTINGS.register(name="learnable")
class Learnable(Weighting):
    """L = Σ_t w_t L_t, w = T · softmax(θ): learned weights kept positive and summing to T, so the
    model cannot shrink all weights to zero."""

    def __init__(self, tasks, lr: float | None = 1e-3):
        super().__init__(tasks)
        self.lr = lr
        self.logits = nn.Parameter(torch.zeros(len(self.tasks)))

    def _w(self):
        return len(self.tasks) * torch.softmax(self.logits, 0)

    def forward(self, losses):
        w = self._w()
        return sum(w[self.tasks.index(t)] * l for t, l in losses.items())

    def weights(self):
        return {t: float(w) for t, w in zip(self.tasks, self._w().detach())}


@WEIGHTINGS.register(name="uncertainty")
class Uncertainty(Weighting):
    """Homoscedastic uncertainty (Kendall, Gal & Cipolla, 2018), with s_t = log σ_t²:
    classification  L = exp(-s) L_t + s/2        (1/σ² L + log σ)
    regression      L = ½ exp(-s) L_t + s/2      (1/(2σ²) L + log σ)"""

    def __init__(self, tasks, lr: float | None = 1e-3):
        super().__init__(tasks)
        self.lr = lr
        self.log_var = nn.Parameter(torch.zeros(len(self.tasks)))
        self.factor = {t.name: t.kind.uncertainty_factor for t in tasks}

    def forward(self, losses):
        total = 0.0
        for t, l in losses.items():
            s = self.log_var[self.tasks.index(t)]
            total = total + self.factor[t] * torch.exp(-s) * l + 0.5 * s
        return total

    def weights(self):
        return {t: self.factor[t] * float(torch.exp(-s)) for t, s in zip(self.tasks, self.log_var.detach())}


@WEIGHTINGS.register(name="awl")
class AutomaticWeightedLoss(Weighting):
    """Automatic weighted loss (Liebel & Körner, 2018): L = Σ_t ½ / c_t² · L_t + log(1 + c_t²).
    The log(1 + c²) regulariser stays positive, unlike log σ. Trained with its own learning rate."""

    def __init__(self, tasks, lr: float | None = 1e-2):
        super().__init__(tasks)
        self.lr = lr
        self.c = nn.Parameter(torch.ones(len(self.tasks)))

    def forward(self, losses):
        total = 0.0
        for t, l in losses.items():
            c2 = self.c[self.tasks.index(t)] ** 2
            total = total + 0.5 / c2 * l + torch.log1p(c2)
        return total

    def weights(self):
        return {t: float(0.5 / c ** 2) for t, c in zip(self.tasks, self.c.detach())}
