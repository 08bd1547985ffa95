"""The training loop: one shared encoder, per-task heads, a task schedule and a loss weighting.

Everything optional (adversarial or proximal regularisers, adapters, learning-rate rules, ...)
is a technique plug-in called at fixed hooks with a small StepContext, and gradient surgery is
the one gradient-combiner slot, so this loop stays short.

Resuming: at each evaluation (and every `train.save_every` steps) the complete training state goes
to RUN_DIR/last (training.state); `train(..., resume=True)` continues from it exactly. Under
torchrun the ranks share one global batch (see core.distributed and training.streams).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from mtbert.core.config import Config, resolve_data_dir
from mtbert.core.distributed import Dist, process_group
from mtbert.core.errors import ConfigError, DataError
from mtbert.core.hardware import detect
from mtbert.core.io import atomic_write_text, to_json
from mtbert.core.rundir import RunDir
from mtbert.core.runtime import (
    auto_precision,
    autocast,
    bound_kernel_caches,
    release_free_memory,
    resident_memory_mb,
    resolve_precision,
    select_device,
    set_seed,
    set_threads,
)
from mtbert.core.tasks import get_task, overall_scorer, selection_score
from mtbert.core.trust import run_code_trusted
from mtbert.data.readers import encode_dataset, load_split
from mtbert.inference import int8_check
from mtbert.inference.predictor import metrics_for
from mtbert.modeling.checkpoint import (
    build_model,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mtbert.training import state
from mtbert.training.budget import (
    BudgetPlanner,
    epochs_spanned,
    fit_message,
    too_short_warning,
    whole_epochs,
)
from mtbert.training.early_stopping import EarlyStopping
from mtbert.training.gradients import per_task_gradients, set_flat_grad
from mtbert.training.optimizer import (
    Updater,
    adamw,
    parameter_groups,
    warmup_linear_decay,
)
from mtbert.training.pretrain import pretrained_start
from mtbert.training.rundir import (
    check_finite_losses,
    check_finite_score,
    check_run_dir,
    prepare_run_dir,
)
from mtbert.training.schedules import build_schedule
from mtbert.training.streams import TaskStream
from mtbert.training.techniques import (
    TECHNIQUES,
    StepContext,
    Technique,
    build_techniques,
    gradient_combiner,
)
from mtbert.training.tracking import build_trackers
from mtbert.training.validate import validate_run
from mtbert.training.weightings import build_weighting

log = logging.getLogger("mtbert")


EVAL_RELEASE_EVERY = 4  # evaluation batches between releases of free memory (with train.release_memory_every)
TIME_BUDGET = "time budget"  # summary.json's `stopped` when the budget's hard limit ended the run


def not_recomputable(techniques, model) -> list[str]:
    """The techniques, of this run or built into the model's structure by a loaded checkpoint
    (model.extensions), that a layer recomputed in backward would break (Technique.recomputable)."""
    names = {tech.name for tech in techniques if not tech.recomputable}
    return sorted(names | {name for name in model.extensions
                           if name in TECHNIQUES and not TECHNIQUES.get(name).recomputable})


# The Trainer's public surface (its docstring says what each is); tests/test_architecture.py
# holds the tests to it.
PUBLIC_SURFACE = frozenset({
    "cfg", "out", "model", "tokenizer", "train_sets", "dev_sets", "active_techniques", "configured_steps",
    "progress", "run", "train_step", "evaluate", "eval_callbacks", "parameter_counts",
    "next_batches", "step_loss", "weighted_loss", "step_gradients",
    "trained_parameters", "learning_rates", "lr_factor",
}) | {f.name for f in dataclasses.fields(state.TrainState)}


@state.progress_attributes  # step, epoch, history, plans, ... live in self.progress (a TrainState)
class Trainer:
    """Built in three parts: `validate_run(cfg)` (pure), then the parts (runtime, data, the model
    and the pretraining stage, techniques, batches and plan, optimizer, counters), each its own
    step, in an order that keeps every random draw where it was; the run directory is touched last.
    Then `run()`, the loop.

    The public surface (PUBLIC_SURFACE; what tests, notebooks and the apps use, so the parts
    behind it can change):
      the run as built: `cfg`, `out` (the run directory), `model`, `tokenizer`, `train_sets` and
        `dev_sets` (task -> encoded dataset), `active_techniques` (name -> plug-in, in the order
        they run), `configured_steps` (the plan before a time budget's fit);
      how far it has come: `progress` (a TrainState), its fields also as attributes (`step`,
        `epoch`, `total_steps`, `plans`, `sampling_positions`, `history`, `examples_seen`, ...);
      running: `run()`, `train_step(tasks)`, `evaluate()`, `eval_callbacks`, `parameter_counts()`;
      one step by hand: `next_batches(tasks)`, `step_loss(batches)`, `weighted_loss(losses)`,
        `step_gradients(batches)`;
      the optimizer: `trained_parameters()`, `learning_rates()`, `lr_factor(step)`.
    training.state, which saves and restores the parts, is the one module that reaches behind it.
    """

    def __init__(self, cfg: Config, out_dir: str | Path, dist: Dist | None = None, resume: bool = False,
                 overwrite: bool = False, command: str | None = None):
        self.cfg, self.out, self.dist = cfg, Path(out_dir), dist or Dist()
        self.progress = state.TrainState()
        self.command = command  # how the run was started, for an export's model card
        state_dir = state.find_state(self.out) if resume else None
        validate_run(cfg, check_data=False)  # (the data is checked as it is read, below)
        check_run_dir(self.out, resume, overwrite, self.dist)  # refuse a directory holding a run: reads only
        self.replaced = None  # an --overwrite'n run, kept aside until this one's first checkpoint
        self._set_up_runtime()
        examples = self._read_data()
        with self._restoring_replaced():  # (a pretraining stage moves an --overwrite'n run aside first)
            self._build_model(resume, overwrite)
            self._build_techniques()
            self._build_batches(examples)
            self._build_optimizer()
            self._init_progress(state_dir)
        # Only now, with the config, tasks, data, model, techniques, schedule and weighting built,
        # is the run directory touched (--overwrite moves the old run aside; techniques' setup may
        # write into it).
        if not (cfg.pretrain.enabled and not resume):  # (a pretraining stage prepared it already)
            self.replaced = prepare_run_dir(self.out, resume, overwrite, self.dist)
        with self._restoring_replaced():
            for tech in self.techniques:
                tech.setup(self.ctx)
            self.budget = self._budget_planner()
            self.budget_announced = False
            if state_dir is not None:
                state.restore(self, state_dir)
                self.ctx.step, self.ctx.total_steps = self.step, self.total_steps
                log.info("resumed %s at step %d of %d", self.out, self.step, self.total_steps)

    # ---------------------------------------------------------------- building the parts

    def _set_up_runtime(self) -> None:
        """Seeds, threads, device and precision (before this process's first matmul)."""
        tc = self.cfg.train
        bound_kernel_caches()  # (before this process's first matmul, or it has no effect)
        set_seed(tc.seed)
        set_threads(tc.threads)
        self.rng = random.Random(tc.seed)
        self.device = self.dist.device(select_device(tc.device))
        self.amp_dtype = resolve_precision(tc.precision, self.device)

    def _read_data(self) -> dict[str, dict]:
        """The tasks and their train / dev examples: a bad file fails before any model loads."""
        self.data_dir = resolve_data_dir(self.cfg.data.data_dir)
        self.tasks = [get_task(t) for t in self.cfg.data.tasks]
        self.scorer = overall_scorer(self.cfg.data.overall, self.cfg.data.overall_weights)
        return {split: self._read(split) for split in ("train", "dev")}  # (checks files and columns)

    def _build_model(self, resume: bool, overwrite: bool) -> None:
        """The model and tokenizer: from the backbone, or from a contrastive pretraining stage run
        first into RUN_DIR/pretrain (training.pretrain). A resumed run skips the stage: every weight
        comes from RUN_DIR/last, and the architecture is the backbone's either way."""
        cfg = self.cfg
        if cfg.pretrain.enabled and self.dist.world > 1:
            raise ConfigError("pretrain.enabled is single-process: run `mtbert pretrain` first, then train from "
                              "it with model.backbone=STAGE_DIR")
        if cfg.pretrain.enabled and not resume:
            self.replaced = prepare_run_dir(self.out, resume, overwrite, self.dist)  # (the stage is written there)
            with self._restoring_replaced(), run_code_trusted():  # (the stage this process just wrote)
                self.model, self.tokenizer = build_model(pretrained_start(cfg, RunDir(self.out).pretrain))
        else:
            self.model, self.tokenizer = build_model(cfg)

    def _build_techniques(self) -> None:
        """The techniques (in YAML order), the structural changes they make to the model, the model
        on its device with activation checkpointing where every technique allows it, compiled if asked."""
        tc = self.cfg.train
        self.techniques = build_techniques(self.cfg.techniques)
        self.combiner = gradient_combiner(self.techniques)
        for tech in self.techniques:
            tech.prepare_model(self.model, self.cfg.model.finetune)
        self.model.to(self.device)
        self.model.encoder.checkpoint_above_tokens = tc.checkpoint_above_tokens
        blocking = not_recomputable(self.techniques, self.model)
        if tc.checkpoint_above_tokens and blocking:
            log.info("train.checkpoint_above_tokens is off: %s cannot be recomputed in backward",
                     ", ".join(blocking))
            self.model.encoder.checkpoint_above_tokens = None
        if tc.compile:  # in place, so parameter names (checkpoints, optimizer state) stay the same
            self.model.encoder.compile(backend=tc.compile, dynamic=True)

    def _build_batches(self, examples: dict[str, dict]) -> None:
        """Encoded datasets, each task's batch stream, the schedule and weighting, and the plan."""
        cfg, tc = self.cfg, self.cfg.train
        self.train_sets, self.dev_sets = self._encode(examples["train"]), self._encode(examples["dev"])
        self.streams = {t: TaskStream(ds, cfg.data.batch_size, cfg.data.bucket, self.rng, self.tokenizer.pad_id,
                                      self.dist.rank, self.dist.world)
                        for t, ds in self.train_sets.items()}
        self.schedule = build_schedule(tc.schedule, **tc.schedule_args)
        self.weighting = build_weighting(tc.weighting, self.tasks, **tc.weighting_args).to(self.device)
        # Gradient accumulation: a step takes grad_accum batches of each of its tasks, so schedules
        # plan in batches of batch_size x grad_accum (an epoch is still one pass over the data).
        self.grad_accum = tc.grad_accum
        self.plan_batches = {t: math.ceil(s.batches_per_pass / tc.grad_accum) for t, s in self.streams.items()}
        # configured_steps: the plan before any time budget's fit, and the most a fit may give back
        self.plans, self.sampling_positions, self.total_steps = self._plan(tc.epochs, tc.max_steps)
        self.configured_steps = self.total_steps
        self.epoch_lengths = [len(p) for p in self.plans]  # (as configured: a time budget's fit may drop epochs)

    def _build_optimizer(self) -> None:
        """Parameter groups (techniques may split them), AdamW with warm-up and linear decay, and
        the per-task gradient split a gradient combiner needs."""
        tc = self.cfg.train
        if self.cfg.model.finetune == "frozen":
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        groups = parameter_groups(self.model, tc.lr, tc.head_lr, self.weighting, self.weighting.lr)
        for tech in self.techniques:
            groups = tech.param_groups(self.model, groups)
        optimizer = adamw(groups, tc.lr, tc.weight_decay, tc.fused_optimizer)
        self.updater = Updater(optimizer, warmup_linear_decay(optimizer, int(tc.warmup_ratio * self.total_steps),
                                                              self.total_steps),
                               self.amp_dtype, tc.clip_norm, self.model.parameters)
        self.grad_params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.combiner is not None:  # per-task gradients on these, ordinary ones on the rest
            self.shared = self.model.shared_parameters()
            if not self.shared:
                raise ConfigError(f"{self.combiner.name} needs a trainable shared encoder (model.finetune=full)")
            shared_ids = {id(p) for p in self.shared}
            self.private = [p for p in self.grad_params if id(p) not in shared_ids]

    def _init_progress(self, state_dir) -> None:
        """Counters, history, early stopping, the same weights on every rank, and the StepContext."""
        tc = self.cfg.train
        self.step, self.epoch, self.best_score, self.best_metrics, self.last_recorded_step = 0, 0, -math.inf, {}, None
        self.early_stopping = EarlyStopping.from_config(tc.early_stopping, self.cfg.data.tasks)
        self.stop_reason: str | None = None  # set at an evaluation that ends the run early
        self.eval_callbacks: list = []  # f(metrics row) -> reason to stop or None, after each evaluation (tune)
        self.trackers, self.resumed = [], state_dir is not None
        self.examples_seen, self.elapsed, self.history = 0, 0.0, []
        self.loss_sums = {t.name: 0.0 for t in self.tasks}  # training losses since the last evaluation
        self.loss_counts = dict.fromkeys(self.loss_sums, 0)
        self.dist.broadcast_module_(self.model)
        self.dist.broadcast_module_(self.weighting)
        if self.dist.world > 1:  # same weights on every rank, but each its own dropout masks
            torch.manual_seed(tc.seed + self.dist.rank)
        self.ctx = StepContext(self.model, self.total_steps, self.device, self.tokenizer, self.train_sets,
                               tc.seed, self.autocast, out_dir=self.out, dist=self.dist)

    @contextlib.contextmanager
    def _restoring_replaced(self):
        """Within this block, a failure puts back the run that --overwrite moved aside."""
        try:
            yield
        except BaseException:
            if self.replaced is not None:
                self.replaced.restore()
            raise

    def _checkpoint_written(self) -> None:
        """The new run has a checkpoint: the run it replaces goes now."""
        if self.replaced is not None:
            self.replaced.release()
            self.replaced = None

    def _plan(self, epochs: int, max_steps: int | None) -> tuple[list, list[float], int]:
        """(each epoch's steps, each epoch's share of the way through the schedule, planned steps):
        the steps of `epochs`, cut at max_steps. Task sampling follows the plan: where max_steps
        ends it early, schedules that depend on the number of epochs (annealed) plan for the epochs
        it spans, drawing the same random numbers."""
        before = self.rng.getstate()
        plans = [self.schedule.plan(self.plan_batches, e, epochs, self.rng) for e in range(epochs)]
        planned = sum(len(p) for p in plans)
        planned = min(planned, max_steps) if max_steps else planned
        spanned = whole_epochs([len(p) for p in plans], planned)
        drawn_as = [min(e, spanned - 1) for e in range(epochs)]  # (as drawn before: the same where spanned == epochs)
        if spanned < epochs:
            self.rng.setstate(before)
            plans = [self.schedule.plan(self.plan_batches, e, spanned, self.rng) for e in drawn_as]
        return plans, [e / max(spanned - 1, 1) for e in drawn_as], planned

    def _evaluations(self, start: int, end: int) -> int:
        """Evaluations the plan holds in steps (start, end]: each configured epoch's end (also of
        those a time budget's fit dropped), every eval_every steps and the final one."""
        every = self.cfg.train.eval_every
        marks = {e for e in itertools.accumulate(self.epoch_lengths) if start < e < end}
        if every:
            marks |= set(range((start // every + 1) * every, end, every))
        return len(marks) + 1

    def _budget_planner(self) -> BudgetPlanner | None:
        budget = self.cfg.train.time_budget_min
        if not budget:  # none, or 0: stop after the first step (the hard limit alone)
            return None
        dev_examples = sum(len(ds) for ds in self.dev_sets.values())
        first = self.plans[0] or [[]]
        per_step = self.cfg.data.batch_size * self.grad_accum * sum(map(len, first)) / len(first)
        # until one is timed: an example's forward pass costs about a third of its training step
        # (measured: 9 against 27 ms for make train's recipe)
        eval_in_steps = dev_examples / (3 * max(per_step, 1.0))
        return BudgetPlanner(budget, self._evaluations, eval_in_steps)

    def _fit_budget(self) -> None:
        """Refit the plan (steps, LR decay, task sampling) to the budget where its rest no longer
        fits, or fits with room to spare after an earlier cut (training.budget)."""
        elapsed = time.time() - self.t0
        fitted = self.budget.fit(self.step, self.total_steps, elapsed, self.configured_steps) if self.dist.main else None
        fitted = self.dist.broadcast_object(fitted)
        if fitted is None or fitted == self.total_steps:
            return
        tc = self.cfg.train
        self.total_steps = self.ctx.total_steps = fitted
        self.updater.refit(self.step, fitted, int(tc.warmup_ratio * fitted))
        self._refit_sampling(whole_epochs(self.epoch_lengths, fitted))
        if not self.dist.main:
            return
        per_step = self.budget.step_seconds
        message = fit_message(per_step, tc.time_budget_min, fitted, self.configured_steps,
                              epochs_spanned(self.epoch_lengths, fitted), tc.epochs)
        if self.budget_announced:
            log.info(message)
        else:  # once, in one line
            self.budget_announced = True
            tqdm.write(f"mtbert train: {message}", file=sys.stderr)
        precision, why = (tc.precision, "") if tc.precision != "auto" else auto_precision(self.device)
        warning = too_short_warning(fitted, self.configured_steps,
                                    f"{per_step:.2f} s/step in {precision} on {self.device.type}"
                                    + (f": {why}" if why else ""))
        if warning:
            tqdm.write(f"mtbert train: warning: {warning}", file=sys.stderr)

    def _refit_sampling(self, spanned: int) -> None:
        """Plan the epochs after this one for a plan that now spans `spanned` epochs: where that
        changes, their share of the way through the schedule (what the annealed mix follows) goes
        on from this epoch's to the end, reached in the plan's last epoch, and never back."""
        if spanned == len(self.plans):
            return
        now, tc = self.sampling_positions[self.epoch], self.cfg.train
        last = max(spanned - 1, 1)
        for e in range(self.epoch + 1, spanned):
            share = now + (1.0 - now) * (e - self.epoch) / max(spanned - 1 - self.epoch, 1)
            self.sampling_positions[e] = share
            # (a fractional epoch: schedules that anneal read epoch / (num_epochs - 1) as the share)
            plan = self.schedule.plan(self.plan_batches, share * last, spanned, random.Random(f"{tc.seed}/budget/{e}"))
            if e < len(self.plans):
                self.plans[e] = plan
            else:
                self.plans.append(plan)
        del self.plans[spanned:]

    def _budget_spent(self) -> bool:
        """The budget's hard limit (a machine that slowed down after the fit): stop, resumably.
        A run that has finished its plan is finished, whatever the clock says."""
        if self.step >= self.total_steps:
            return False
        if self._over_budget() and not self.stop_reason:
            self.stop_reason = TIME_BUDGET
        return self.stop_reason == TIME_BUDGET

    def parameter_counts(self) -> dict[str, int]:
        params = list(self.model.parameters()) + list(self.weighting.parameters())
        return {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "total_params": sum(p.numel() for p in params)}

    def _read(self, split: str) -> dict[str, list]:
        """Every task's usable examples of `split` (read before the model is built, so bad data
        fails first)."""
        out = {}
        for task in self.tasks:
            examples, _ = load_split(task, self.data_dir, split, self.cfg.data.limit)
            if split == "train" and self.cfg.data.train_fraction < 1.0:
                # a seeded subset keeps the tasks' relative sizes, so schedules behave as at full size
                keep = max(1, round(len(examples) * self.cfg.data.train_fraction))
                examples = random.Random(self.cfg.train.seed).sample(examples, keep)
            if not examples:
                raise DataError(f"task {task.name}: no usable {split} examples")
            out[task.name] = examples
        return out

    def _encode(self, examples: dict[str, list]) -> dict:
        return {name: encode_dataset(get_task(name), exs, self.tokenizer, self.model.pair_encoding[name])
                for name, exs in examples.items()}

    def _to_device(self, batch):
        return {**batch, "inputs": [{k: v.to(self.device) for k, v in x.items()} for x in batch["inputs"]],
                "labels": batch["labels"].to(self.device)}

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _task_loss(self, task: str, batch: dict) -> torch.Tensor:
        with self.autocast():
            logits = self.model(task, batch["inputs"])
        loss = self.model.tasks[task].kind.loss(logits, batch["labels"])
        for tech in self.techniques:
            loss = tech.task_loss(self.ctx, task, batch, logits, loss)
        return loss

    def _backward(self, weighted: dict[str, torch.Tensor], total: torch.Tensor | None = None,
                 acc: torch.Tensor | None = None, last: bool = True) -> torch.Tensor | None:
        """Back-propagate one micro-batch's weighted task losses; gradients add up over the step's
        `grad_accum` micro-batches, and after the last one they are averaged across ranks. With a
        gradient combiner and several tasks, the shared parameters get the combination of the
        per-task gradients (summed over the micro-batches, global ones under torchrun, so every rank
        combines the same), the rest the ordinary gradient of the total (`weighting(weighted)`
        unless given). Returns the per-task gradients accumulated so far (combiner, before the last
        micro-batch) or None."""
        n = self.grad_accum
        if self.combiner is None or len(weighted) < 2:
            total = self.weighting(weighted) if total is None else total
            self.updater.scale(total if n == 1 else total / n).backward()
            if last and self.dist.world > 1:
                self.dist.average_grads(self.grad_params)
            return None
        terms = [self.weighting({t: l}) for t, l in weighted.items()]  # every weighting is a sum of these
        if n > 1:
            terms = [term / n for term in terms]
        flat = per_task_gradients([self.updater.scale(term) for term in terms], self.shared)
        acc = flat if acc is None else acc.add_(flat)
        del flat
        private = [p for p in self.private if p.requires_grad]
        if private:
            torch.autograd.backward(self.updater.scale(sum(terms)), inputs=private)
        if not last:
            return acc
        if self.dist.world > 1:
            acc = self.dist.average_(acc)
        combined = self.combiner.combine(list(acc))
        del acc
        set_flat_grad(self.shared, combined)
        if self.dist.world > 1:
            self.dist.average_grads(self.private)
        return None

    @property
    def active_techniques(self) -> dict[str, Technique]:
        """The run's techniques by name, in the order they run (the YAML's)."""
        return {tech.name: tech for tech in self.techniques}

    def next_batches(self, tasks: list[str]) -> dict[str, dict]:
        """Each task's next training batch, drawn from its stream as a step draws it (later steps go on
        after it), on the device."""
        return {t: self._to_device(next(self.streams[t])) for t in tasks}

    def step_loss(self, batches: dict[str, dict]) -> dict[str, torch.Tensor]:
        """Each task's training loss on its batch (as next_batches gives them): the model's forward,
        the task's loss and every technique's terms, on the autograd graph, in the model's current
        mode; nothing is back-propagated."""
        return {t: self._task_loss(t, b) for t, b in batches.items()}

    def weighted_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss weighting's total of these task losses (train.weighting): what a step back-propagates."""
        return self.weighting(losses)

    def step_gradients(self, batches: dict[str, dict]) -> torch.Tensor:
        """Back-propagate `batches` as train_step back-propagates a micro-batch, without the update:
        the trained parameters' gradients are replaced by these (a gradient combiner's on the shared
        ones; 1/N of them with train.grad_accum N; loss-scaled under fp16). Returns the weighted loss."""
        self.updater.optimizer.zero_grad(set_to_none=True)
        losses = self.step_loss(batches)
        total = self.weighted_loss(losses)
        self._backward(losses, total)
        return total.detach()

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter the optimizer updates, by name: the model's (as model.named_parameters()
        names them) and a learned loss weighting's (`weighting.` and its own name)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        names.update({id(p): n for n, p in self.weighting.named_parameters(prefix="weighting")})
        return {names[id(p)]: p for p in self.grad_params}

    def learning_rates(self) -> dict[str, float]:
        """The learning rate of each trained parameter's next update (names as trained_parameters
        gives them): its group's rate (lr, head_lr, a learned weighting's lr, llrd's decay) as the
        schedule's factor and any plateau factor have set it."""
        names = {id(p): n for n, p in self.trained_parameters().items()}
        return {names[id(p)]: g["lr"] for g in self.updater.optimizer.param_groups for p in g["params"]}

    def lr_factor(self, step: int) -> float:
        """The learning-rate schedule's factor at optimizer step `step`: warm-up, then linear decay
        to 0 at the plan's end (as a time budget fitted it)."""
        return self.updater.scheduler.lr_lambdas[0](step)

    def train_step(self, tasks: list[str]) -> dict[str, float]:
        """One optimizer step: `grad_accum` micro-batches of each task in `tasks`, back-propagated one
        after another, then one update. Returns each task's mean training loss over the step."""
        self.model.train()
        self.ctx.loss_scale = self.updater.loss_scale
        n = self.grad_accum
        micro = [{t: next(self.streams[t]) for t in tasks} for _ in range(n)]  # drawn first: sizes weight losses
        sizes = {t: [m[t].get("global_size", len(m[t]["labels"])) for m in micro] for t in tasks}
        self.examples_seen += sum(sum(v) for v in sizes.values())
        step_losses, acc = dict.fromkeys(tasks, 0.0), None
        for i, drawn in enumerate(micro):
            batches = {t: self._to_device(b) for t, b in drawn.items()}
            losses = self.step_loss(batches)
            # A micro-batch's mean loss times n and its share of the step's examples (under torchrun
            # also this rank's share of the micro-batch, see TaskStream): the objective weighting(.) / n
            # summed over micro-batches (and averaged over ranks) is then the weighting of the mean
            # loss over all the step's examples, as every weighting is affine in each task loss.
            weighted = {}
            for t, loss in losses.items():
                share = n * sizes[t][i] / sum(sizes[t]) * batches[t].get("share", 1.0)
                weighted[t] = loss if share == 1.0 else loss * share
            acc = self._backward(weighted, acc=acc, last=i == n - 1)
            for t, loss in losses.items():
                step_losses[t] += float(loss.detach()) * (sizes[t][i] / sum(sizes[t]) if n > 1 else 1.0)
        self.updater.step()
        self.step += 1
        # Length-bucketed batches allocate tensors of ever-new shapes, and glibc keeps the freed
        # blocks: resident memory climbs by tens of MB a step. Releasing costs page faults on the
        # next step's fresh pages, so every step is a memory-for-time choice (RESULTS.md).
        every = self.cfg.train.release_memory_every
        if every and self.step % every == 0:
            release_free_memory()
        self.ctx.step = self.step
        for tech in self.techniques:
            tech.after_step(self.ctx)
        return step_losses

    def evaluate(self) -> dict[str, float]:
        release = EVAL_RELEASE_EVERY if self.cfg.train.release_memory_every else None
        metrics, _ = metrics_for(self.model, self.dev_sets, self.scorer, batch_size=self.cfg.data.eval_batch_size,
                                 device=self.device, amp_dtype=self.amp_dtype, pad_id=self.tokenizer.pad_id,
                                 release_every=release)
        return metrics

    def _record(self) -> dict:
        """Evaluate (main rank; the others get its metrics), log a metrics row, keep the best
        checkpoint and save the resumable state."""
        self.last_recorded_step = self.step
        started = time.perf_counter()
        release_free_memory()  # the evaluation's batches start from the live memory, not the steps' holes
        metrics = self.dist.broadcast_object(self.evaluate() if self.dist.main else None)
        release_free_memory()  # (and the steps after it from theirs)
        sums, counts = self.loss_sums, self.loss_counts
        train_loss = self.dist.average_floats({t: sums[t] / counts[t] for t in sums if counts[t]})
        self.loss_sums, self.loss_counts = dict.fromkeys(sums, 0.0), dict.fromkeys(sums, 0)
        score = selection_score(metrics)
        check_finite_score(score, self.step, self.best_metrics)
        for tech in self.techniques:
            self.updater.scale_lr(tech.on_eval(score, sum(train_loss.values())))
        row = {"epoch": self.epoch, "step": self.step, "elapsed_s": round(time.time() - self.t0, 1),
               "train_loss": train_loss,
               "lr": self.updater.lr, "task_weights": self.weighting.weights(), "dev": metrics,
               "memory": resident_memory_mb()}
        self.history.append(row)
        if self.dist.main:  # the whole log, atomically: no half line after a crash, no bare NaN
            atomic_write_text(RunDir(self.out).metrics, "".join(to_json(r) + "\n" for r in self.history))
            for tracker in self.trackers:
                tracker.log(row)
            meta = {"step": self.step, "epoch": self.epoch, "dev": metrics}
            if score > self.best_score:
                save_checkpoint(RunDir(self.out).best, self.model, self.tokenizer, self.cfg, meta)
                self._checkpoint_written()
            if self.cfg.train.keep_epochs and self.step >= min(self._steps_before(self.epoch + 1), self.total_steps):
                # (the step that ends this epoch's plan, or the whole run's)
                save_checkpoint(RunDir(self.out).epoch(self.epoch), self.model, self.tokenizer, self.cfg, meta)
            log.info("epoch %d step %d dev %s", self.epoch, self.step, {k: round(v, 4) for k, v in metrics.items()})
        if score > self.best_score:
            self.best_score, self.best_metrics = score, metrics
        reasons = [self.early_stopping.update(metrics)] if self.early_stopping else []
        reasons += [callback(row) for callback in self.eval_callbacks]
        self.stop_reason = self.stop_reason or next((r for r in reasons if r), None)
        if self.budget is not None:
            self.budget.evaluation_done(time.perf_counter() - started)
            if not self.stop_reason and self.step < self.total_steps:
                self._fit_budget()
        if self.stop_reason and self.stop_reason != TIME_BUDGET:
            log.info("stopping at step %d: %s", self.step, self.stop_reason)
        elif self.step < self.total_steps:  # the final state is never resumed: the run is over
            state.save(self)  # (a run the budget's hard limit stopped goes on with --resume)
            self._checkpoint_written()
        return row

    def _steps_before(self, epoch: int) -> int:
        """The planned steps of the epochs before `epoch`."""
        return sum(len(p) for p in self.plans[:epoch])

    def _over_budget(self) -> bool:
        budget = self.cfg.train.time_budget_min
        if budget is None:
            return False
        return self.dist.any(time.time() - self.t0 > 60 * budget)  # ranks must stop together

    def run(self) -> dict:
        """Train to the end (or the time budget, or early stopping); returns the summary."""
        ok = False
        try:
            with self._restoring_replaced():
                if self.dist.main:  # trackers continue their logs after the restored state's step
                    self.trackers = build_trackers(self.cfg.train.report_to, self.out, self.cfg.to_dict(),
                                                   self.step if self.resumed else None)
                summary = self._run()
            ok = True
            return summary
        finally:
            for tracker in self.trackers:
                tracker.close(ok)

    def _run(self) -> dict:
        if self.dist.main:
            run = RunDir(self.out)
            atomic_write_text(run.config, _yaml(self.cfg))
            if self.command:
                atomic_write_text(run.command, self.command + "\n")
            run.metrics.unlink(missing_ok=True)
            if self.history:  # resumed: the saved rows, without any logged after the saved state
                atomic_write_text(run.metrics, "".join(to_json(r) + "\n" for r in self.history))
        self.t0 = time.time() - self.elapsed
        eval_every, save_every = self.cfg.train.eval_every, self.cfg.train.save_every
        show = self.cfg.train.progress and self.dist.main
        while self.epoch < len(self.plans):  # (a time budget's fit may change the plan as it goes)
            epoch = self.epoch
            begin = self._steps_before(epoch)
            plan = self.plans[epoch][self.step - begin:]  # resumed: the rest; it ends at total_steps
            bar = tqdm(plan, desc=f"epoch {epoch}", total=min(len(plan), self.total_steps - self.step),
                       disable=not show, dynamic_ncols=True)
            for i, tasks in enumerate(bar):
                losses = self.train_step(tasks)
                if self.budget is not None:
                    self.budget.step_done()
                    if self.dist.any(self.budget.check_due()):  # (the main rank's clock decides for all)
                        self._fit_budget()
                check_finite_losses(losses, self.step, self.dist, self.best_metrics)
                for t, l in losses.items():
                    self.loss_sums[t] += l
                    self.loss_counts[t] += 1
                sums, counts = self.loss_sums, self.loss_counts
                bar.set_postfix({t: f"{sums[t] / counts[t]:.3f}" for t in sums if counts[t]})
                if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                    self._record()
                elif save_every and self.step % save_every == 0 and i < len(plan) - 1 and self.step < self.total_steps:
                    # (epoch ends and the plan's end record: no separate save)
                    state.save(self)
                    self._checkpoint_written()
                if self.stop_reason or self.step >= self.total_steps or self._budget_spent():
                    break
            if self.last_recorded_step != self.step:
                self._record()
            if self.stop_reason or self.step >= self.total_steps or self._budget_spent():
                break
            self.epoch += 1
        train_seconds = round(time.time() - self.t0, 1)
        started = time.time()
        checked = self._int8_check() if self.stop_reason != TIME_BUDGET else None
        summary = {"best_dev": self.best_metrics, "steps": self.step,
                   "configured_steps": self.configured_steps, "planned_steps": self.total_steps,
                   "train_seconds": train_seconds, "examples_seen": self.examples_seen,
                   **self.parameter_counts(), **({"stopped": self.stop_reason} if self.stop_reason else {}),
                   **({"int8_check": {**{k: checked[k] for k in ("passed", "fp32_score", "int8_score", "delta")},
                                      "seconds": round(time.time() - started, 1)}} if checked else {})}
        if self.dist.main:
            atomic_write_text(RunDir(self.out).summary, to_json(summary, indent=2))
            if self.stop_reason != TIME_BUDGET:  # finished: the resumable state is no longer needed
                for d in RunDir(self.out).states():
                    shutil.rmtree(d, ignore_errors=True)
        return summary

    def _int8_check(self) -> dict | None:
        """Score the best checkpoint's dev sets in int8 and fp32 on the CPU, and store the result
        beside its weights (inference.int8_check): CPU inference's `auto` uses int8 only where it passed."""
        best = find_checkpoint(self.out, required=False)
        # (single-process runs: under torchrun the other ranks would wait on the main one's CPU passes)
        if not (self.cfg.train.int8_check and self.dist.world == 1 and best is not None and detect().cpu_int8):
            return None
        with run_code_trusted():  # the checkpoint this run just wrote, from the user's own config
            model, _, _, meta = load_checkpoint(best)
        trained_in_fp32 = self.device.type == "cpu" and self.amp_dtype is None
        release = EVAL_RELEASE_EVERY if self.cfg.train.release_memory_every else None
        record = int8_check.measure(model, self.dev_sets, self.scorer, meta.get("step"),
                                    fp32_metrics=meta.get("dev") if trained_in_fp32 else None,
                                    batch_size=self.cfg.data.eval_batch_size, pad_id=self.tokenizer.pad_id,
                                    release_every=release)
        int8_check.write(best, record)
        return record


def _yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def train(cfg: Config, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
          command: str | None = None) -> dict:
    """Train (or with `resume`, continue the run in `out_dir`); under torchrun, as one of its ranks.
    A directory that holds a run is refused unless `resume` or `overwrite` (which deletes that run)."""
    with process_group(cfg.train.device) as dist:
        return Trainer(cfg, out_dir, dist, resume, overwrite, command).run()
