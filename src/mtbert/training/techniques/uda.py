"""UDA consistency training with training-signal annealing (Xie et al., 2020) [paper 000].

Supervised part, TSA: at step t of T a labelled example counts only while the model's probability
of its gold class is ≤ η_t = α_t·(1 − 1/K) + 1/K (α_t linear t/T, log 1 − e^(−5t/T), exp
e^(5(t/T − 1))); the loss is the mean cross-entropy over the kept examples.
Unsupervised part: the batch's own inputs with labels ignored (000's unlabelled set is the training
set) and one augmentation of each: λ · KL(sharpen(p(x), τ) ‖ p(x̂)), averaged over the examples
whose max p(x) > β. p(x) is the supervised pass's own output, detached (as in UDA's code), so the
term costs one extra forward/backward on the augmented batch. 000 prints −λ·KL, which would
reward inconsistency; the objective is +λ·KL.
"""
from __future__ import annotations

import math
import random

import torch

from mtbert.core.errors import ConfigError
from mtbert.data.augment import augment_texts, get_augmentation, read_augment_file
from mtbert.data.readers import Example, encode_dataset, pad
from mtbert.training.techniques.base import TECHNIQUES, Technique

ALPHA = {"linear": lambda r: r, "log": lambda r: 1 - math.exp(-5 * r), "exp": lambda r: math.exp(5 * (r - 1))}


def tsa_threshold(schedule: str, step: int, total: int, num_classes: int) -> float:
    """η_t = α_t (1 − 1/K) + 1/K: starts at chance level, ends at 1 (all examples count)."""
    alpha = ALPHA[schedule](min(max(step / max(total, 1), 0.0), 1.0))
    return alpha * (1 - 1 / num_classes) + 1 / num_classes


def tsa_loss(logits, labels, kind, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over examples whose gold-class probability is ≤ threshold; the mask kept."""
    nll = -kind.log_probs(logits).gather(1, kind.gold_class(labels).view(-1, 1)).squeeze(1)
    keep = (-nll.detach()).exp() <= threshold
    return (nll * keep).sum() / keep.sum().clamp(min=1), keep


def sharpen(logits, kind, tau: float) -> torch.Tensor:
    """softmax(log p / τ): the distribution with temperature τ (for classes, softmax(logits / τ))."""
    return (kind.log_probs(logits) / tau).softmax(-1)


def confidence_mask(logits, kind, beta: float) -> torch.Tensor:
    return kind.log_probs(logits).exp().max(-1).values > beta


def consistency_loss(clean_logits, aug_logits, kind, tau: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over confident examples of KL(sharpen(p(x), τ) ‖ p(x̂)); no gradient through the target."""
    with torch.no_grad():
        target = sharpen(clean_logits, kind, tau)
        keep = confidence_mask(clean_logits, kind, beta)
    kl = (torch.special.xlogy(target, target) - target * kind.log_probs(aug_logits)).sum(-1)
    return (kl * keep).sum() / keep.sum().clamp(min=1), keep


@TECHNIQUES.register
class Uda(Technique):
    name = "uda"
    summary = "consistency on augmented inputs + training-signal annealing (UDA, TSA)"
    paper = "000; Xie et al. 2020"

    def __init__(self, weight: float = 1.0, beta: float = 0.8, tau: float = 0.4, tsa: str | None = "linear",
                 augment: str | list | None = ("token_dropout", "swap", "mask_span"),
                 augment_file: str | dict | None = None, tasks: list | None = None):
        super().__init__()
        if tsa is not None and tsa not in ALPHA:
            raise ConfigError(f"uda.tsa must be one of {sorted(ALPHA)} or null, got {tsa!r}")
        self.augment = [augment] if isinstance(augment, str) else list(augment or [])
        for a in self.augment:
            get_augmentation(a)
        if weight and not self.augment and not augment_file:
            raise ConfigError("uda needs `augment` or `augment_file` (or weight: 0 for TSA alone)")
        self.weight, self.beta, self.tau, self.tsa = weight, beta, tau, tsa
        self.augment_file, self.task_names = augment_file, tasks
        self.last: dict[str, dict] = {}  # per task: fraction kept by TSA and by confidence masking

    def setup(self, ctx) -> None:
        usable = [t for t in ctx.train_sets if ctx.kind(t).distribution]
        self.tasks = list(self.task_names or usable)
        bad = [t for t in self.tasks if t not in usable]
        if bad:
            raise ConfigError(f"uda.tasks {bad}: not a trained classification task (have {usable}); "
                             "for STS use the sts_bins task")
        self.rng = random.Random(ctx.seed)  # own stream: batch order stays as without UDA
        files = self.augment_file
        if isinstance(files, str):
            files = dict.fromkeys(self.tasks, files)
        cache = {p: read_augment_file(p)[0] for p in set((files or {}).values())}
        self.files = {t: cache[p] for t, p in (files or {}).items()}

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])

    def augmented(self, task: str, ex: Example) -> tuple[str, ...] | None:
        """A provided augmentation of the example if the file has one, else a built-in one, else None."""
        given = [a for a in self.files.get(task, {}).get(ex.id, ()) if len(a) == len(ex.texts)]
        if given:
            return self.rng.choice(given)
        return augment_texts(ex.texts, self.augment, self.rng) if self.augment else None

    def unsupervised(self, ctx, task, batch, logits, kind) -> torch.Tensor:
        ds = ctx.train_sets[task]
        rows, aug = [], []
        for j, i in enumerate(batch["indices"].tolist()):
            texts = self.augmented(task, ds.examples[i])
            if texts is not None:
                rows.append(j)
                aug.append(Example(ds.examples[i].id, texts, None))
        if not rows:
            return logits.new_zeros(())
        enc = encode_dataset(ds.task, aug, ctx.tokenizer, ctx.model.pair_encoding[task]).inputs
        inputs = [{k: v.to(ctx.device) for k, v in pad([e[s] for e in enc], ctx.tokenizer.pad_id).items()}
                  for s in range(len(enc[0]))]
        with ctx.autocast():
            aug_logits = ctx.model(task, inputs)
        loss, keep = consistency_loss(logits[torch.tensor(rows, device=logits.device)], aug_logits,
                                      kind, self.tau, self.beta)
        self.last.setdefault(task, {})["uda_kept"] = float(keep.float().sum()) / len(batch["indices"])
        return loss

    def task_loss(self, ctx, task, batch, logits, loss):
        if task not in self.tasks:
            return loss
        kind = ctx.kind(task)
        if self.tsa:
            eta = tsa_threshold(self.tsa, ctx.step, ctx.total_steps, kind.log_probs(logits).shape[-1])
            sup, keep = tsa_loss(logits, batch["labels"], kind, eta)
            # swap the plain supervised term for the annealed one, keeping what earlier techniques added
            loss = loss + (sup - kind.loss(logits, batch["labels"]))
            self.last.setdefault(task, {})["tsa_kept"] = float(keep.float().mean())
        if self.weight:
            loss = loss + self.weight * self.unsupervised(ctx, task, batch, logits, kind)
        return loss
