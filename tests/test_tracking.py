"""train.report_to: TensorBoard and MLflow receive metrics.jsonl's numbers; --resume continues the logs."""
import json

import pytest

from mtbert.core.errors import ConfigError
from mtbert.training import state
from mtbert.training.tracking import flatten
from mtbert.training.trainer import Trainer

RUN = ["train.max_steps=6", "train.eval_every=2", "train.threads=1",
       "train.report_to=[tensorboard, mlflow]"]


def _rows(run):
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in RUN_DIR/tensorboard, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(run) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _expected(rows) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for row in rows:
        for key, value in flatten(row).items():
            out.setdefault(key, []).append((row["step"], value))
    return out


def _assert_series(got, expected):
    assert got.keys() == expected.keys() and {"dev/overall", "train_loss/sst", "lr", "task_weights/sts"} <= got.keys()
    for key in expected:
        assert [s for s, _ in got[key]] == [s for s, _ in expected[key]], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in expected[key]], rel=1e-6), key


class Crash(Exception):
    pass


def test_trackers_get_the_metrics_rows_and_resume_continues_them(tmp_path, tiny_cfg, monkeypatch):
    full = tmp_path / "full"
    Trainer(tiny_cfg(*RUN), full).run()
    rows = _rows(full)
    assert [r["step"] for r in rows] == [2, 4, 6]
    _assert_series(_tensorboard(full), _expected(rows))
    _assert_series(_mlflow(full), _expected(rows))

    # Killed after logging the step-4 evaluation but before saving its state: the resumed run
    # restarts from step 2 and evaluates step 4 again. TensorBoard drops the orphaned events.
    save = state.save

    def crash_at_4(trainer):
        if trainer.step == 4:
            raise Crash
        save(trainer)
    monkeypatch.setattr(state, "save", crash_at_4)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        Trainer(tiny_cfg(*RUN), run).run()
    monkeypatch.undo()
    assert [r["step"] for r in _rows(run)] == [2, 4]
    Trainer(tiny_cfg(*RUN), run, resume=True).run()
    assert _rows(run) == [{**r, "elapsed_s": s["elapsed_s"], "memory": s["memory"]} for r, s in zip(rows, _rows(run))]
    _assert_series(_tensorboard(run), _expected(_rows(run)))
    mlflow = _mlflow(run)  # one MLflow run throughout; the step-4 point is there twice (documented)
    assert [s for s, _ in mlflow["dev/overall"]] == [2, 4, 4, 6]


def test_unknown_tracker_is_refused_before_training(tmp_path, tiny_cfg):
    with pytest.raises(ValueError, match="unknown tracker"):
        Trainer(tiny_cfg("train.report_to=[wandb]"), tmp_path / "run")
    with pytest.raises(ConfigError, match="must be a list"):
        Trainer(tiny_cfg("train.report_to=tensorboard"), tmp_path / "run")
