"""Multitask knowledge distillation (Liu et al., 2019, MT-DNN-KD; Hinton et al., 2015).

A teacher (any run, checkpoint or ensemble directory: an ensemble's averaged probabilities are
MT-DNN's soft targets) labels every training example of each distilled task once, before
training. The targets are cached beside the run (RUN_DIR/teacher_targets/KEY.safetensors, or in
`cache_dir`, which several students may share); KEY hashes the teacher's weights (checksums of
every model.safetensors it uses), the training examples and the inference precision, so a
changed teacher or data set never reuses stale targets, and a resumed run finds them again.

Per distilled task the student's loss becomes

    (1 − α) · hard loss  +  α · soft loss,
    soft loss = T² · KL(teacher_T ‖ student_T)     classification, binary, binned STS
              = (student score − teacher score)²    regression

with both distributions at temperature T (the kinds own the formulas: core.kinds). Terms that
other techniques add to the task loss are kept as they are. Batches carry `indices` into the
training set, so the cached targets are looked up per example; that also holds on every torchrun
rank (the main rank computes the cache, the others wait for it and read it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtbert.core.errors import CheckpointError, ConfigError, DataError
from mtbert.core.io import lies_under, read_json, sha256
from mtbert.core.runtime import resolve_precision
from mtbert.core.trust import reading_run_source
from mtbert.inference.ensemble import ENSEMBLE_FILE, is_ensemble_dir
from mtbert.inference.loading import load_predictor
from mtbert.modeling.checkpoint import find_checkpoint
from mtbert.training.techniques.base import TECHNIQUES, Technique

log = logging.getLogger("mtbert")


def teacher_fingerprint(path: str | Path) -> tuple[list[str], dict]:
    """The teacher's tasks and what identifies its weights (the checksum of every checkpoint it
    uses), read without loading any model."""
    path = Path(path)
    if is_ensemble_dir(path):
        spec = read_json(path / ENSEMBLE_FILE)
        used = sorted({m for names in spec["tasks"].values() for m in names})
        ckpts = {r["name"]: Path(r["checkpoint"]) for r in spec["members"]}
        return list(spec["tasks"]), {"ensemble_tasks": spec["tasks"],
                                     "members": {m: sha256(ckpts[m] / "model.safetensors") for m in used}}
    ckpt = find_checkpoint(path)
    spec = read_json(ckpt / "model.json")
    tasks = spec.get("tasks") if isinstance(spec, dict) else None
    if not isinstance(tasks, list):
        raise CheckpointError(f"{ckpt}/model.json lists no tasks: not a teacher to distill from")
    return tasks, {"checkpoint": sha256(ckpt / "model.safetensors")}


def examples_digest(ds) -> str:
    """Identifies a training set: its task and every example's id and texts, in order."""
    h = hashlib.sha256(ds.task.name.encode())
    for ex in ds.examples:
        h.update(json.dumps([ex.id, *ex.texts]).encode())
    return h.hexdigest()


@TECHNIQUES.register
class Distill(Technique):
    name = "distill"
    summary = "knowledge distillation from a run or ensemble: (1-alpha) hard loss + alpha soft loss (KL at T, MSE)"
    paper = "Liu et al. 2019 (MT-DNN-KD); Hinton et al. 2015"

    def __init__(self, teacher: str | None = None, alpha: float = 0.5, temperature: float = 1.0,
                 tasks: list | None = None, cache_dir: str | None = None, precision: str = "auto",
                 batch_size: int = 128):
        if not teacher:
            raise ConfigError("distill.teacher is required: a run, checkpoint or ensemble directory")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {temperature}")
        self.teacher, self.alpha, self.temperature = str(teacher), float(alpha), float(temperature)
        self.task_names, self.cache_dir, self.precision, self.batch_size = tasks, cache_dir, precision, batch_size
        self.targets: dict[str, torch.Tensor] = {}
        self.cache_file: Path | None = None

    # ------------------------------------------------------------ soft targets, once
    def setup(self, ctx) -> None:
        trained = list(ctx.train_sets)
        self.tasks = list(self.task_names or trained)
        not_trained = [t for t in self.tasks if t not in trained]
        if not_trained:
            raise ConfigError(f"distill.tasks {not_trained} are not trained here (data.tasks: {trained})")
        if not Path(self.teacher).exists():
            raise CheckpointError(f"distill.teacher {self.teacher} does not exist")
        teacher_tasks, weights = teacher_fingerprint(self.teacher)
        lacking = [t for t in self.tasks if t not in teacher_tasks]
        if lacking:  # refused before any training
            raise ConfigError(f"distill: the teacher {self.teacher} has tasks {teacher_tasks}, but the student "
                             f"trains {lacking} too; use a teacher with the student's tasks "
                             f"(or distill only some with distill.tasks)")
        precision = resolve_precision(self.precision, ctx.device)
        # ("inference": how the teacher runs at that precision: bf16 on CPU now casts its weights
        # instead of autocasting, so targets cached by the autocast teacher are not reused)
        key_src = {"teacher": weights, "precision": str(precision), "inference": "bf16-weights-v1",
                   "data": {t: examples_digest(ctx.train_sets[t]) for t in self.tasks}}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
        cache = Path(self.cache_dir) if self.cache_dir else Path(ctx.out_dir or ".") / "teacher_targets"
        if reading_run_source() is not None and ctx.out_dir is not None and \
                not lies_under(cache, ctx.out_dir):  # a resumed run's config
            raise ConfigError(f"distill.cache_dir {cache} lies outside the resumed run {ctx.out_dir}: a run "
                              f"directory's config may write only inside it")
        self.cache_file = cache / f"{key}.safetensors"
        if ctx.dist.main and not self.cache_file.exists():
            # Loading a model draws from the global generators: keep them as they were, so that
            # distillation changes the student's loss and nothing else.
            devices = [ctx.device] if ctx.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                # the teacher runs at the precision named in the key (`auto`: bf16 where native, else fp32)
                name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision]
                targets = self._label(ctx, name)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_name(f".{self.cache_file.name}.tmp")
            save_file(targets, str(tmp), metadata={"teacher": str(Path(self.teacher).resolve()),
                                                   "key": json.dumps(key_src, sort_keys=True)})
            tmp.replace(self.cache_file)  # atomic: a reader never sees half a file
        ctx.dist.broadcast_object(None)  # the others wait until the main rank has written the cache
        self.targets = load_file(str(self.cache_file))
        for t in self.tasks:
            if t not in self.targets or len(self.targets[t]) != len(ctx.train_sets[t]):
                raise DataError(f"{self.cache_file} does not match the training set of {t}: delete it")

    def _label(self, ctx, precision: str) -> dict[str, torch.Tensor]:
        start = time.time()
        teacher = load_predictor(self.teacher, ctx.device, precision, self.batch_size)
        out = {}
        for t in self.tasks:
            logits = torch.as_tensor(teacher.predict(t, ctx.train_sets[t].examples)["logits"])
            out[t] = ctx.kind(t).soft_target(logits).float().contiguous()
        log.info("distill: teacher %s labelled %s training examples in %.0fs -> %s", self.teacher,
                 {t: len(v) for t, v in out.items()}, time.time() - start, self.cache_file)
        return out

    # ------------------------------------------------------------ the loss
    def task_loss(self, ctx, task, batch, logits, loss):
        if task not in self.targets:
            return loss
        kind = ctx.kind(task)
        target = self.targets[task][batch["indices"].cpu()].to(logits.device)
        hard = kind.loss(logits, batch["labels"])
        soft = kind.distillation_loss(logits, target, self.temperature)
        # (1 − α)·hard + α·soft, keeping whatever earlier techniques added to `loss`
        return loss + self.alpha * (soft - hard)
