"""Early stopping (`train.early_stopping: {patience, min_delta, metric}`): stop the run after
`patience` evaluations in a row without the watched dev metric beating its best so far by more
than `min_delta`. `metric` is `overall` (the selection score: CS224N overall where defined, else
the mean task metric) or a task name (its dev metric: accuracy or Pearson). Every metric here is
higher-is-better. The counters are part of the resumable state, so `--resume` stops where an
uninterrupted run would."""
from __future__ import annotations

import math

from mtbert.core.errors import ConfigError
from mtbert.core.tasks import selection_score


class EarlyStopping:
    def __init__(self, tasks: list[str], patience: int, min_delta: float = 0.0, metric: str = "overall"):
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(f"train.early_stopping.patience must be an integer >= 1, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ConfigError(f"train.early_stopping.min_delta must be a number >= 0, got {min_delta!r}")
        if metric != "overall" and metric not in tasks:
            raise ConfigError(f"train.early_stopping.metric must be 'overall' or one of the run's tasks {tasks}, "
                              f"got {metric!r}")
        self.patience, self.min_delta, self.metric = patience, float(min_delta), metric
        self.best, self.bad_evals = -math.inf, 0

    @classmethod
    def from_config(cls, options: dict | None, tasks: list[str]) -> "EarlyStopping | None":
        if not options:
            return None
        unknown = sorted(set(options) - {"patience", "min_delta", "metric"})
        if unknown or "patience" not in options:
            raise ConfigError(f"train.early_stopping takes patience (required), min_delta and metric; got {sorted(options)}")
        return cls(tasks, **options)

    def value(self, metrics: dict) -> float:
        return selection_score(metrics) if self.metric == "overall" else metrics[self.metric]

    def update(self, metrics: dict) -> str | None:
        """Count one evaluation; the reason to stop, or None to go on."""
        value = self.value(metrics)
        if value > self.best + self.min_delta:
            self.best, self.bad_evals = value, 0
            return None
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            return (f"early stopping: dev {self.metric} did not improve by more than {self.min_delta:g} in "
                    f"{self.patience} evaluation(s) (best {self.best:.4f})")
        return None

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]
