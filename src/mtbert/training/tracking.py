"""Experiment trackers (`train.report_to: [tensorboard, mlflow]`): each receives every row the run
writes to metrics.jsonl, as the same numbers, at the row's optimizer step. Local stores only:

- tensorboard: event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`);
- mlflow: a SQLite store RUN_DIR/mlflow.db, experiment "mtbert", one MLflow run per mtbert run
  (`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`); the config goes in as params.

`--resume` continues the same logs: TensorBoard drops the events logged after the saved state
(as metrics.jsonl drops those rows); MLflow reopens the same run (its id is kept in
RUN_DIR/mlflow_run_id), but cannot delete points, so an evaluation logged between the last save
and a kill appears twice there (same step, same value on CPU). Trackers are optional extras
(`pip install 'mtbert[track]'`), imported only when configured.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from mtbert.core.errors import ConfigError
from mtbert.core.io import lies_under
from mtbert.core.registry import Registry

TRACKERS: Registry[type] = Registry("tracker (train.report_to)")


def flatten(row: dict, prefix: str = "") -> dict[str, float]:
    """A metrics.jsonl row -> {"dev/sst": 0.5, "train_loss/qqp": 0.3, "lr": ..., ...}; `step` is the x-axis."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step":
            out[key] = float(v)
    return out


class Tracker:
    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        """`resume_step`: the step of the restored state when resuming, else None."""

    def log(self, row: dict) -> None:
        raise NotImplementedError

    def close(self, ok: bool = True) -> None:
        pass


def own_path(run_dir: Path, name: str) -> Path:
    """RUN_DIR/name for a tracker to write, refused if it is a link (a resumed run someone else
    made must not write outside its directory)."""
    path = Path(run_dir) / name
    if path.is_symlink() or (path.exists() and not lies_under(path, run_dir)):
        raise ConfigError(f"{path} is a link: a tracker writes only inside the run directory; remove it")
    return path


@TRACKERS.register(name="tensorboard")
class TensorBoard(Tracker):
    def __init__(self, run_dir, config, resume_step):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("train.report_to tensorboard needs the `tensorboard` package "
                              "(pip install 'mtbert[track]')") from e
        # purge_step: events at later steps (logged after the state we resume from) are discarded
        self.writer = SummaryWriter(str(own_path(run_dir, "tensorboard")),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row):
        for key, value in flatten(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])
        self.writer.flush()

    def close(self, ok=True):
        self.writer.close()


@TRACKERS.register(name="mlflow")
class MLflow(Tracker):
    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, run_dir, config, resume_step):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ConfigError("train.report_to mlflow needs the `mlflow-skinny` package "
                              "(pip install 'mtbert[track]')") from e
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its schema-migration chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{own_path(run_dir, 'mlflow.db').resolve()}")
        id_file = own_path(run_dir, self.RUN_ID_FILE)
        if resume_step is not None and id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name("mtbert")
        exp_id = exp.experiment_id if exp else self.client.create_experiment("mtbert")
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        id_file.write_text(self.run_id + "\n")
        from mlflow.entities import Param
        params = [Param(k, str(v)[:6000]) for k, v in _flat_config(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i: i + 100])

    def log(self, row):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, row["step"]) for k, v in flatten(row).items()])

    def close(self, ok=True):
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def _flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and prefix.count(".") < 1:  # sections; technique options stay as one value
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_trackers(names: list[str], run_dir: Path, config: dict, resume_step: int | None) -> list[Tracker]:
    if len(set(names)) != len(names):
        raise ConfigError(f"train.report_to lists a tracker twice: {names}")
    return [TRACKERS.get(n)(Path(run_dir), config, resume_step) for n in names]


def check_trackers(names) -> None:
    """Unknown names fail when the run is configured, not at its first evaluation."""
    if not isinstance(names, list):
        raise ConfigError(f"train.report_to must be a list of tracker names ({', '.join(TRACKERS)}), got {names!r}")
    for n in names:
        TRACKERS.get(n)
