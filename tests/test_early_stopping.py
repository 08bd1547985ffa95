"""train.early_stopping: the counting rule, a run that stops, and --resume keeping the counters."""
import json

import pytest
import torch

from mtbert.core.errors import ConfigError
from mtbert.core.rundir import TRAIN_STATE
from mtbert.training import state
from mtbert.training.early_stopping import EarlyStopping
from mtbert.training.trainer import Trainer


def test_patience_counts_evaluations_without_enough_gain():
    stop = EarlyStopping(["sst", "qqp", "sts"], patience=2, min_delta=0.01, metric="sts")
    seen = [stop.update({"sst": 0.2, "sts": v}) for v in (0.5, 0.505, 0.52, 0.51, 0.525)]
    # 0.505 is not 0.01 better than 0.5 (1 bad); 0.52 is (reset); 0.51 (1), 0.525 (not > 0.53: 2 -> stop)
    assert seen[:4] == [None] * 4 and "did not improve" in seen[4]
    assert stop.best == 0.52
    overall = EarlyStopping(["sst"], patience=1)
    assert overall.update({"sst": 0.4}) is None and overall.update({"sst": 0.4}) is not None


@pytest.mark.parametrize("options,message", [
    ({"patience": 0}, "patience"), ({"patience": 2, "metric": "mnli"}, "metric"),
    ({"patience": 2, "min_delta": -1}, "min_delta"), ({"patiense": 2}, "takes patience"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        EarlyStopping.from_config(options, ["sst", "qqp", "sts"])


def _rows(run):
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


# Evaluations every 2 steps; no evaluation can gain 10 points, so the 1st sets the best, the 2nd and 3rd
# count, and the run stops at the 3rd (step 6 of 12).
RUN = ["train.max_steps=12", "train.epochs=3", "train.eval_every=2", "train.threads=1",
       "train.early_stopping={patience: 2, min_delta: 10.0, metric: overall}"]


def test_run_stops_early_and_finishes_cleanly(tmp_path, tiny_cfg):
    summary = Trainer(tiny_cfg(*RUN), tmp_path / "run").run()
    assert summary["steps"] == 6 and "early stopping" in summary["stopped"]
    assert [r["step"] for r in _rows(tmp_path / "run")] == [2, 4, 6]
    assert not (tmp_path / "run" / "last").exists() and (tmp_path / "run" / "best").exists()


class Crash(Exception):
    pass


def test_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path, tiny_cfg, monkeypatch):
    expected = Trainer(tiny_cfg(*RUN), tmp_path / "full").run()
    step = Trainer.train_step

    def crash_after_5(self, tasks):  # the state saved at step 4 holds one bad evaluation
        out = step(self, tasks)
        if self.step == 5:
            raise Crash
        return out
    monkeypatch.setattr(Trainer, "train_step", crash_after_5)
    with pytest.raises(Crash):
        Trainer(tiny_cfg(*RUN), tmp_path / "run").run()
    monkeypatch.undo()
    saved = state.find_state(tmp_path / "run")
    assert json.loads((saved / "meta.json").read_text())["step"] == 4
    assert torch.load(saved / TRAIN_STATE, weights_only=True)["early_stopping"]["bad_evals"] == 1
    summary = Trainer(tiny_cfg(*RUN), tmp_path / "run", resume=True).run()
    # the bad evaluation was restored, not counted afresh (that would stop at 8)
    assert summary["steps"] == expected["steps"] == 6 and summary["best_dev"] == expected["best_dev"]
