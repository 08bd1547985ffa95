"""`mtbert tune`: search-space checks, trials as ordinary run directories, pruning, resuming a killed search."""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from mtbert.apps.cli import main
from mtbert.apps.tune import Space, run_tune
from mtbert.core.errors import ConfigError
from mtbert.inference.loading import load_predictor
from tests.conftest import TINY_YAML

SPACE = {
    "config": str(TINY_YAML),
    "common": ["train.max_steps=4", "train.eval_every=1", "train.threads=1", "data.limit=16"],
    "sampler": {"name": "random", "seed": 3},
    "pruner": {"name": "median", "n_startup_trials": 1},
    "params": {
        "train.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True},
        "train.schedule": {"type": "categorical", "choices": ["interleaved", "round_robin"]},
        "techniques": {"type": "categorical", "choices": [{}, {"pcgrad": {}}]},
    },
}


def _space(tmp_path, name="small", **changes):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


def _trials(tmp_path, name="small"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'runs' / name / 'study.db'}").trials


@pytest.mark.parametrize("params,message", [
    ({"train.lr_typo": {"type": "float", "low": 0.1, "high": 0.2}}, "unknown config key"),
    ({"techniques": {"type": "categorical", "choices": [{}, {"pcgrab": {}}]}}, "unknown technique"),
    ({"train.schedule_args": {"type": "categorical", "choices": [{"decay": 0.5}]}}, "unknown options"),
    ({"train.lr": {"type": "float", "low": 0.1}}, "numeric low and high"),
    ({"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "needs `type`"),
])
def test_bad_space_is_refused_before_the_first_trial(tmp_path, params, message):
    path = _space(tmp_path, params=params)
    with pytest.raises(ConfigError, match=message):
        run_tune(path, 2, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_search_trains_ordinary_runs_prunes_and_tabulates(tmp_path, data_dir):
    path = _space(tmp_path)
    args = ["tune", str(path), "--n-trials", "3", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--data-dir", str(data_dir)]
    assert main(args) == 0
    trials = _trials(tmp_path)
    assert [t.state.name for t in trials].count("COMPLETE") >= 1 and len(trials) == 3
    for t in trials:
        run = tmp_path / "runs" / "small" / f"trial-{t.number:03d}"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["train"]["lr"] == pytest.approx(t.params["train.lr"])  # the sampled values were used
        assert cfg["train"]["schedule"] == t.params["train.schedule"]
        assert yaml.safe_load(t.params["techniques"]) == cfg["techniques"]
        summary = json.loads((run / "summary.json").read_text())
        assert ("stopped" in summary) == (t.state.name == "PRUNED")  # a pruned trial stops, but finishes
        assert len(t.intermediate_values) == summary["steps"]  # every evaluation was reported
        assert load_predictor(run, device="cpu").tasks == ["sst", "qqp", "sts"]  # an ordinary run directory
    table = (tmp_path / "results" / "small.md").read_text()
    assert len([ln for ln in table.splitlines() if ln.startswith("| ")]) == 4
    assert "Best: trial" in table
    # run again: the study already holds 3 finished trials, so nothing trains
    assert main(args) == 0 and len(_trials(tmp_path)) == 3


def test_trials_are_pruned_at_an_evaluation_and_still_finish(tmp_path, data_dir):
    """A pruner that prunes every value below 2 (dev scores are at most 1): each trial stops at its
    first evaluation, with a summary that says why."""
    path = _space(tmp_path, pruner={"name": "threshold", "lower": 2.0})
    run_tune(path, 2, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results",
             extra=[f"data.data_dir={data_dir}"])
    for t in _trials(tmp_path):
        summary = json.loads((tmp_path / "runs" / "small" / f"trial-{t.number:03d}" / "summary.json").read_text())
        assert t.state.name == "PRUNED" and summary["steps"] == 1 and "pruned by optuna" in summary["stopped"]
    assert "pruned" in (tmp_path / "results" / "small.md").read_text()


def test_killed_search_resumes_from_its_study(tmp_path, data_dir):
    """SIGKILL during the second trial; running the command again keeps the first trial, marks the
    killed one failed (its heartbeat goes stale) and retries its parameters."""
    path = _space(tmp_path, heartbeat_s=1, pruner={"name": "none"},
                  common=SPACE["common"] + ["train.max_steps=30", "data.limit=48"])
    args = ["tune", str(path), "--n-trials", "2", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--data-dir", str(data_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "mtbert.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    second = tmp_path / "runs" / "small" / "trial-001" / "metrics.jsonl"
    deadline = time.time() + 240
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert second.exists(), "the second trial never started"
    first = tmp_path / "runs" / "small" / "trial-000" / "summary.json"
    stamp = first.stat().st_mtime_ns
    # past the killed trial's heartbeat grace period (2 s), which Optuna compares in SQLite's
    # whole-second timestamps and strictly: more than 2 s needs 3 whole seconds, so wait over 3
    time.sleep(4.0)
    assert main(args) == 0
    states = {t.number: t.state.name for t in _trials(tmp_path)}
    assert states[0] == "COMPLETE" and states[1] == "FAIL" and list(states.values()).count("COMPLETE") == 2
    retried = _trials(tmp_path)[2]
    assert retried.params == _trials(tmp_path)[1].params  # the interrupted parameters ran again
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not trained again


def test_space_checks_metric_and_keys(tmp_path):
    with pytest.raises(ConfigError, match="metric"):
        Space(_space(tmp_path, metric="mnli"))
    with pytest.raises(ConfigError, match="unknown keys"):
        Space(_space(tmp_path, trials=3))
