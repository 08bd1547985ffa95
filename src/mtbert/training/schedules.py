"""Task schedules: which task(s) each optimizer step trains on, one epoch at a time.

A schedule returns a list of steps; each step is a list of task names. Every task's batches are
drawn from a circular iterator, so a task that is sampled more often than it has batches simply
starts a fresh shuffled pass. Select by name via `train.schedule` and `train.schedule_args`.
"""
from __future__ import annotations

import random

from mtbert.core.errors import ConfigError
from mtbert.core.registry import Registry

SCHEDULES: Registry[type] = Registry("schedule")


def build_schedule(name: str, **options):
    return SCHEDULES.build(name, **options)


@SCHEDULES.register(name="sequential")
class Sequential:
    """All batches of the first task, then the next: one pass over each task, in config order."""

    def plan(self, batches: dict[str, int], epoch: int, num_epochs: int, rng: random.Random):
        return [[t] for t, n in batches.items() for _ in range(n)]


@SCHEDULES.register(name="round_robin")
class RoundRobin:
    """One batch of each task in turn; an exhausted task drops out, so each is seen once per epoch."""

    def plan(self, batches, epoch, num_epochs, rng):
        left, steps = dict(batches), []
        while any(left.values()):
            for t in batches:
                if left[t]:
                    steps.append([t])
                    left[t] -= 1
        return steps


@SCHEDULES.register(name="interleaved")
class Interleaved:
    """Every step takes one batch of every task (losses combined by the weighting) until the
    largest task is exhausted; smaller tasks are sampled circularly."""

    def plan(self, batches, epoch, num_epochs, rng):
        return [list(batches) for _ in range(max(batches.values()))]


class _Proportional:
    """One task per step, drawn with probability p_t; as many steps as there are batches."""

    def probs(self, batches, epoch, num_epochs) -> dict[str, float]:
        raise NotImplementedError

    def plan(self, batches, epoch, num_epochs, rng):
        p = self.probs(batches, epoch, num_epochs)
        names = list(p)
        return [[t] for t in rng.choices(names, weights=[p[t] for t in names], k=sum(batches.values()))]


@SCHEDULES.register(name="annealed")
class Annealed(_Proportional):
    """p_t ∝ N_t^α with α = 1 - decay * epoch / (E - 1) (Stickland & Murray, 2019): from
    size-proportional sampling towards uniform as training proceeds."""

    def __init__(self, decay: float = 0.8):
        self.decay = decay

    def alpha(self, epoch: int, num_epochs: int) -> float:
        return 1.0 - self.decay * (epoch / (num_epochs - 1) if num_epochs > 1 else 0.0)

    def probs(self, batches, epoch, num_epochs):
        a = self.alpha(epoch, num_epochs)
        z = {t: n ** a for t, n in batches.items()}
        s = sum(z.values())
        return {t: v / s for t, v in z.items()}


@SCHEDULES.register(name="biased")
class Biased(_Proportional):
    """p_t ∝ w_t with user weights (paper 003's biased sampling); unlisted tasks get weight 1."""

    def __init__(self, weights: dict | None = None):
        self.weights = dict(weights or {})
        if any(w < 0 for w in self.weights.values()):
            raise ConfigError("biased sampling weights must be non-negative")

    def probs(self, batches, epoch, num_epochs):
        unknown = sorted(set(self.weights) - set(batches))
        if unknown:
            raise ConfigError(f"biased sampling: weights for unknown tasks {unknown}; tasks are {list(batches)}")
        w = {t: float(self.weights.get(t, 1.0)) for t in batches}
        s = sum(w.values())
        if s <= 0:
            raise ConfigError("biased sampling weights sum to zero")
        return {t: v / s for t, v in w.items()}
