"""The training loop: one shared encoder, per-task heads, a task schedule and a loss weighting.

Everything optional (gradient surgery, adversarial or proximal regularisers, ...) is a technique
plug-in called at fixed hooks, so this loop stays short.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text, build_model, save_checkpoint
from .config import Config, resolve_data_dir
from .data import collate, encode_dataset, load_split, make_batches
from .evaluate import metrics_for
from .runtime import autocast, resolve_precision, select_device, set_seed, set_threads
from .sampling import build_schedule
from .tasks import get_task
from .techniques import build_techniques
from .weighting import build_weighting

log = logging.getLogger("mtbert")
NO_DECAY = ("bias", "norm.weight")


class TaskStream:
    """Endless batches of one task: a new shuffled (length-bucketed) pass whenever one runs out."""

    def __init__(self, ds, batch_size, bucket, rng, pad_id):
        self.ds, self.batch_size, self.bucket, self.rng, self.pad_id = ds, batch_size, bucket, rng, pad_id
        self.queue: list[list[int]] = []

    def __next__(self):
        if not self.queue:
            self.queue = make_batches(self.ds, self.batch_size, True, self.bucket, self.rng)
        return collate(self.ds, self.queue.pop(), self.pad_id)

    @property
    def batches_per_pass(self) -> int:
        return math.ceil(len(self.ds) / self.batch_size)


def selection_score(metrics: dict) -> float:
    """Dev overall where defined, else the mean task metric (single-task runs)."""
    return metrics.get("overall", sum(metrics.values()) / max(len(metrics), 1))


class Trainer:
    def __init__(self, cfg: Config, out_dir: str | Path):
        self.cfg, self.out = cfg, Path(out_dir)
        _ensure_writable(self.out)
        tc = cfg.train
        set_seed(tc.seed)
        set_threads(tc.threads)
        self.rng = random.Random(tc.seed)
        self.device = select_device(tc.device)
        self.amp_dtype = resolve_precision(tc.precision, self.device)
        self.data_dir = resolve_data_dir(cfg.data.data_dir)
        if cfg.pretrain.enabled:  # contrastive stage first (mtbert.pretrain); fine-tune from its checkpoint
            from .pretrain import pretrained_start
            self.model, self.tokenizer = build_model(pretrained_start(cfg, self.out / "pretrain"))
        else:
            self.model, self.tokenizer = build_model(cfg)
        self.techniques = build_techniques(cfg.techniques)
        for tech in self.techniques:
            tech.prepare_model(self)
        self.model.to(self.device)
        self.tasks = [get_task(t) for t in cfg.data.tasks]
        variants = [t.name for t in self.tasks if getattr(t, "variant_of", None) in cfg.data.tasks]
        if variants or len(set(cfg.data.tasks)) != len(cfg.data.tasks):
            raise ValueError(f"data.tasks lists a task twice (or with its variant {variants}): {cfg.data.tasks}")
        self.train_sets, self.dev_sets = self._load("train"), self._load("dev")
        self.streams = {t: TaskStream(ds, cfg.data.batch_size, cfg.data.bucket, self.rng, self.tokenizer.pad_id)
                        for t, ds in self.train_sets.items()}
        self.schedule = build_schedule(tc.schedule, **tc.schedule_args)
        self.weighting = build_weighting(tc.weighting, self.tasks, **tc.weighting_args).to(self.device)
        self.plans = [self.schedule.plan({t: s.batches_per_pass for t, s in self.streams.items()},
                                         e, tc.epochs, self.rng) for e in range(tc.epochs)]
        self.total_steps = sum(len(p) for p in self.plans)
        if tc.max_steps:
            self.total_steps = min(self.total_steps, tc.max_steps)
        if cfg.model.finetune == "frozen":
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        elif cfg.model.finetune != "full":
            raise ValueError(f"model.finetune must be 'full' or 'frozen', got {cfg.model.finetune!r}")
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=tc.lr, weight_decay=tc.weight_decay)
        warm = int(tc.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / max(warm, 1) if s < warm
            else max(0.0, (self.total_steps - s) / max(self.total_steps - warm, 1)))
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype is torch.float16)
        self.step, self.best_score, self.best_metrics, self.last_recorded_step = 0, -math.inf, {}, None
        self.examples_seen = 0
        for tech in self.techniques:
            tech.setup(self)

    def parameter_counts(self) -> dict[str, int]:
        params = list(self.model.parameters()) + list(self.weighting.parameters())
        return {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "total_params": sum(p.numel() for p in params)}

    def _load(self, split):
        sets = {}
        for task in self.tasks:
            examples, _ = load_split(task, self.data_dir, split, self.cfg.data.limit)
            if split == "train" and self.cfg.data.train_fraction < 1.0:
                # a seeded subset keeps the tasks' relative sizes, so schedules behave as at full size
                keep = max(1, round(len(examples) * self.cfg.data.train_fraction))
                examples = random.Random(self.cfg.train.seed).sample(examples, keep)
            if not examples:
                raise ValueError(f"task {task.name}: no usable {split} examples")
            sets[task.name] = encode_dataset(task, examples, self.tokenizer, self.model.pair_encoding[task.name])
        return sets

    def _param_groups(self) -> list[dict]:
        tc, groups = self.cfg.train, []
        everything = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        encoder = [(n[len("encoder."):], p) for n, p in everything if n.startswith("encoder.")]
        rest = [(n, p) for n, p in everything if not n.startswith("encoder.")]  # heads, poolers
        for named, lr in ((encoder, tc.lr), (rest, tc.head_lr or tc.lr)):
            groups.append({"params": [p for n, p in named if not n.endswith(NO_DECAY)], "lr": lr,
                           "names": [n for n, p in named if not n.endswith(NO_DECAY)]})
            groups.append({"params": [p for n, p in named if n.endswith(NO_DECAY)], "lr": lr,
                           "weight_decay": 0.0, "names": [n for n, p in named if n.endswith(NO_DECAY)]})
        if any(True for _ in self.weighting.parameters()):
            groups.append({"params": list(self.weighting.parameters()), "lr": self.weighting.lr or tc.lr,
                           "weight_decay": 0.0, "names": ["weighting"]})
        for tech in self.techniques:
            groups = tech.param_groups(self, groups)
        return [g for g in groups if g["params"]]

    def to_device(self, batch):
        return {"inputs": [{k: v.to(self.device) for k, v in x.items()} for x in batch["inputs"]],
                "labels": batch["labels"].to(self.device), "indices": batch["indices"]}

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def task_loss(self, task: str, batch: dict) -> torch.Tensor:
        with self.autocast():
            logits = self.model(task, batch["inputs"])
        loss = get_task(task).kind.loss(logits, batch["labels"])
        for tech in self.techniques:
            loss = tech.task_loss(self, task, batch, logits, loss)
        return loss

    def train_step(self, tasks: list[str]) -> dict[str, float]:
        self.model.train()
        batches = {t: self.to_device(next(self.streams[t])) for t in tasks}
        self.examples_seen += sum(len(b["labels"]) for b in batches.values())
        losses = {t: self.task_loss(t, b) for t, b in batches.items()}
        total = self.weighting(losses)
        if not any(tech.backward(self, losses, total) for tech in self.techniques):
            self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        if self.cfg.train.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # a lowered scale means fp16 overflow: step skipped
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for tech in self.techniques:
            tech.after_step(self)
        return {t: float(l.detach()) for t, l in losses.items()}

    def evaluate(self) -> dict[str, float]:
        metrics, _ = metrics_for(self.model, self.dev_sets, batch_size=self.cfg.data.eval_batch_size,
                                 device=self.device, amp_dtype=self.amp_dtype, pad_id=self.tokenizer.pad_id)
        return metrics

    def _record(self, epoch: int, sums: dict, counts: dict, t0: float) -> dict:
        self.last_recorded_step = self.step
        metrics = self.evaluate()
        train_loss = {t: sums[t] / counts[t] for t in sums if counts[t]}
        self.last_train_loss = sum(train_loss.values())
        for tech in self.techniques:
            tech.on_eval(self, metrics)
        row = {"epoch": epoch, "step": self.step, "elapsed_s": round(time.time() - t0, 1),
               "train_loss": train_loss,
               "lr": self.scheduler.get_last_lr()[0], "task_weights": self.weighting.weights(), "dev": metrics}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        score = selection_score(metrics)
        if score > self.best_score:
            self.best_score, self.best_metrics = score, metrics
            save_checkpoint(self.out / "best", self.model, self.tokenizer, self.cfg,
                            {"step": self.step, "epoch": epoch, "dev": metrics})
        log.info("epoch %d step %d dev %s", epoch, self.step, {k: round(v, 4) for k, v in metrics.items()})
        return row

    def _over_budget(self, t0: float) -> bool:
        budget = self.cfg.train.time_budget_min
        return budget is not None and time.time() - t0 > 60 * budget

    def run(self) -> dict:
        atomic_write_text(self.out / "config.yaml", _yaml(self.cfg))
        (self.out / "metrics.jsonl").unlink(missing_ok=True)
        t0, eval_every = time.time(), self.cfg.train.eval_every
        for epoch, plan in enumerate(self.plans):
            plan = plan[: self.total_steps - self.step]
            sums = {t.name: 0.0 for t in self.tasks}
            counts = dict.fromkeys(sums, 0)
            bar = tqdm(plan, desc=f"epoch {epoch}", disable=not self.cfg.train.progress, dynamic_ncols=True)
            for tasks in bar:
                for t, l in self.train_step(tasks).items():
                    sums[t] += l
                    counts[t] += 1
                bar.set_postfix({t: f"{sums[t] / counts[t]:.3f}" for t in sums if counts[t]})
                if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                    self._record(epoch, sums, counts, t0)
                    sums, counts = dict.fromkeys(sums, 0.0), dict.fromkeys(sums, 0)
                if self._over_budget(t0):
                    break
            if self.last_recorded_step != self.step:
                self._record(epoch, sums, counts, t0)
            if self.step >= self.total_steps or self._over_budget(t0):
                break
        summary = {"best_dev": self.best_metrics, "steps": self.step, "train_seconds": round(time.time() - t0, 1),
                   "examples_seen": self.examples_seen,
                   **self.parameter_counts()}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


def _yaml(cfg: Config) -> str:
    import yaml
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output directory {out} is not writable: {e}") from e


def train(cfg: Config, out_dir: str | Path) -> dict:
    return Trainer(cfg, out_dir).run()
