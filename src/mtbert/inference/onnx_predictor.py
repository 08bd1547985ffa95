"""An ONNX export as an mtbert predictor, so evaluate_examples (dev metrics) works on it.

Reads both layouts the runner reads (the encoder once plus a head per task, or the older one full
graph per task); an export it cannot read is a CheckpointError, one line like every other.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mtbert.core.errors import CheckpointError
from mtbert.core.tasks import get_task
from mtbert.data.readers import Example
from mtbert.inference.onnx_runner import ExportError, OnnxModel
from mtbert.inference.predictor import BasePredictor


class OnnxPredictor(BasePredictor):
    def __init__(self, directory: str | Path, variant: str = "fp32", threads: int | None = None, batch_size: int = 64):
        try:
            self.runner = OnnxModel(directory, variant, threads, batch_size)
        except ExportError as e:  # the stand-alone runner cannot import mtbert's error types
            raise CheckpointError(str(e)) from None
        self.name = f"{directory} ({variant})"
        self.meta = self.runner.manifest.get("meta", {})

    @property
    def tasks(self) -> list[str]:
        return self.runner.tasks

    def predict(self, task_name: str, examples: list[Example]) -> dict[str, np.ndarray]:
        self._check_task(task_name)
        items = [e.texts[0] if len(e.texts) == 1 else tuple(e.texts) for e in examples]
        out = self.runner.predict(task_name, items)
        return get_task(task_name).kind.with_score({"pred": out["pred"], "prob": out["prob"], "logits": out["logits"]})
