"""A time budget that plans instead of truncating.

Budgeted training (Li, Yumer and Ramanan, ICLR 2020) found that a learning rate decayed linearly to
zero at the budget beats a longer schedule cut off by it. So with `train.time_budget_min` the
trainer measures what a step and an evaluation cost on this machine, and whenever the rest of its
plan no longer fits the rest of the budget it shortens the plan: fewer steps, the LR decay refitted
to end inside the budget (optimizer.WarmupLinearDecay.refit), and task sampling refitted to the
epochs the plan now spans (the annealed schedule reaches its final mix in the last of them).

It fits after a short warm-up of steps (the first steps pick kernels and grow the allocator: they
are not representative) and again after each evaluation, with the evaluations' measured cost and
more steps measured. A later fit may also lengthen the plan again (up to the configured one) where
the first one, from few steps, was too cautious; the LR decay then ends later, from where it is,
and is never warmed up again. The plan is part of the resumable state; its timings are not.
The budget itself stays a hard limit (trainer._over_budget) for a machine that slows down later.
"""
from __future__ import annotations

import math
import time
from typing import Callable

WARMUP_STEPS = 10   # steps of each process that the cost per step leaves out
MEASURED_STEPS = 30  # steps measured after them before the first fit
SAFETY = 0.97        # a fitted plan aims at this share of the time left (noise must not trip the hard limit)
TOO_SHORT = 0.10     # a fitted plan under this share of the configured one gets a warning
EXTEND_MARGIN = 0.10  # a fit lengthens the plan only for this share more of its remaining steps
FIRST_FIT_DOUBT = 1.25  # the first fit, from few early steps, acts only on a plan this much over the time left


class BudgetPlanner:
    """Measures step and evaluation costs, and fits the number of planned steps into the budget.

    `evaluations(start, end)` counts the evaluations the plan holds in steps (start, end], the
    final one included."""

    def __init__(self, budget_min: float, evaluations: Callable[[int, int], int], eval_in_steps: float):
        self.budget_s = 60.0 * budget_min
        self.evaluations = evaluations
        self.eval_in_steps = eval_in_steps  # an evaluation's guessed cost in training steps, until one is timed
        self.eval_seconds: list[float] = []
        self.session_steps = 0
        self.measure_from: tuple[float, int, float] | None = None  # (clock, steps, evaluation seconds) after warm-up
        self.eval_total = 0.0

    # ------------------------------------------------------------ measuring
    def step_done(self) -> None:
        self.session_steps += 1
        if self.session_steps == WARMUP_STEPS:
            self.measure_from = (time.perf_counter(), self.session_steps, self.eval_total)

    def evaluation_done(self, seconds: float) -> None:
        self.eval_seconds.append(seconds)
        self.eval_total += seconds

    @property
    def step_seconds(self) -> float | None:
        """Mean seconds per training step since the warm-up (saves included, evaluations not)."""
        if self.measure_from is None:
            return None
        clock, steps, evals = self.measure_from
        n = self.session_steps - steps
        if n <= 0:
            return None
        return (time.perf_counter() - clock - (self.eval_total - evals)) / n

    def evaluation_seconds(self, per_step: float) -> float:
        """The costliest of the last three evaluations (they save checkpoints too), or the guess."""
        return max(self.eval_seconds[-3:]) if self.eval_seconds else self.eval_in_steps * per_step

    def ready(self) -> bool:
        """Whether the first fit is due (after the warm-up and the measured steps)."""
        return self.session_steps == WARMUP_STEPS + MEASURED_STEPS

    # ------------------------------------------------------------ fitting
    def fit(self, step: int, planned: int, elapsed_s: float, most: int | None = None,
            first: bool = False) -> int | None:
        """The number of planned steps that fits the time left, if it differs enough from `planned`
        (else None): fewer where the plan no longer fits; more, up to `most` (the configured plan),
        where measurement shows EXTEND_MARGIN more room (an earlier fit from warm-up steps that
        ran slow, or a machine that got faster). The `first` fit, from the few steps after the
        warm-up (early steps run slow: 1.65x on the base run), shortens only a plan more than
        FIRST_FIT_DOUBT over the time left; a closer call waits for the first evaluation."""
        per_step = self.step_seconds
        if per_step is None:
            return None
        left = self.budget_s - elapsed_s

        def cost(end: int) -> float:
            return (end - step) * per_step + self.evaluations(step, end) * self.evaluation_seconds(per_step)

        target = SAFETY * left
        lo, hi = step, max(planned, most or planned)  # the largest end with cost(end) <= target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid - 1)
        fits = max(lo, step + 1)
        if cost(planned) > left * (FIRST_FIT_DOUBT if first else 1.0):
            return fits
        if not first and fits > planned + EXTEND_MARGIN * (planned - step):
            return fits
        return None


def fit_message(per_step: float, budget_min: float, planned: int, configured: int, epochs: float,
                configured_epochs: int) -> str:
    """The one line a fit prints, e.g. 'at 1.54 s/step the 55-minute budget fits 2,050 of 3,576
    steps (2.3 of 4 epochs); LR decay fitted'."""
    return (f"at {per_step:.2f} s/step the {budget_min:g}-minute budget fits {planned:,} of {configured:,} steps "
            f"({epochs:.1f} of {configured_epochs} epochs); LR decay fitted")


def too_short_warning(planned: int, configured: int, cause: str) -> str | None:
    if planned >= TOO_SHORT * configured:
        return None
    return (f"the time budget fits only {planned / configured:.0%} of the configured steps ({cause}); "
            f"expect a weak model: raise train.time_budget_min or train a smaller recipe")


def epochs_spanned(epoch_lengths: list[int], steps: int) -> float:
    """How many epochs (fractional) the first `steps` steps cover."""
    done = 0.0
    for length in epoch_lengths:
        if steps <= 0:
            break
        done += min(1.0, steps / length) if length else 1.0
        steps -= length
    return done


def whole_epochs(epoch_lengths: list[int], steps: int) -> int:
    """The number of epochs that the first `steps` steps reach into."""
    return max(1, math.ceil(epochs_spanned(epoch_lengths, steps) - 1e-9))
