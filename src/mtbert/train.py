"""The training loop: one shared encoder, per-task heads, a task schedule and a loss weighting.

Everything optional (gradient surgery, adversarial or proximal regularisers, ...) is a technique
plug-in called at fixed hooks, so this loop stays short.

Resuming: at each evaluation (and every `train.save_every` steps) the complete training state goes
to RUN_DIR/last (weights, optimizer, schedulers, every random generator, data positions, technique
state, metrics history); `train(..., resume=True)` continues from it exactly, so on CPU a resumed
run ends bit-identical to an uninterrupted one. Under torchrun the ranks share one global batch
(see distributed.py and TaskStream).
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text, build_model, save_checkpoint
from .config import Config, load_config, resolve_data_dir
from .data import collate, encode_dataset, load_split, make_batches
from .distributed import Dist, process_group
from .encoder import load_state_checked
from .evaluate import metrics_for
from .runtime import (autocast, resolve_precision, rng_state, select_device, set_rng_state, set_seed,
                      set_threads)
from .sampling import build_schedule
from .tasks import get_task
from .techniques import build_techniques
from .weighting import build_weighting

log = logging.getLogger("mtbert")
NO_DECAY = ("bias", "norm.weight")


class TaskStream:
    """Endless batches of one task: a new shuffled (length-bucketed) pass whenever one runs out.

    Under torchrun every rank holds the same stream of global batches (same data, same generator)
    and keeps every world-th example of each. A rank's mean loss is weighted by its share of the
    global batch (`share` = n_rank · world / n_global), so the mean of the ranks' gradients is
    the gradient of the global batch's mean loss even when the batch does not split evenly; a rank
    left without an example trains on a stand-in with share 0."""

    def __init__(self, ds, batch_size, bucket, rng, pad_id, rank=0, world=1):
        self.ds, self.batch_size, self.bucket, self.rng, self.pad_id = ds, batch_size, bucket, rng, pad_id
        self.rank, self.world = rank, world
        self.queue: list[list[int]] = []

    def __next__(self):
        if not self.queue:
            self.queue = make_batches(self.ds, self.batch_size, True, self.bucket, self.rng)
        batch = self.queue.pop()
        if self.world == 1:
            return collate(self.ds, batch, self.pad_id)
        mine = batch[self.rank:: self.world]
        return {**collate(self.ds, mine or batch[:1], self.pad_id),
                "share": len(mine) * self.world / len(batch), "global_size": len(batch)}

    def state_dict(self) -> dict:  # the generator is the trainer's, saved once
        return {"queue": self.queue}

    def load_state_dict(self, state: dict) -> None:
        self.queue = state["queue"]

    @property
    def batches_per_pass(self) -> int:
        return math.ceil(len(self.ds) / self.batch_size)


def selection_score(metrics: dict) -> float:
    """Dev overall where defined, else the mean task metric (single-task runs)."""
    return metrics.get("overall", sum(metrics.values()) / max(len(metrics), 1))


class Trainer:
    def __init__(self, cfg: Config, out_dir: str | Path, dist: Dist | None = None, resume: bool = False):
        self.cfg, self.out, self.dist = cfg, Path(out_dir), dist or Dist()
        state_dir = find_state(self.out) if resume else None
        if self.dist.main:
            _ensure_writable(self.out)
        tc = cfg.train
        set_seed(tc.seed)
        set_threads(tc.threads)
        self.rng = random.Random(tc.seed)
        self.device = self.dist.device(select_device(tc.device))
        self.amp_dtype = resolve_precision(tc.precision, self.device)
        self.data_dir = resolve_data_dir(cfg.data.data_dir)
        if cfg.pretrain.enabled and self.dist.world > 1:
            raise ValueError("pretrain.enabled is single-process: run `mtbert pretrain` first, then train from "
                             "it with model.backbone=STAGE_DIR")
        # Contrastive stage first (mtbert.pretrain). A resumed run skips it: every weight comes from
        # RUN_DIR/last, and the architecture is the backbone's either way.
        if cfg.pretrain.enabled and not resume:
            from .pretrain import pretrained_start
            self.model, self.tokenizer = build_model(pretrained_start(cfg, self.out / "pretrain"))
        else:
            self.model, self.tokenizer = build_model(cfg)
        self.techniques = build_techniques(cfg.techniques)
        for tech in self.techniques:
            tech.prepare_model(self)
        self.model.to(self.device)
        if tc.compile:  # in place, so parameter names (checkpoints, optimizer state) stay the same
            backends = torch._dynamo.list_backends(exclude_tags=())
            if tc.compile not in backends:
                raise ValueError(f"train.compile must be a torch.compile backend ({', '.join(backends)}), "
                                 f"got {tc.compile!r}")
            self.model.encoder.compile(backend=tc.compile, dynamic=True)
        self.tasks = [get_task(t) for t in cfg.data.tasks]
        variants = [t.name for t in self.tasks if getattr(t, "variant_of", None) in cfg.data.tasks]
        if variants or len(set(cfg.data.tasks)) != len(cfg.data.tasks):
            raise ValueError(f"data.tasks lists a task twice (or with its variant {variants}): {cfg.data.tasks}")
        self.train_sets, self.dev_sets = self._load("train"), self._load("dev")
        self.streams = {t: TaskStream(ds, cfg.data.batch_size, cfg.data.bucket, self.rng, self.tokenizer.pad_id,
                                      self.dist.rank, self.dist.world)
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
        self.grad_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.grads_to_average = self.grad_params  # per step; a technique may average some itself
        self.step, self.epoch, self.best_score, self.best_metrics, self.last_recorded_step = 0, 0, -math.inf, {}, None
        self.examples_seen, self.elapsed, self.history = 0, 0.0, []
        self.loss_sums = {t.name: 0.0 for t in self.tasks}  # training losses since the last evaluation
        self.loss_counts = dict.fromkeys(self.loss_sums, 0)
        self.dist.broadcast_module_(self.model)
        self.dist.broadcast_module_(self.weighting)
        if self.dist.world > 1:  # same weights on every rank, but each its own dropout masks
            torch.manual_seed(tc.seed + self.dist.rank)
        for tech in self.techniques:
            tech.setup(self)
        if state_dir is not None:
            self.load_state(state_dir)

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
        return {**batch, "inputs": [{k: v.to(self.device) for k, v in x.items()} for x in batch["inputs"]],
                "labels": batch["labels"].to(self.device)}

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
        self.examples_seen += sum(b.get("global_size", len(b["labels"])) for b in batches.values())
        losses = {t: self.task_loss(t, b) for t, b in batches.items()}
        weighted = losses
        if self.dist.world > 1:  # see TaskStream; every weighting is affine in each task loss
            weighted = {t: l * batches[t]["share"] for t, l in losses.items()}
            self.grads_to_average = self.grad_params
        total = self.weighting(weighted)
        if not any(tech.backward(self, weighted, total) for tech in self.techniques):
            self.scaler.scale(total).backward()
        if self.dist.world > 1:
            self.dist.average_grads(self.grads_to_average)
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

    def _record(self) -> dict:
        """Evaluate (main rank; the others get its metrics), log a metrics row, keep the best
        checkpoint and save the resumable state."""
        self.last_recorded_step = self.step
        metrics = self.dist.broadcast_object(self.evaluate() if self.dist.main else None)
        sums, counts = self.loss_sums, self.loss_counts
        train_loss = self.dist.average_floats({t: sums[t] / counts[t] for t in sums if counts[t]})
        self.loss_sums, self.loss_counts = dict.fromkeys(sums, 0.0), dict.fromkeys(sums, 0)
        self.last_train_loss = sum(train_loss.values())
        for tech in self.techniques:
            tech.on_eval(self, metrics)
        row = {"epoch": self.epoch, "step": self.step, "elapsed_s": round(time.time() - self.t0, 1),
               "train_loss": train_loss,
               "lr": self.scheduler.get_last_lr()[0], "task_weights": self.weighting.weights(), "dev": metrics}
        self.history.append(row)
        score = selection_score(metrics)
        if self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if score > self.best_score:
                save_checkpoint(self.out / "best", self.model, self.tokenizer, self.cfg,
                                {"step": self.step, "epoch": self.epoch, "dev": metrics})
            log.info("epoch %d step %d dev %s", self.epoch, self.step, {k: round(v, 4) for k, v in metrics.items()})
        if score > self.best_score:
            self.best_score, self.best_metrics = score, metrics
        if self.step < self.total_steps:  # the final state is never resumed: the run is over
            self.save_state()
        return row

    def _over_budget(self) -> bool:
        budget = self.cfg.train.time_budget_min
        if budget is None:
            return False
        return self.dist.any(time.time() - self.t0 > 60 * budget)  # ranks must stop together

    def run(self) -> dict:
        if self.dist.main:
            atomic_write_text(self.out / "config.yaml", _yaml(self.cfg))
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            if self.history:  # resumed: the saved rows, without any logged after the saved state
                atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        self.t0 = time.time() - self.elapsed
        eval_every, save_every = self.cfg.train.eval_every, self.cfg.train.save_every
        show = self.cfg.train.progress and self.dist.main
        for epoch in range(self.epoch, len(self.plans)):
            self.epoch = epoch
            begin = sum(len(p) for p in self.plans[:epoch])
            plan = self.plans[epoch][self.step - begin: self.total_steps - begin]  # resumed: the rest
            bar = tqdm(plan, desc=f"epoch {epoch}", disable=not show, dynamic_ncols=True)
            for i, tasks in enumerate(bar):
                for t, l in self.train_step(tasks).items():
                    self.loss_sums[t] += l
                    self.loss_counts[t] += 1
                sums, counts = self.loss_sums, self.loss_counts
                bar.set_postfix({t: f"{sums[t] / counts[t]:.3f}" for t in sums if counts[t]})
                if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                    self._record()
                elif save_every and self.step % save_every == 0 and i < len(plan) - 1:  # (epoch ends record)
                    self.save_state()
                if self._over_budget():
                    break
            if self.last_recorded_step != self.step:
                self._record()
            if self.step >= self.total_steps or self._over_budget():
                break
        summary = {"best_dev": self.best_metrics, "steps": self.step,
                   "train_seconds": round(time.time() - self.t0, 1), "examples_seen": self.examples_seen,
                   **self.parameter_counts()}
        if self.dist.main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
            for d in ("last", "last.old"):  # finished: the resumable state is no longer needed
                shutil.rmtree(self.out / d, ignore_errors=True)
        return summary

    # ------------------------------------------------------------ resumable state (RUN_DIR/last)

    def state_dict(self) -> dict:
        """Everything besides the model weights that the rest of the run depends on."""
        return {"format": 1, "step": self.step, "epoch": self.epoch, "elapsed_s": time.time() - self.t0,
                "best_score": self.best_score, "last_recorded_step": self.last_recorded_step,
                "examples_seen": self.examples_seen, "loss_sums": self.loss_sums, "loss_counts": self.loss_counts,
                # as JSON: metric values of any float type, and weights_only loading accepts it
                "log": json.dumps({"history": self.history, "best_metrics": self.best_metrics}),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "weighting": self.weighting.state_dict(),
                "data_rng": self.rng.getstate(), "streams": {t: s.state_dict() for t, s in self.streams.items()},
                "techniques": {tech.name: tech.state_dict() for tech in self.techniques},
                # per rank: each draws its own dropout masks
                "rng": self.dist.gather_objects(rng_state())}

    def save_state(self) -> None:
        state = self.state_dict()  # on every rank: gathering the generators is collective
        if self.dist.main:
            save_checkpoint(self.out / "last", self.model, self.tokenizer, self.cfg,
                            {"step": self.step, "epoch": self.epoch, "resumable": True}, extra_state=state)

    def load_state(self, directory: Path) -> None:
        try:
            state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=True)
            weights = load_file(str(directory / "model.safetensors"), device="cpu")
        except Exception as e:
            raise ValueError(f"cannot resume from {directory}: {e}") from e
        load_state_checked(self.model, weights, str(directory))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when loss scaling is off
            self.scaler.load_state_dict(state["scaler"])
        self.weighting.load_state_dict(state["weighting"])
        for tech in self.techniques:
            tech.load_state_dict(state["techniques"].get(tech.name, {}))
        for t, s in self.streams.items():
            s.load_state_dict(state["streams"][t])
        self.rng.setstate(state["data_rng"])
        for key in ("step", "epoch", "best_score", "last_recorded_step", "examples_seen", "loss_sums", "loss_counts"):
            setattr(self, key, state[key])
        log_ = json.loads(state["log"])
        self.history, self.best_metrics = log_["history"], log_["best_metrics"]
        self.elapsed = state["elapsed_s"]
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0])
        if len(rngs) != self.dist.world and self.dist.world > 1:  # another world size: fresh dropout streams
            torch.manual_seed(self.cfg.train.seed + self.step + self.dist.rank)
        log.info("resumed %s at step %d of %d", self.out, self.step, self.total_steps)


def _yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output directory {out} is not writable: {e}") from e


def find_state(run_dir: str | Path) -> Path:
    """RUN_DIR/last (or last.old, left by a crash between the two renames of a save)."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir} already finished (summary.json exists): nothing to resume")
    for cand in (run_dir / "last", run_dir / "last.old"):
        if (cand / "train_state.pt").exists() and (cand / "model.safetensors").exists():
            return cand
    if not (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml)")
    raise ValueError(f"{run_dir} has no resumable state ({run_dir}/last is missing: the run stopped before "
                     "its first evaluation or save); start it again without --resume")


def resume_config(run_dir: str | Path, data_dir: str | None = None) -> Config:
    """The config the run was started with (RUN_DIR/config.yaml, as saved with its state);
    `data_dir` only says where the data is now."""
    raw = yaml.safe_load((find_state(run_dir) / "config.yaml").read_text())
    return load_config(None, [f"data.data_dir={data_dir}"] if data_dir else [], base=raw)


def train(cfg: Config, out_dir: str | Path, resume: bool = False) -> dict:
    """Train (or with `resume`, continue the run in `out_dir`); under torchrun, as one of its ranks."""
    with process_group(cfg.train.device) as dist:
        return Trainer(cfg, out_dir, dist, resume).run()
