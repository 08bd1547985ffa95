import random
from collections import Counter

import pytest

from mtbert.training.schedules import SCHEDULES, Annealed, build_schedule

BATCHES = {"sst": 6, "qqp": 10, "sts": 3}


def _counts(plan):
    return Counter(t for step in plan for t in step)


def test_sequential_visits_each_task_once_in_blocks():
    plan = build_schedule("sequential").plan(BATCHES, 0, 1, random.Random(0))
    assert _counts(plan) == Counter(BATCHES)
    assert [s[0] for s in plan] == ["sst"] * 6 + ["qqp"] * 10 + ["sts"] * 3


def test_round_robin_alternates_then_drops_exhausted():
    plan = build_schedule("round_robin").plan(BATCHES, 0, 1, random.Random(0))
    assert _counts(plan) == Counter(BATCHES)
    assert [s[0] for s in plan[:6]] == ["sst", "qqp", "sts"] * 2
    assert [s[0] for s in plan[-4:]] == ["qqp"] * 4


def test_interleaved_takes_every_task_each_step_until_largest_is_done():
    plan = build_schedule("interleaved").plan(BATCHES, 0, 1, random.Random(0))
    assert len(plan) == 10 and all(sorted(s) == sorted(BATCHES) for s in plan)
    assert _counts(plan) == {"sst": 10, "qqp": 10, "sts": 10}  # smaller tasks cycle


@pytest.mark.parametrize("epoch,alpha", [(0, 1.0), (2, 0.6), (4, 0.2)])
def test_annealed_frequencies_follow_size_to_the_alpha(epoch, alpha):
    sched = Annealed(decay=0.8)
    assert sched.alpha(epoch, 5) == pytest.approx(alpha)
    big = {"a": 4000, "b": 1000, "c": 250}
    plan = sched.plan(big, epoch, 5, random.Random(epoch))
    n = len(plan)
    assert n == sum(big.values())
    z = sum(v ** alpha for v in big.values())
    for t, c in _counts(plan).items():
        assert c / n == pytest.approx(big[t] ** alpha / z, abs=0.015)


def test_biased_frequencies_follow_weights():
    plan = build_schedule("biased", weights={"sst": 1.0, "qqp": 1.7, "sts": 1.0}).plan(
        {"sst": 2000, "qqp": 2000, "sts": 2000}, 0, 1, random.Random(1))
    freq = {t: c / len(plan) for t, c in _counts(plan).items()}
    assert freq["qqp"] == pytest.approx(1.7 / 3.7, abs=0.015)
    assert freq["sst"] == pytest.approx(1 / 3.7, abs=0.015)
    with pytest.raises(ValueError):
        build_schedule("biased", weights={"sst": -1})


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match="round_robin"):
        build_schedule("zigzag")
    assert {"sequential", "round_robin", "interleaved", "annealed", "biased"} <= set(SCHEDULES)
