"""Output kinds: what a task's head emits and everything that depends on it.

One class per kind. Each owns its head width, loss, prediction rule, probabilities, the
divergence between two outputs (for SMART, Bregman and UDA), the averaging of ensemble members,
and the few facts other code needs (is the gold a score? which class is "positive"?), so no code
outside this module asks which kind a task has.

    kind            head outputs        gold           prediction
    Classification  K logits            class index    argmax
    Binary          1 logit             0 / 1          logit > 0
    Regression      1 score             real score     the score
    Binned          K logits (bins)     real score     expected bin value  (paper 000's STS)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class OutputKind:
    name: str = ""
    scores: bool = False             # gold labels are real-valued scores, not class indices
    distribution: bool = True        # outputs define a class distribution (KL, TSA, UDA apply)
    categorical: bool = False        # gold is one of K classes read from a K-way softmax head
    positive_class: int | None = None  # binary tasks: the class whose probability `prob` holds
    uncertainty_factor: float = 1.0  # Kendall et al.: ½ for a Gaussian likelihood (regression)
    label_keys: frozenset = frozenset({"column", "kind", "names", "range"})  # what its `label:` block may hold

    @classmethod
    def from_label(cls, label: dict, names: tuple[str, ...] | None, rng: tuple[float, float] | None,
                   fail) -> tuple["OutputKind", int]:
        """This kind for a task definition's `label:` block (names and range already read), with
        its number of labels; `fail(message)` reports what the block lacks."""
        raise NotImplementedError

    def out_dim(self, num_labels: int) -> int:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Discrete label (classification, binary) or score (regression, binned)."""
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, K]; P(positive) [B] for binary; the score [B] for regression."""
        raise NotImplementedError

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log class distribution [B, K] (distribution kinds only)."""
        return F.log_softmax(logits.float(), -1)

    def gold_class(self, labels: torch.Tensor) -> torch.Tensor:
        """Gold labels as class indices [B] (distribution kinds only)."""
        return labels.long().view(-1)

    def divergence(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Symmetric KL(P‖Q) + KL(Q‖P) of two outputs, averaged over the batch."""
        lp, lq = self.log_probs(a), self.log_probs(b)
        p, q = lp.exp(), lq.exp()
        return ((p * (lp - lq)).sum(-1) + (q * (lq - lp)).sum(-1)).mean()

    def average(self, probs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Combine ensemble members' `prob` outputs into pred / prob / logits (/ score)."""
        raise NotImplementedError

    def soft_target(self, logits: torch.Tensor) -> torch.Tensor:
        """What a student learns from a teacher's output (distillation): its log class
        distribution [B, K]; the score [B] for regression. An ensemble's `logits` (the log of its
        averaged probabilities) give the ensemble's distribution."""
        return self.log_probs(logits)

    def distillation_loss(self, logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
        """T² · KL(teacher ‖ student), both distributions at temperature T (Hinton et al., 2015),
        averaged over the batch; `target` is soft_target() of the teacher. The T² keeps the
        gradient's size independent of T."""
        teacher = (target.float() / temperature).log_softmax(-1)
        student = self.log_probs(logits.float() / temperature)
        return temperature ** 2 * (teacher.exp() * (teacher - student)).sum(-1).mean()

    def with_score(self, out: dict) -> dict:
        """Predictor outputs, with "score" (= pred) added for score kinds."""
        if self.scores:
            out["score"] = out["pred"]
        return out

    def positive_pair(self, label, threshold: float) -> bool:
        """Does a labelled pair of this kind mean "the same" (supervised SimCSE's positives)?"""
        return False

    def sentence_class(self, label) -> int | None:
        """The class a labelled single sentence belongs to (MNRL's same-label pairs), or None."""
        return int(label) if self.categorical else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _mean_prob(probs: list[np.ndarray]) -> np.ndarray:
    return np.mean([np.asarray(p, dtype=np.float64) for p in probs], axis=0)


class Classification(OutputKind):
    name = "classification"
    categorical = True

    @classmethod
    def from_label(cls, label, names, rng, fail):
        if names is None:
            fail("a classification label needs `names` (class names in order; integer labels index them)")
        return CLASSIFICATION, len(names)

    def out_dim(self, num_labels):
        return num_labels

    def loss(self, logits, labels):
        return F.cross_entropy(logits.float(), labels.long())

    def predict(self, logits):
        return logits.argmax(-1)

    def probabilities(self, logits):
        return logits.float().softmax(-1)

    def average(self, probs):  # mean softmax probabilities, argmax
        prob = _mean_prob(probs)
        return {"pred": prob.argmax(-1), "prob": prob.astype(np.float32),
                "logits": np.log(np.clip(prob, 1e-12, 1.0)).astype(np.float32)}


class Binary(OutputKind):
    name = "binary"
    positive_class = 1

    @classmethod
    def from_label(cls, label, names, rng, fail):
        if names is not None and len(names) != 2:
            fail("a binary label has two names: [negative, positive]")
        return BINARY, 2

    def out_dim(self, num_labels):
        return 1

    def loss(self, logits, labels):
        return F.binary_cross_entropy_with_logits(logits.float().view(-1), labels.float())

    def predict(self, logits):
        return (logits.view(-1) > 0).long()

    def probabilities(self, logits):
        return torch.sigmoid(logits.float().view(-1))

    def log_probs(self, logits):  # one logit is the two-class distribution [1 − p, p]
        z = logits.float().view(-1, 1)
        return torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], -1)

    def average(self, probs):  # mean sigmoid probability, > 0.5
        prob = _mean_prob(probs)
        logit = np.log(np.clip(prob, 1e-12, 1.0)) - np.log(np.clip(1.0 - prob, 1e-12, 1.0))
        return {"pred": (prob > 0.5).astype(np.int64), "prob": prob.astype(np.float32),
                "logits": logit.astype(np.float32)[:, None]}

    def positive_pair(self, label, threshold):
        return label == self.positive_class


class Regression(OutputKind):
    name = "regression"
    scores = True
    distribution = False

    @classmethod
    def from_label(cls, label, names, rng, fail):
        return REGRESSION, 1
    uncertainty_factor = 0.5

    def out_dim(self, num_labels):
        return 1

    def loss(self, logits, labels):
        return F.mse_loss(logits.float().view(-1), labels.float())

    def predict(self, logits):
        return logits.view(-1).float()

    def probabilities(self, logits):
        return logits.view(-1).float()

    def divergence(self, a, b):  # squared error: scores have no distribution
        return F.mse_loss(a.float().view(-1), b.float().view(-1))

    def soft_target(self, logits):  # the teacher's score
        return logits.float().view(-1)

    def distillation_loss(self, logits, target, temperature):  # squared error to the teacher's score
        return F.mse_loss(logits.float().view(-1), target.float().view(-1))

    def average(self, probs):  # mean score
        score = _mean_prob(probs).astype(np.float32)
        return {"pred": score, "prob": score, "score": score, "logits": score[:, None]}

    def positive_pair(self, label, threshold):
        return label >= threshold


class Binned(OutputKind):
    """A score in [lo, lo + step·(bins − 1)] learned as `bins` classes (paper 000's STS); the
    prediction is the expected bin value, so Pearson and score files work unchanged."""
    name = "binned"
    scores = True
    label_keys = OutputKind.label_keys | {"bins"}

    def __init__(self, lo: float, step: float, bins: int):
        self.lo, self.step, self.bins = lo, step, bins

    @classmethod
    def from_label(cls, label, names, rng, fail):
        bins = label.get("bins")
        if rng is None or not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
            fail("a binned label needs `range: [low, high]` and `bins` (at least 2)")
        return cls(rng[0], (rng[1] - rng[0]) / (bins - 1), bins), bins

    def out_dim(self, num_labels):
        return num_labels

    def to_bin(self, scores: torch.Tensor) -> torch.Tensor:
        """Gold score -> index of the nearest bin."""
        return ((scores.float() - self.lo) / self.step).round().long().clamp(0, self.bins - 1)

    def bin_values(self) -> torch.Tensor:
        return self.lo + self.step * torch.arange(self.bins, dtype=torch.float)

    def loss(self, logits, labels):
        return F.cross_entropy(logits.float(), self.to_bin(labels))

    def predict(self, logits):
        return logits.float().softmax(-1) @ self.bin_values().to(logits.device)

    def probabilities(self, logits):
        return logits.float().softmax(-1)

    def gold_class(self, labels):
        return self.to_bin(labels)

    def average(self, probs):  # mean bin probabilities, expected score
        prob = _mean_prob(probs)
        score = (prob @ self.bin_values().double().numpy()).astype(np.float32)
        return {"pred": score, "prob": prob.astype(np.float32), "score": score,
                "logits": np.log(np.clip(prob, 1e-12, 1.0)).astype(np.float32)}

    def __repr__(self) -> str:
        return f"Binned(lo={self.lo}, step={self.step}, bins={self.bins})"


CLASSIFICATION, BINARY, REGRESSION = Classification(), Binary(), Regression()
# label.kind -> its class: a new kind is one class here, registered (it parses its own `label:` block)
OUTPUT_KINDS = {k.name: k for k in (Classification, Binary, Regression, Binned)}
BINNED_STS = Binned(lo=0.0, step=0.2, bins=26)  # 0.0, 0.2, ..., 5.0
