"""The Python API: `mtbert.load(RUN_DIR)` and what it returns.

    import mtbert
    model = mtbert.load("runs/default")          # a run, a checkpoint or an ensemble directory
    model.tasks["sst"]                           # {"kind": "classification", "labels": [...], "input": "text", ...}
    model.predict("sst", ["A gorgeous film."])   # [{"label": "very positive", "label_index": 4, "probabilities": {...}}]
    model.predict("sts", [("A man sings.", "A man is singing.")])   # [{"score": 4.71}]
    model.embed(["A gorgeous film."])            # numpy array [1, D]: the run's pooled sentence vectors
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtbert.core.errors import ConfigError, UnknownTaskError
from mtbert.core.runtime import autocast
from mtbert.core.tasks import TaskSpec
from mtbert.core.trust import run_code_trusted
from mtbert.data.readers import Example, pad
from mtbert.inference.loading import load_predictor
from mtbert.inference.outputs import prediction_records
from mtbert.inference.predictor import BasePredictor, EnsemblePredictor, Predictor


class Model:
    """A trained model (or ensemble) ready for raw text."""

    def __init__(self, predictor: BasePredictor):
        self.predictor = predictor

    @property
    def tasks(self) -> dict[str, dict]:
        """Each task: its output kind, label names (or score range), the input it takes, its metrics."""
        return {name: describe_task(self.predictor.task_spec(name)) for name in self.predictor.tasks}

    def predict(self, task: str, inputs: list) -> list[dict]:
        """Predictions for raw strings (single-sentence tasks) or (a, b) pairs (pair tasks): the
        label name, index and probabilities, or the score, one dict per input."""
        if task not in self.predictor.tasks:
            raise UnknownTaskError(f"this model has no task {task!r}; it has {self.predictor.tasks}")
        spec = self.predictor.task_spec(task)
        if isinstance(inputs, (str, tuple)):
            raise TypeError("predict takes a list of texts (or of (a, b) pairs)")
        examples = []
        for i, item in enumerate(inputs):
            texts = (item,) if isinstance(item, str) else tuple(item)
            if len(texts) != len(spec.text_columns) or not all(isinstance(t, str) for t in texts):
                want = "(a, b) pairs of strings" if spec.is_pair else "strings"
                raise ConfigError(f"task {task} takes {want}; item {i} is {item!r}")
            examples.append(Example(str(i), texts, None))
        if not examples:
            return []
        return prediction_records(spec, self.predictor.predict(task, examples))

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        """Sentence vectors [N, D] from the shared encoder and the run's pooling, in input order."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts")
        predictor = self.predictor
        if isinstance(predictor, EnsemblePredictor):
            raise ConfigError("an ensemble has no single encoder to embed with: load one of its members")
        assert isinstance(predictor, Predictor) and predictor.tokenizer is not None
        model, device = predictor.model.eval(), predictor.device
        ids = predictor.tokenizer.encode(list(texts))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i][0]))  # little padding per batch
        out = [None] * len(ids)
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = {k: v.to(device) for k, v in pad([ids[i] for i in idx], predictor.pad_id).items()}
            with autocast(device, predictor.amp_dtype):
                vecs = model.embed(batch).float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = vecs[j]
        width = model.pooler.dim
        return np.stack(out) if out else np.zeros((0, width), dtype=np.float32)


def describe_task(spec: TaskSpec) -> dict:
    info = {"kind": spec.kind.name, "input": "pair" if spec.is_pair else "text",
            "text_columns": list(spec.text_columns), "metrics": list(spec.metrics)}
    if spec.kind.scores:
        info["range"] = list(spec.label_range) if spec.label_range else None
    else:
        info["labels"] = [spec.label_name(i) for i in range(spec.num_labels)]
    return info


def load(run_dir: str | Path, device: str = "auto", precision: str = "auto", batch_size: int = 128,
         trust_run_code: bool = False) -> Model:
    """Open a run directory, checkpoint or ensemble directory for prediction and embedding. Code the
    directory names (plugins, import paths) is imported only with `trust_run_code` (core.trust)."""
    with run_code_trusted(trust_run_code):
        return Model(load_predictor(run_dir, device, precision, batch_size))
