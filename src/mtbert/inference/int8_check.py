"""The int8 check: whether a checkpoint keeps its dev score with int8 linear layers.

Inference's `auto` picks int8 on a CPU without native bf16 (where it is the fastest path), but
only for a model shown to keep its accuracy there: at the end of training the trainer scores the
best checkpoint's dev sets in fp32 and in int8 (dynamically quantised linear layers) and writes the
result beside the weights (CHECK_FILE in the checkpoint directory). A model without a passed check
(trained before the check existed, or whose int8 score fell more than INT8_TOLERANCE below fp32)
runs in fp32 under `auto`; `--precision int8` still runs it in int8 on request.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from mtbert.core.io import atomic_write_text, to_json
from mtbert.core.rundir import INT8_CHECK
from mtbert.core.runtime import INT8_TOLERANCE
from mtbert.core.tasks import selection_score
from mtbert.inference.predictor import for_precision, metrics_for

CHECK_FILE = INT8_CHECK


def measure(model, dev_sets: dict, scorer, step: int, fp32_metrics: dict | None = None, **predict_kw) -> dict:
    """Score `model` (fp32 weights, on CPU) on `dev_sets` in int8, and in fp32 unless `fp32_metrics`
    already holds that; the check's record for `step` (the checkpoint's step)."""
    cpu = torch.device("cpu")
    if fp32_metrics is None:
        fp32_metrics, _ = metrics_for(model, dev_sets, scorer, device=cpu, amp_dtype=None, **predict_kw)
    quantised, _ = for_precision(copy.deepcopy(model).to(cpu), "int8", cpu)
    int8_metrics, _ = metrics_for(quantised, dev_sets, scorer, device=cpu, amp_dtype=None, **predict_kw)
    fp32, int8 = selection_score(fp32_metrics), selection_score(int8_metrics)
    return {"step": step, "fp32_score": fp32, "int8_score": int8, "delta": int8 - fp32, "tolerance": INT8_TOLERANCE,
            "passed": int8 >= fp32 - INT8_TOLERANCE, "fp32": fp32_metrics, "int8": int8_metrics}


def write(checkpoint_dir: str | Path, record: dict) -> None:
    atomic_write_text(Path(checkpoint_dir) / CHECK_FILE, to_json(record, indent=2))


def passed(checkpoint_dir: str | Path) -> bool:
    """Whether the checkpoint's own int8 check passed, for the weights it holds now (the check's step
    is the checkpoint's). A missing, unreadable or stale check is not a pass."""
    directory = Path(checkpoint_dir)
    try:
        record = json.loads((directory / CHECK_FILE).read_text())
        meta = json.loads((directory / "meta.json").read_text())
        return record.get("passed") is True and record.get("step") == meta.get("step")
    except (OSError, ValueError, AttributeError):
        return False
