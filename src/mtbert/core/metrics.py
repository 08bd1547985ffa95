"""Task metrics, chosen by name in a task definition (`metrics:`, `main_metric:`).

Each metric is `f(pred, gold) -> float` with `bounds` (its range, used to put metrics on one
[0, 1] scale in the leaderboard score) and `for_scores` (True: it compares real-valued scores;
False: it compares class labels). Written with numpy and checked against scikit-learn / scipy in
tests/test_metrics.py.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mtbert.core.errors import DataError
from mtbert.core.registry import Registry

METRICS: Registry[Callable] = Registry("metric")


def metric(name: str, bounds: tuple[float, float], for_scores: bool):
    def deco(fn):
        fn.bounds, fn.for_scores = bounds, for_scores
        return METRICS.register(fn, name=name)
    return deco


def _labels(pred, gold) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(pred), np.asarray(gold)
    if len(gold) == 0:
        raise DataError("a metric of an empty set: no example to score (a dev file whose rows were all skipped, "
                        "or --limit 0)")
    return pred, gold


def _confusion(pred, gold) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrix [gold, pred] over the classes present in either, and those classes."""
    classes = np.union1d(gold, pred)
    index = {c: i for i, c in enumerate(classes.tolist())}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for g, p in zip(gold.tolist(), pred.tolist()):
        cm[index[g], index[p]] += 1
    return cm, classes


def _f1_per_class(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # predicted + gold = 2tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


@metric("accuracy", (0.0, 1.0), for_scores=False)
def accuracy(pred, gold) -> float:
    pred, gold = _labels(pred, gold)
    return float((pred == gold).mean())


@metric("macro_f1", (0.0, 1.0), for_scores=False)
def macro_f1(pred, gold) -> float:
    """Unweighted mean of per-class F1 over the classes in gold or predictions (scikit-learn's)."""
    pred, gold = _labels(pred, gold)
    return float(_f1_per_class(_confusion(pred, gold)[0]).mean())


@metric("f1", (0.0, 1.0), for_scores=False)
def f1(pred, gold) -> float:
    """F1 of the positive class (label 1), for binary tasks."""
    pred, gold = _labels(pred, gold)
    tp = float(((pred == 1) & (gold == 1)).sum())
    denom = float((pred == 1).sum() + (gold == 1).sum())
    return 2 * tp / denom if denom else 0.0


@metric("mcc", (-1.0, 1.0), for_scores=False)
def mcc(pred, gold) -> float:
    """Matthews correlation coefficient, multiclass (Gorodkin 2004); 0 when undefined."""
    pred, gold = _labels(pred, gold)
    cm = _confusion(pred, gold)[0].astype(np.float64)
    t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denom = np.sqrt(s * s - p @ p) * np.sqrt(s * s - t @ t)
    return float((c * s - t @ p) / denom) if denom else 0.0


@metric("pearson", (-1.0, 1.0), for_scores=True)
def pearson(pred, gold) -> float:
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if len(gold) < 2:
        raise DataError("Pearson correlation needs at least two examples (a larger --limit, or more dev rows)")
    if pred.std() == 0 or gold.std() == 0:
        return 0.0  # undefined; a constant predictor carries no correlation
    return float(np.corrcoef(pred, gold)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    end = np.cumsum(counts)
    return ((end - counts + end - 1) / 2.0)[inverse]


@metric("spearman", (-1.0, 1.0), for_scores=True)
def spearman(pred, gold) -> float:
    """Pearson correlation of the ranks."""
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    return pearson(_ranks(pred), _ranks(gold))


def rescaled(name: str, value: float) -> float:
    """The metric mapped onto [0, 1] by its bounds: accuracy stays, a correlation r becomes (r + 1) / 2."""
    lo, hi = METRICS.get(name).bounds
    return (value - lo) / (hi - lo)
