"""A time budget that plans instead of truncating.

Budgeted training (Li, Yumer and Ramanan, ICLR 2020) found that a learning rate decayed linearly to
zero at the budget beats a longer schedule cut off by it. So with `train.time_budget_min` the
trainer measures what a step and an evaluation cost on this machine, and whenever the rest of its
plan no longer fits the rest of the budget it shortens the plan: fewer steps, the LR decay refitted
to end inside the budget (optimizer.WarmupLinearDecay.refit), and task sampling refitted to the
epochs the plan now spans (the annealed schedule reaches its final mix in the last of them).

When it checks: after a short warm-up of steps, after each evaluation, and every CHECK_SHARE of the
budget in between. Early steps are not representative (they pick kernels for each new batch shape
and grow the allocator: 1.65x the later cost on the base run, 1.5x on make train's recipe capped to
AVX2), so the first check assumes steps will get EARLY_SLOWDOWN times faster and only cuts a plan
that overruns even then; later checks use the recent steps' cost (the last WINDOW steps) and the
evaluations' measured cost, and may also lengthen the plan again, up to the configured one, where
an earlier cut was too cautious. The plan is part of the resumable state; its timings are not. The
budget itself stays a hard limit (trainer._budget_spent) for a machine that slows down later.
"""
from __future__ import annotations

import collections
import math
import time
from typing import Callable

WARMUP_STEPS = 10     # steps of each process that the cost per step leaves out
MEASURED_STEPS = 30   # steps measured after them before the first check
WINDOW = 200          # the steps whose mean cost later checks use
EARLY_SLOWDOWN = 1.65  # how much slower the first steps ran than later ones (base run)
CHECK_SHARE = 0.05    # a check every this share of the budget, besides those after evaluations
SAFETY = 0.97         # a fitted plan aims at this share of the time left (noise must not trip the hard limit)
TOO_SHORT = 0.10      # a fitted plan under this share of the configured one gets a warning
EXTEND_MARGIN = 0.10  # a fit lengthens the plan only for this share more of its remaining steps


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
        self.eval_total = 0.0
        # (clock, evaluation seconds so far) after each step since the warm-up, the last WINDOW + 1
        self.marks: collections.deque = collections.deque(maxlen=WINDOW + 1)
        self.checked_at: float | None = None  # the clock at the last check

    # ------------------------------------------------------------ measuring
    def step_done(self) -> None:
        self.session_steps += 1
        if self.session_steps >= WARMUP_STEPS:
            self.marks.append((time.perf_counter(), self.eval_total))

    def evaluation_done(self, seconds: float) -> None:
        self.eval_seconds.append(seconds)
        self.eval_total += seconds

    @property
    def step_seconds(self) -> float | None:
        """Mean seconds per training step over the last WINDOW steps since the warm-up (saves
        included, evaluations not)."""
        if len(self.marks) < 2:
            return None
        (t0, e0), (t1, e1) = self.marks[0], self.marks[-1]
        return (t1 - t0 - (e1 - e0)) / (len(self.marks) - 1)

    def evaluation_seconds(self, per_step: float) -> float:
        """The costliest of the last three evaluations (they save checkpoints too), or the guess."""
        return max(self.eval_seconds[-3:]) if self.eval_seconds else self.eval_in_steps * per_step

    def first_check_due(self) -> bool:
        return self.session_steps == WARMUP_STEPS + MEASURED_STEPS

    def check_due(self) -> bool:
        """Whether a check between evaluations is due: the first one, then every CHECK_SHARE of the budget."""
        if self.first_check_due():
            return True
        return self.checked_at is not None and time.perf_counter() - self.checked_at >= CHECK_SHARE * self.budget_s

    # ------------------------------------------------------------ fitting
    def fit(self, step: int, planned: int, elapsed_s: float, most: int | None = None) -> int | None:
        """The number of planned steps that fits the time left, if it differs enough from `planned`
        (else None): fewer where the plan no longer fits; more, up to `most` (the configured plan),
        where measurement shows EXTEND_MARGIN more room. The first check, from a few early steps,
        assumes later steps EARLY_SLOWDOWN times faster, and only shortens."""
        per_step = self.step_seconds
        if per_step is None:
            return None
        first = self.checked_at is None
        self.checked_at = time.perf_counter()
        if first:
            per_step /= EARLY_SLOWDOWN
        left = self.budget_s - elapsed_s

        def cost(end: int) -> float:
            return (end - step) * per_step + self.evaluations(step, end) * self.evaluation_seconds(per_step)

        target = SAFETY * left
        lo, hi = step, max(planned, most or planned)  # the largest end with cost(end) <= target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid - 1)
        fits = max(lo, step + 1)
        if cost(planned) > target:
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
