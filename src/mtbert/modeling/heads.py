"""Task heads: a sentence (or cross-encoded pair) vector, or a bi-encoded pair, -> logits or a score.

Bi-encoder pair heads are chosen by `model.bi_head` from PAIR_HEADS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert.core.registry import Registry
from mtbert.modeling.poolers import masked_mean


@dataclass
class Rep:
    """An encoded sequence batch: pooled vector [B, D], token states [B, T, H], mask [B, T]."""
    vec: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


PAIR_HEADS: Registry[type] = Registry("bi-encoder head")


class LinearHead(nn.Module):
    """Dropout + linear layer on one sentence (or cross-encoded pair) vector."""

    def __init__(self, dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, a: Rep):
        return self.proj(self.dropout(a.vec))


class PairHead(nn.Module):
    """A bi-encoder pair head: (Rep a, Rep b) -> logits. Constructed as
    `cls(width, out_dim, dropout, regression=..., shared=...)`; the class attributes tell the model
    what it needs."""
    reads_tokens = False    # width is the encoder's hidden size (token states), not the pooled vector's
    n_features = 0          # >0: a feature map of that many vectors, which may share a first layer
    single_output = False   # emits one score, so it suits binary and regression tasks only


class _PairFeatures(PairHead):
    """Pair head = feature map of (u, v), then dropout, an optional shared first layer, a linear layer."""
    n_features = 1

    def __init__(self, dim: int, out_dim: int, dropout: float, regression: bool = False,
                 shared: nn.Module | None = None):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.shared = shared  # first layer shared between pair tasks (paper 003), or None
        in_dim = shared[0].out_features if shared is not None else self.n_features * dim
        self.proj = nn.Linear(in_dim, out_dim)

    def features(self, a: Rep, b: Rep):
        raise NotImplementedError

    def forward(self, a: Rep, b: Rep):
        x = self.dropout(self.features(a, b))
        if self.shared is not None:
            x = self.shared(x)
        return self.proj(x)


@PAIR_HEADS.register(name="concat")
class ConcatPairHead(_PairFeatures):
    """SBERT's classifier input [u; v; |u-v|; u*v]."""
    n_features = 4

    def features(self, a, b):
        u, v = a.vec, b.vec
        return torch.cat([u, v, (u - v).abs(), u * v], -1)


@PAIR_HEADS.register(name="diffprod")
class DiffProdPairHead(_PairFeatures):
    """[|u-v|; u*v]: symmetric in u and v."""
    n_features = 2

    def features(self, a, b):
        return torch.cat([(a.vec - b.vec).abs(), a.vec * b.vec], -1)


@PAIR_HEADS.register(name="attention")
class AttentionPairHead(_PairFeatures):
    """Dot-product attention between the two token sequences (paper 000's Arc1 attention): each
    token attends over the other sentence, and [mean(a - ã); mean(a * ã); mean(b - b̃); mean(b * b̃)]
    compares every token with what it aligns to. Reads token states, so its width is the hidden size."""
    n_features = 4
    reads_tokens = True

    def features(self, a, b):
        A, B = a.tokens, b.tokens
        scores = A @ B.transpose(1, 2) / A.shape[-1] ** 0.5               # [N, Ta, Tb]
        neg = torch.finfo(scores.dtype).min
        a_to_b = scores.masked_fill(~b.mask.bool()[:, None, :], neg).softmax(-1) @ B
        b_to_a = scores.transpose(1, 2).masked_fill(~a.mask.bool()[:, None, :], neg).softmax(-1) @ A
        return torch.cat([masked_mean(A - a_to_b, a.mask), masked_mean(A * a_to_b, a.mask),
                          masked_mean(B - b_to_a, b.mask), masked_mean(B * b_to_a, b.mask)], -1)


@PAIR_HEADS.register(name="cosine")
class CosinePairHead(PairHead):
    """a * cos(u, v) + b with learned a, b. Regression starts at 2.5 (cos + 1) to map [-1,1] -> [0,5]."""
    single_output = True

    def __init__(self, dim: int, out_dim: int, dropout: float, regression: bool = False, shared=None):
        super().__init__()
        scale, shift = (2.5, 2.5) if regression else (10.0, -5.0)
        self.scale = nn.Parameter(torch.tensor(scale))
        self.shift = nn.Parameter(torch.tensor(shift))

    def forward(self, a: Rep, b: Rep):
        return (self.scale * F.cosine_similarity(a.vec, b.vec, dim=-1) + self.shift).unsqueeze(-1)


class CrossPlusCosineHead(nn.Module):
    """Paper 002's pair score: linear(cross-encoded pair vector) + w * cos(u, v) of the bi-encoded
    sentences, one model, trained end to end."""

    def __init__(self, dim: int, out_dim: int, dropout: float, regression: bool = False):
        super().__init__()
        self.cross = LinearHead(dim, out_dim, dropout)
        # Start from the bi-encoder's zero-shot judgement: STS ≈ 5·cos; paraphrase when cos > 0.8.
        self.weight = nn.Parameter(torch.tensor(5.0 if regression else 10.0))
        if not regression:
            nn.init.constant_(self.cross.proj.bias, -8.0)

    def forward(self, pair: Rep, a: Rep, b: Rep):
        return self.cross(pair) + self.weight * F.cosine_similarity(a.vec, b.vec, dim=-1).unsqueeze(-1)


PAIR_ENCODINGS = ("cross", "bi", "cross+cos")


