"""A time budget that plans: the refitted LR decay, the planner's arithmetic, and a tiny run over
a fake clock (each step takes a second, each evaluation two) that fits its plan, stops at the hard
limit when the machine slows down, and goes on with --resume."""
from __future__ import annotations

import json
import re
import types

import pytest

from mtbert.apps.cli import main
from mtbert.training import budget as budget_module
from mtbert.training import state as state_module
from mtbert.training import trainer as trainer_module
from mtbert.training.budget import BudgetPlanner, epochs_spanned, whole_epochs
from mtbert.training.optimizer import WarmupLinearDecay
from mtbert.training.schedules import Annealed
from tests.conftest import TINY_YAML

# ---------------------------------------------------------------- the LR factor

def test_refit_within_warmup_is_the_shorter_plans_own_schedule():
    factor = WarmupLinearDecay(100, 1000)
    factor.refit(step=20, total=500, warmup=50)
    fresh = WarmupLinearDecay(50, 500)
    assert [factor(s) for s in range(20, 501)] == [fresh(s) for s in range(20, 501)]


def test_refit_after_warmup_decays_from_where_the_lr_is_to_zero_at_the_new_end():
    factor = WarmupLinearDecay(100, 1000)
    before = factor(400)
    factor.refit(step=400, total=600, warmup=60)
    assert factor(400) == pytest.approx(before)  # no jump
    assert factor(500) == pytest.approx(before / 2) and factor(600) == 0.0
    values = [factor(s) for s in range(400, 601)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never warms up again


def test_refit_past_the_new_warmup_inside_the_old_one_takes_the_new_plans_schedule():
    factor = WarmupLinearDecay(357, 3576)
    factor.refit(step=40, total=380, warmup=38)  # the new plan's warm-up is over at step 40
    fresh = WarmupLinearDecay(38, 380)
    assert [factor(s) for s in range(40, 381)] == [fresh(s) for s in range(40, 381)]
    assert factor(40) > 0.99  # not frozen at the old warm-up's 0.115


def test_a_later_refit_never_warms_up_again():
    factor = WarmupLinearDecay(357, 3576)
    factor.refit(step=40, total=380, warmup=38)
    factor.refit(step=100, total=1200, warmup=120)  # lengthened: decays from here, slower
    now = factor(100)
    values = [factor(s) for s in range(100, 1201)]
    assert values[0] == pytest.approx(now) and all(a >= b for a, b in zip(values, values[1:]))
    assert factor(1200) == 0.0


# ---------------------------------------------------------------- the planner

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    fake = types.SimpleNamespace(time=c, perf_counter=c)
    monkeypatch.setattr(budget_module, "time", fake)
    monkeypatch.setattr(trainer_module, "time", fake)
    monkeypatch.setattr(state_module, "time", fake)
    return c


def _steps(planner, clock, n, seconds):
    for _ in range(n):
        clock.now += seconds
        planner.step_done()


def test_the_planner_fits_steps_and_evaluations_into_the_time_left(clock):
    evaluations = lambda start, end: len([e for e in (100, 200, 300) if start < e < end]) + 1  # noqa: E731
    planner = BudgetPlanner(budget_min=5, evaluations=evaluations, eval_in_steps=10)
    _steps(planner, clock, budget_module.WARMUP_STEPS, 5.0)  # the first steps are slow: not counted
    _steps(planner, clock, budget_module.MEASURED_STEPS, 2.0)
    assert planner.first_check_due() and planner.step_seconds == pytest.approx(2.0)
    step = 40
    # the first check expects later steps EARLY_SLOWDOWN times faster: 2 s -> 1.2 s a step
    assert planner.fit(step, planned=200, elapsed_s=70.0) is None  # 160 x 1.21 s + 2 evaluations of 12 s fit 223 s
    _steps(planner, clock, 10, 2.0)  # a later check sees 2 s a step: the plan no longer fits
    elapsed = 130.0
    fitted = planner.fit(step, planned=400, elapsed_s=elapsed)
    left = budget_module.SAFETY * (300 - elapsed)

    def cost(end):
        return 2.0 * (end - step) + 20.0 * evaluations(step, end)  # (an evaluation guessed at 10 steps)
    assert cost(fitted) <= left < cost(fitted + 1)
    assert planner.fit(step, planned=fitted, elapsed_s=elapsed) is None  # the fitted plan fits
    clock.now += 60.0
    planner.evaluation_done(60.0)  # an evaluation costs more than guessed: the next fit shortens again
    assert planner.step_seconds == pytest.approx(2.0)  # (evaluations are not steps)
    assert planner.fit(step, planned=fitted, elapsed_s=elapsed) < fitted


def test_checks_come_every_twentieth_of_the_budget_between_evaluations(clock):
    planner = BudgetPlanner(budget_min=10, evaluations=lambda start, end: 1, eval_in_steps=0)
    _steps(planner, clock, budget_module.WARMUP_STEPS + budget_module.MEASURED_STEPS, 1.0)
    assert planner.check_due()
    planner.fit(40, planned=100, elapsed_s=40.0)
    _steps(planner, clock, 29, 1.0)
    assert not planner.check_due()  # 29 s after the first, of a 600 s budget
    _steps(planner, clock, 1, 1.0)
    assert planner.check_due()


def test_a_later_fit_lengthens_a_plan_that_slow_early_steps_cut_too_short(clock):
    planner = BudgetPlanner(budget_min=10, evaluations=lambda start, end: 1, eval_in_steps=0)
    _steps(planner, clock, budget_module.WARMUP_STEPS, 1.0)
    _steps(planner, clock, budget_module.MEASURED_STEPS, 6.0)  # the measured steps still very slow
    first = planner.fit(40, planned=600, elapsed_s=100.0, most=600)
    assert first < 600
    _steps(planner, clock, 200, 1.0)  # then the steps settle at 1 s
    later = planner.fit(240, planned=first, elapsed_s=400.0, most=600)
    assert later is not None and first < later <= 600
    assert planner.fit(240, planned=later, elapsed_s=400.0, most=600) is None  # no change without news


def test_the_first_check_cuts_only_a_plan_that_overruns_even_at_the_later_speed(clock):
    planner = BudgetPlanner(budget_min=10, evaluations=lambda start, end: 1, eval_in_steps=0)
    _steps(planner, clock, budget_module.WARMUP_STEPS + budget_module.MEASURED_STEPS, 1.0)
    # 560 steps of 1 s against 500 s left: over at the measured speed, not at 1 / 1.65 s
    assert planner.fit(40, planned=600, elapsed_s=100.0, most=600) is None
    assert planner.fit(40, planned=600, elapsed_s=100.0, most=600) < 600  # a later check: it is over


def test_epochs_spanned_by_a_plan():
    assert epochs_spanned([10, 10, 10, 10], 25) == 2.5 and whole_epochs([10, 10, 10, 10], 25) == 3
    assert whole_epochs([10, 10], 10) == 1 and whole_epochs([10, 10], 0) == 1


# ---------------------------------------------------------------- a budgeted run

def timed(monkeypatch, clock, step_s: float, eval_s: float = 2.0, slow_after: int | None = None):
    """Make each training step take step_s seconds (10x that after step `slow_after`) and each
    evaluation eval_s on the fake clock."""
    real_step, real_eval = trainer_module.Trainer.train_step, trainer_module.Trainer.evaluate

    def step(self, tasks):
        clock.now += step_s * (10 if slow_after is not None and self.step >= slow_after else 1)
        return real_step(self, tasks)

    def evaluate(self):
        clock.now += eval_s
        return real_eval(self)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)


# 18 steps an epoch (48 examples a task in batches of 8, one task a step), 8 epochs: 144 steps
# configured; the budget (2 minutes of 1-second steps and 2-second evaluations) fits about 90.
BUDGETED = ["train.epochs=8", "train.time_budget_min=2", "train.schedule=annealed", "train.int8_check=false"]


def run_args(run, data_dir, *extra):
    return ["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(data_dir),
            *[a for s in (*BUDGETED, *extra) for a in ("--set", s)]]


def test_a_budgeted_run_fits_its_plan_and_says_so_once(tmp_path, data_dir, clock, monkeypatch, capsys):
    timed(monkeypatch, clock, step_s=1.0)
    run = tmp_path / "run"
    assert main(run_args(run, data_dir)) == 0
    err = capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["configured_steps"] == 144 and 40 < summary["planned_steps"] < 144
    assert summary["steps"] == summary["planned_steps"] and "stopped" not in summary
    assert summary["train_seconds"] <= 120  # the whole plan ran inside the budget
    assert err.count("LR decay fitted") == 1
    assert re.search(r"at 1.00 s/step the 2-minute budget fits \d+ of 144 steps \([\d.]+ of 8 epochs\); LR decay fitted", err)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == summary["planned_steps"] and rows[-1]["lr"] == 0.0  # decayed to zero at the end
    assert not (run / "last").exists()


def test_sampling_follows_the_fitted_plan(tmp_path, data_dir, clock, monkeypatch):
    """The annealed schedule plans the epochs after a fit for the epochs the plan now spans, so its
    mix reaches the uniform end in the last of them."""
    timed(monkeypatch, clock, step_s=1.0)
    seen = []
    real_plan = Annealed.plan

    def plan(self, batches, epoch, num_epochs, rng):
        seen.append((epoch, num_epochs))
        return real_plan(self, batches, epoch, num_epochs, rng)
    monkeypatch.setattr(Annealed, "plan", plan)
    trainer = trainer_module.Trainer(_cfg(data_dir), tmp_path / "run")
    summary = trainer.run()
    spanned = whole_epochs([18] * 8, summary["planned_steps"])
    assert len(trainer.plans) == spanned < 8
    assert seen[-1] == (spanned - 1, spanned)  # the last epoch planned is the plan's last, at its end mix
    positions = trainer.sampling_positions[:spanned]
    assert positions[-1] == 1.0 and all(a <= b for a, b in zip(positions, positions[1:]))  # never back


def _cfg(data_dir, *extra):
    from mtbert.core.config import load_config
    return load_config(TINY_YAML, [*BUDGETED, f"data.data_dir={data_dir}", *extra])


def test_max_steps_replays_a_fitted_plans_length_and_sampling(tmp_path, data_dir, monkeypatch):
    seen = []
    real_plan = Annealed.plan
    monkeypatch.setattr(Annealed, "plan", lambda self, b, e, n, rng: seen.append((e, n)) or real_plan(self, b, e, n, rng))
    trainer = trainer_module.Trainer(_cfg(data_dir, "train.time_budget_min=null", "train.max_steps=20"),
                                     tmp_path / "run")
    assert trainer.total_steps == 20 and trainer.configured_steps == 20  # (the ceiling of a budget's fits)
    assert {n for _, n in seen[-8:]} == {2}  # 20 steps span 2 epochs: annealing planned over 2
    assert [trainer.lr_factor(s) for s in range(22)] == [WarmupLinearDecay(2, 20)(s) for s in range(22)]


def test_the_hard_limit_stops_resumably_and_resume_finishes_the_fitted_plan(tmp_path, data_dir, clock, monkeypatch,
                                                                           capsys):
    timed(monkeypatch, clock, step_s=1.0, slow_after=50)  # the machine slows down after the fit
    run = tmp_path / "run"
    assert main(run_args(run, data_dir)) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "time budget" and summary["steps"] < summary["planned_steps"]
    assert f"stopped by the time budget at step {summary['steps']} of {summary['planned_steps']}" in out
    assert (run / "last" / "train_state.pt").exists()
    planned = summary["planned_steps"]
    timed(monkeypatch, clock, step_s=1.0)
    assert main(["train", "--resume", str(run), "--set", "train.time_budget_min=100"]) == 0
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["steps"] == resumed["planned_steps"] == planned and "stopped" not in resumed
    assert not (run / "last").exists()


def test_a_budget_of_zero_stops_after_the_first_step(tmp_path, data_dir):
    summary = trainer_module.Trainer(_cfg(data_dir, "train.time_budget_min=0"), tmp_path / "run").run()
    assert summary["steps"] == 1 and summary["stopped"] == "time budget"


def test_runs_without_a_budget_do_not_depend_on_the_clock(tmp_path, data_dir, clock, monkeypatch):
    cfg = _cfg(data_dir, "train.time_budget_min=null", "train.epochs=2", "train.eval_every=5")
    timed(monkeypatch, clock, step_s=1.0)
    a = trainer_module.Trainer(cfg, tmp_path / "a").run()
    timed(monkeypatch, clock, step_s=100.0)
    b = trainer_module.Trainer(cfg, tmp_path / "b").run()
    assert a["best_dev"] == b["best_dev"] and a["planned_steps"] == b["planned_steps"] == 36


class Crash(Exception):
    pass


def test_a_fitted_plan_is_part_of_the_resumable_state(tmp_path, data_dir, clock, monkeypatch):
    """A run killed right after the first save of a fitted plan resumes with that plan: its steps,
    its epochs' tasks and its LR decay."""
    timed(monkeypatch, clock, step_s=1.0)
    save, saved = state_module.save, {}

    def save_then_crash(trainer):
        save(trainer)
        if trainer.total_steps < trainer.configured_steps:  # (the first check, at step 40, fitted the plan)
            saved.update(step=trainer.step, total_steps=trainer.total_steps, plans=trainer.plans,
                         lr=[trainer.lr_factor(s) for s in range(trainer.total_steps + 1)])
            raise Crash
    monkeypatch.setattr(state_module, "save", save_then_crash)
    with pytest.raises(Crash):
        trainer_module.Trainer(_cfg(data_dir), tmp_path / "run").run()
    monkeypatch.setattr(state_module, "save", save)
    fresh = trainer_module.Trainer(_cfg(data_dir), tmp_path / "run", resume=True)
    assert fresh.step == saved["step"] and fresh.total_steps == saved["total_steps"] and fresh.plans == saved["plans"]
    assert [fresh.lr_factor(s) for s in range(fresh.total_steps + 1)] == saved["lr"]


def test_a_budget_never_lengthens_the_plan_past_max_steps(tmp_path, data_dir, clock, monkeypatch):
    timed(monkeypatch, clock, step_s=0.01)  # plenty of time: a fit could lengthen the plan
    summary = trainer_module.Trainer(_cfg(data_dir, "train.max_steps=60", "train.eval_every=20"),
                                     tmp_path / "run").run()
    assert summary["steps"] == summary["planned_steps"] == summary["configured_steps"] == 60


def test_a_run_that_finishes_its_plan_is_not_stopped_by_the_clock(tmp_path, data_dir, clock, monkeypatch):
    timed(monkeypatch, clock, step_s=1.0, eval_s=0.0)
    # three 1-second steps against a 2.4-second budget: the third ends the plan past the limit
    summary = trainer_module.Trainer(_cfg(data_dir, "train.max_steps=3", "train.time_budget_min=0.04"),
                                     tmp_path / "run").run()
    assert summary["steps"] == 3 and "stopped" not in summary and not (tmp_path / "run" / "last").exists()
