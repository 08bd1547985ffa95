"""Contrastive pre-training: a stage before fine-tuning that shapes the encoder's sentence vectors.

Every objective is InfoNCE over a batch of (anchor, positive) sentence vectors, the other
positives in the batch serving as negatives [001, 002, 004]:
  simcse_unsup  each sentence encoded twice; dropout noise makes the two views (Gao et al. 2021)
  simcse_sup    labeled positives: QQP duplicates and STS pairs scoring >= sts_threshold
  mnrl          two sentences with the same SST label, one pair per class per batch
                (004, after Henderson et al. 2017)
Each step takes one batch per enabled objective and sums their losses. The stage writes a normal
mtbert checkpoint without task heads, so `model.backbone` can name it.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from mtbert.core.config import Config, resolve_data_dir
from mtbert.core.errors import ConfigError, DataError
from mtbert.core.registry import register_stage
from mtbert.core.rundir import RunDir
from mtbert.core.runtime import (
    autocast,
    bound_kernel_caches,
    resolve_precision,
    select_device,
    set_seed,
    set_threads,
)
from mtbert.core.tasks import get_task
from mtbert.data.readers import load_split, pad
from mtbert.modeling.checkpoint import build_model, save_checkpoint
from mtbert.modeling.model import MultitaskModel
from mtbert.training.optimizer import (
    Updater,
    adamw,
    parameter_groups,
    warmup_linear_decay,
)

# ---------------------------------------------------------------- losses

def info_nce(anchors: torch.Tensor, positives: torch.Tensor, tau: float,
             same: torch.Tensor | None = None) -> torch.Tensor:
    """-(1/N) Σ_i log softmax_j(cos(a_i, p_j) / tau)[i]: p_i is a_i's positive, every other p_j a
    negative. `same[i, j]` marks p_j (j != i) as a further positive of a_i, dropped from row i."""
    # fp32 even under autocast: at tau = 0.05 bf16's rounding of cos would move logits by ~0.1
    sim = F.normalize(anchors.float(), dim=-1) @ F.normalize(positives.float(), dim=-1).T / tau
    if same is not None:
        sim = sim.masked_fill(same & ~torch.eye(len(sim), dtype=torch.bool, device=sim.device), float("-inf"))
    return F.cross_entropy(sim, torch.arange(len(sim), device=sim.device))


class SimCSEUnsupLoss(nn.Module):
    """Unsupervised SimCSE: each sentence encoded twice with dropout on; the other view is its positive."""

    def __init__(self, tau: float = 0.05):
        super().__init__()
        self.tau = tau

    def forward(self, embed, batch: dict) -> torch.Tensor:
        (x,) = batch["inputs"]
        return info_nce(embed(x), embed(x), self.tau)  # two passes, two dropout masks


class SimCSESupLoss(nn.Module):
    """Supervised SimCSE: labeled pairs (a_i, b_i); the other b_j in the batch are a_i's negatives."""

    def __init__(self, tau: float = 0.05):
        super().__init__()
        self.tau = tau

    def forward(self, embed, batch: dict) -> torch.Tensor:
        a, b = batch["inputs"]
        return info_nce(embed(a), embed(b), self.tau)


class MultipleNegativesRankingLoss(nn.Module):
    """MNRL on same-label pairs: S = C·A·Bᵀ of normalised vectors, cross-entropy towards I (004).
    A b_j with a_i's label is no negative for a_i and is masked out, whatever the batch holds."""

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, embed, batch: dict) -> torch.Tensor:
        a, b = batch["inputs"]
        y = batch["labels"]
        return info_nce(embed(a), embed(b), 1.0 / self.scale, same=y[:, None] == y[None, :])


# ---------------------------------------------------------------- data

def unsup_sentences(examples: dict[str, list]) -> list[str]:
    """Every distinct training sentence (both sides of pairs): duplicates would be false negatives."""
    return list(dict.fromkeys(t for exs in examples.values() for e in exs for t in e.texts))


def labeled_positives(examples: dict[str, list], sts_threshold: float) -> list[tuple[str, str]]:
    """Pairs labeled as meaning the same: binary pair tasks (QQP) with label 1, regression pair
    tasks (STS) scoring >= sts_threshold."""
    out = []
    for name, exs in examples.items():
        task = get_task(name)
        if task.is_pair:
            out += [e.texts for e in exs if task.kind.positive_pair(e.label, sts_threshold)]
    return out


def labeled_sentences(examples: dict[str, list]) -> tuple[list[str], list[int]]:
    """Single-sentence classification examples (SST); each (task, label) is its own class."""
    texts, classes, ids = [], [], {}
    for name, exs in examples.items():
        task = get_task(name)
        if task.is_pair:
            continue
        for e in exs:
            label = task.kind.sentence_class(e.label)
            if label is None:
                break  # not a classification task
            texts.append(e.texts[0])
            classes.append(ids.setdefault((name, label), len(ids)))
    return texts, classes


def same_label_batches(labels: list[int], rng: random.Random) -> list[list[tuple[int, int]]]:
    """One pass of MNRL batches of (anchor, positive) indices: each batch holds one pair per class,
    so no other positive in a batch shares an anchor's label (no false negatives, as in 004).
    Each class is shuffled and paired off; the pass ends when the smallest class runs out."""
    by_class = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    pairs = []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        if len(idx) >= 2:
            pairs.append([(idx[k], idx[k + 1]) for k in range(0, len(idx) - 1, 2)])
    if len(pairs) < 2:
        raise ConfigError("mnrl needs at least two classes with two sentences each")
    return [list(batch) for batch in zip(*pairs)]


def shuffled_chunks(items: list[tuple], batch_size: int):
    """A plan: one shuffled pass in batches; a lone last item is dropped (it has no negatives)."""
    def plan(rng: random.Random) -> list[list[tuple]]:
        order = list(items)
        rng.shuffle(order)
        return [order[s: s + batch_size] for s in range(0, len(order), batch_size) if len(order) - s >= 2]
    return plan


class SentenceStream:
    """Endless batches over encoded sentences. A batch is a list of index tuples (one sentence, or
    anchor and positive); slot k of every tuple becomes padded input k. `plan(rng)` gives one pass."""

    def __init__(self, seqs: list, labels: list[int] | None, plan, rng: random.Random, pad_id: int):
        self.seqs, self.labels, self.plan, self.rng, self.pad_id = seqs, labels, plan, rng, pad_id
        self.queue = plan(rng)
        self.batches_per_pass = len(self.queue)
        if not self.queue:
            raise DataError("a pretraining objective has too little data for one batch")

    def __next__(self) -> dict:
        if not self.queue:
            self.queue = self.plan(self.rng)
        groups = self.queue.pop()
        batch = {"inputs": [pad([self.seqs[i] for i in slot], self.pad_id) for slot in zip(*groups)]}
        if self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[g[0]] for g in groups])
        return batch


def _unsup_stream(examples, tokenizer, pc, rng):
    texts = unsup_sentences(examples)
    return SentenceStream(tokenizer.encode(texts), None, shuffled_chunks([(i,) for i in range(len(texts))],
                                                                         pc.batch_size), rng, tokenizer.pad_id)


def _sup_stream(examples, tokenizer, pc, rng):
    pairs = labeled_positives(examples, pc.sts_threshold)
    if len(pairs) < 2:
        raise ConfigError("simcse_sup found fewer than two positive pairs: it needs qqp or sts in data.tasks")
    seqs = tokenizer.encode([t for pair in pairs for t in pair])  # pair k -> sentences 2k, 2k+1
    return SentenceStream(seqs, None, shuffled_chunks([(2 * k, 2 * k + 1) for k in range(len(pairs))],
                                                      pc.batch_size), rng, tokenizer.pad_id)


def _mnrl_stream(examples, tokenizer, pc, rng):
    texts, classes = labeled_sentences(examples)
    if not texts:
        raise ConfigError("mnrl needs a single-sentence classification task (sst) in data.tasks")
    return SentenceStream(tokenizer.encode(texts), classes, lambda r: same_label_batches(classes, r), rng,
                          tokenizer.pad_id)


# name -> (loss from the pretrain config, batch stream from (examples, tokenizer, config, rng))
OBJECTIVES = {
    "simcse_unsup": (lambda pc: SimCSEUnsupLoss(pc.tau), _unsup_stream),
    "simcse_sup": (lambda pc: SimCSESupLoss(pc.tau), _sup_stream),
    "mnrl": (lambda pc: MultipleNegativesRankingLoss(1.0 / pc.tau), _mnrl_stream),
}
_USAGE = "mtbert pretrain --config FILE --out DIR, then model.backbone=DIR; or pretrain: {enabled: true}"
register_stage("simcse_unsup", "contrastive pre-training, dropout views as positives (SimCSE)", "001", _USAGE)
register_stage("simcse_sup", "contrastive pre-training on QQP duplicates + STS >= 4 pairs", "001, 002", _USAGE)
register_stage("mnrl", "multiple-negatives ranking pre-training on same-sentiment SST pairs", "004", _USAGE)


# ---------------------------------------------------------------- the stage

def run_pretrain(cfg: Config, out_dir: str | Path) -> dict:
    """Run the contrastive stage from `cfg.model`'s encoder on `cfg.data.tasks`' training data and
    save it as an mtbert checkpoint (encoder only) in OUT_DIR/best. Returns a summary."""
    pc, tc = cfg.pretrain, cfg.train
    unknown = sorted(set(pc.objectives) - set(OBJECTIVES))
    if unknown or not pc.objectives:
        raise ConfigError(f"pretrain.objectives {pc.objectives} must name some of {sorted(OBJECTIVES)}")
    bound_kernel_caches()  # (variable-shape batches, as in fine-tuning)
    set_seed(tc.seed)
    set_threads(tc.threads)
    rng = random.Random(tc.seed)
    device = select_device(tc.device)
    amp = resolve_precision(tc.precision, device)
    full, tokenizer = build_model(cfg)
    model = MultitaskModel(full.encoder, [], {}, pooling=cfg.pretrain.pooling).to(device)
    data_dir = resolve_data_dir(cfg.data.data_dir)
    examples = {t: load_split(get_task(t), data_dir, "train", cfg.data.limit)[0] for t in cfg.data.tasks}
    objectives = {name: (OBJECTIVES[name][0](pc), OBJECTIVES[name][1](examples, tokenizer, pc, rng))
                  for name in pc.objectives}
    total = pc.epochs * max(stream.batches_per_pass for _, stream in objectives.values())
    total = min(total, pc.max_steps) if pc.max_steps else total
    # the encoder, and the pooler if it has weights (cnn, lstm), all at the stage's lr
    optimizer = adamw(parameter_groups(model, pc.lr), pc.lr, tc.weight_decay, tc.fused_optimizer)
    updater = Updater(optimizer, warmup_linear_decay(optimizer, int(pc.warmup_ratio * total), total), amp,
                      tc.clip_norm, model.parameters)

    def embed(x):  # encoder under autocast; the losses themselves run in fp32
        with autocast(device, amp):
            return model.embed({k: v.to(device) for k, v in x.items()})

    history, t0 = [], time.time()
    model.train()  # dropout on: simcse_unsup's two views depend on it
    for _ in tqdm(range(total), desc="pretrain", disable=not tc.progress, dynamic_ncols=True):
        losses = {}
        for name, (loss_fn, stream) in objectives.items():
            batch = next(stream)
            if "labels" in batch:
                batch["labels"] = batch["labels"].to(device)
            losses[name] = loss_fn(embed, batch)
        updater.scale(sum(losses.values())).backward()
        updater.step()
        history.append({n: float(v.detach()) for n, v in losses.items()})
    tail = history[-max(1, math.ceil(len(history) / 10)):]
    meta = {"stage": "pretrain", "step": len(history), "objectives": list(objectives),
            "train_loss": {n: sum(h[n] for h in history) / max(len(history), 1) for n in objectives},
            "final_loss": {n: sum(h[n] for h in tail) / len(tail) for n in objectives} if history else {},
            "seconds": round(time.time() - t0, 1)}
    ckpt = save_checkpoint(RunDir(out_dir).best, model.cpu(), tokenizer, cfg, meta)
    return {**meta, "checkpoint": str(ckpt)}


def pretrained_start(cfg: Config, out_dir: str | Path) -> Config:
    """Run the stage into `out_dir`; return `cfg` changed to fine-tune from the resulting checkpoint."""
    ckpt = run_pretrain(cfg, out_dir)["checkpoint"]
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=ckpt, tiny=None),
                               pretrain=dataclasses.replace(cfg.pretrain, enabled=False))
