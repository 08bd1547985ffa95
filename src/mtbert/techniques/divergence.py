"""Output divergences shared by the regularisers (SMART, Bregman proximal point, UDA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tasks import BINARY, CLASSIFICATION, OutputKind


def _log_probs(logits: torch.Tensor, kind: OutputKind) -> torch.Tensor:
    if kind is BINARY:  # a single logit is a two-class distribution [1-p, p]
        z = logits.float().view(-1, 1)
        return torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], -1)
    return F.log_softmax(logits.float(), -1)


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, kind: OutputKind) -> torch.Tensor:
    """KL(P||Q) + KL(Q||P), averaged over the batch."""
    lp, lq = _log_probs(p_logits, kind), _log_probs(q_logits, kind)
    p, q = lp.exp(), lq.exp()
    return ((p * (lp - lq)).sum(-1) + (q * (lq - lp)).sum(-1)).mean()


def output_divergence(a: torch.Tensor, b: torch.Tensor, kind: OutputKind) -> torch.Tensor:
    """Symmetric KL for classification, binary and binned outputs, squared error for regression."""
    if kind in (CLASSIFICATION, BINARY) or kind.name == "binned":
        return symmetric_kl(a, b, kind)
    return F.mse_loss(a.float().view(-1), b.float().view(-1))
