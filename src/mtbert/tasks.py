"""The task registry: what each task reads, how it is scored, and how its predictions are written.

Adding a task is one `register(TaskSpec(...))` call. The output *kind* (classification, binary,
regression, binned regression) carries the loss, the prediction rule and the metric, so tasks only
declare data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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


def leaderboard_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics keyed by leaderboard task: a task variant (e.g. sts_bins) counts as its base task."""
    return {(TASKS[k].variant_of if k in TASKS and TASKS[k].variant_of else k): v for k, v in metrics.items()}


def overall_score(metrics: dict[str, float]) -> float:
    """(SST acc + QQP acc + (STS r + 1) / 2) / 3, the CS224N leaderboard score."""
    m = leaderboard_metrics(metrics)
    return (m["sst"] + m["qqp"] + (m["sts"] + 1) / 2) / 3


# ---------------------------------------------------------------- output kinds

@dataclass(frozen=True)
class OutputKind:
    name: str
    # "binned": a score in [lo, lo + step·(bins−1)] learned as `bins` classes (paper 000's STS)
    lo: float = 0.0
    step: float = 0.0
    bins: int = 0

    @property
    def scores(self) -> bool:
        """Gold labels are real-valued scores, not class indices."""
        return self.name in ("regression", "binned")

    def out_dim(self, num_labels: int) -> int:
        return num_labels if self.name in ("classification", "binned") else 1

    def to_bin(self, scores: torch.Tensor) -> torch.Tensor:
        """Gold score -> index of the nearest bin."""
        return ((scores.float() - self.lo) / self.step).round().long().clamp(0, self.bins - 1)

    def bin_values(self) -> torch.Tensor:
        return self.lo + self.step * torch.arange(self.bins, dtype=torch.float)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.name == "classification":
            return F.cross_entropy(logits.float(), labels.long())
        if self.name == "binned":
            return F.cross_entropy(logits.float(), self.to_bin(labels))
        if self.name == "binary":
            return F.binary_cross_entropy_with_logits(logits.float().view(-1), labels.float())
        return F.mse_loss(logits.float().view(-1), labels.float())

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Discrete label (classification, binary) or score (regression)."""
        if self.name == "classification":
            return logits.argmax(-1)
        if self.name == "binary":
            return (logits.view(-1) > 0).long()
        if self.name == "binned":  # expected score, so Pearson and score files work unchanged
            return logits.float().softmax(-1) @ self.bin_values().to(logits.device)
        return logits.view(-1).float()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.name in ("classification", "binned"):
            return logits.float().softmax(-1)
        if self.name == "binary":
            return torch.sigmoid(logits.float().view(-1))
        return logits.view(-1).float()


CLASSIFICATION, BINARY, REGRESSION = OutputKind("classification"), OutputKind("binary"), OutputKind("regression")
BINNED_STS = OutputKind("binned", lo=0.0, step=0.2, bins=26)  # 0.0, 0.2, ..., 5.0


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


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


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
