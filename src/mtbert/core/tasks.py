"""The task registry: what each task reads, how it is scored, and how its predictions are written.

Adding a task is one `TASKS.register(TaskSpec(...))` call. The output *kind* (core.kinds) carries
the loss, the prediction rule and the divergences, so tasks only declare data and metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtbert.core.kinds import BINARY, BINNED_STS, CLASSIFICATION, REGRESSION, OutputKind
from mtbert.core.registry import Registry


# ---------------------------------------------------------------- metrics

def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    if len(gold) == 0:
        raise ValueError("accuracy of an empty set")
    return float((pred == gold).mean())


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if len(gold) < 2:
        raise ValueError("Pearson correlation needs at least two examples")
    if pred.std() == 0 or gold.std() == 0:
        return 0.0  # undefined; a constant predictor carries no correlation
    return float(np.corrcoef(pred, gold)[0, 1])


# ---------------------------------------------------------------- tasks

@dataclass(frozen=True)
class TaskSpec:
    name: str
    file_stem: str                 # "ids-sst" -> ids-sst-train.csv / -dev.csv / -test-student.csv
    text_columns: tuple[str, ...]  # one column: single sentence; two: sentence pair
    label_column: str
    kind: OutputKind
    num_labels: int
    metric_name: str               # "accuracy" | "pearson"
    pred_prefix: str               # CS224N output files: {pred_prefix}-{dev|test}-output.csv
    pred_header: str               # e.g. Predicted_Sentiment
    label_range: tuple[float, float] | None = None  # valid gold values (inclusive)
    label_names: tuple[str, ...] | None = None
    variant_of: str | None = None  # same data, other head: counts as this task in the overall score

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def file(self, split: str) -> str:
        return f"{self.file_stem}-{'test-student' if split == 'test' else split}.csv"

    def parse_label(self, raw: str):
        """Raw CSV label -> int class or float score; ValueError if it is not a valid label."""
        value = float(raw)
        lo, hi = self.label_range if self.label_range else (-np.inf, np.inf)
        if not (lo <= value <= hi) or np.isnan(value):
            raise ValueError(f"label {raw!r} outside [{lo}, {hi}]")
        if self.kind.scores:
            return value
        if value != int(value):
            raise ValueError(f"label {raw!r} is not an integer class")
        return int(value)

    def metric(self, pred, gold) -> float:
        return accuracy(pred, gold) if self.metric_name == "accuracy" else pearson(pred, gold)


TASKS: Registry[TaskSpec] = Registry("task")
register = TASKS.register


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS.get(name)
    except ValueError as e:
        raise KeyError(str(e)) from None


def leaderboard_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics keyed by leaderboard task: a task variant (e.g. sts_bins) counts as its base task."""
    return {(TASKS[k].variant_of if k in TASKS and TASKS[k].variant_of else k): v for k, v in metrics.items()}


def overall_score(metrics: dict[str, float]) -> float:
    """(SST acc + QQP acc + (STS r + 1) / 2) / 3, the CS224N leaderboard score."""
    m = leaderboard_metrics(metrics)
    return (m["sst"] + m["qqp"] + (m["sts"] + 1) / 2) / 3


def with_overall(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus "overall" when sst, qqp and sts (or their variants) are all present."""
    if {"sst", "qqp", "sts"} <= set(leaderboard_metrics(metrics)):
        metrics["overall"] = overall_score(metrics)
    return metrics


def selection_score(metrics: dict) -> float:
    """What picks the best checkpoint: dev overall where defined, else the mean task metric."""
    return metrics.get("overall", sum(metrics.values()) / max(len(metrics), 1))


register(TaskSpec("sst", "ids-sst", ("sentence",), "sentiment", CLASSIFICATION, 5, "accuracy",
                  "sst", "Predicted_Sentiment", (0, 4),
                  ("very negative", "negative", "neutral", "positive", "very positive")))
register(TaskSpec("qqp", "quora", ("sentence1", "sentence2"), "is_duplicate", BINARY, 2, "accuracy",
                  "para", "Predicted_Is_Paraphrase", (0, 1), ("not paraphrase", "paraphrase")))
register(TaskSpec("sts", "sts", ("sentence1", "sentence2"), "similarity", REGRESSION, 1, "pearson",
                  "sts", "Predicted_Similiarity", (0, 5)))  # sic: the leaderboard's spelling
# STS as 26 classes in 0.2 steps [000]: a variant task rather than an option on "sts", because the
# kind is looked up by task name everywhere (loss, techniques, weighting, checkpoints).
register(TaskSpec("sts_bins", "sts", ("sentence1", "sentence2"), "similarity", BINNED_STS, 26, "pearson",
                  "sts", "Predicted_Similiarity", (0, 5), variant_of="sts"))
register(TaskSpec("cfimdb", "ids-cfimdb", ("sentence",), "sentiment", CLASSIFICATION, 2, "accuracy",
                  "cfimdb", "Predicted_Sentiment", (0, 1), ("negative", "positive")))
