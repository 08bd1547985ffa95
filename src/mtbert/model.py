"""The multitask model: one shared BERT encoder, one small head per task.

Single sentences and cross-encoded pairs go through the encoder once and a linear head reads the
sentence vector. Bi-encoded pairs encode each side separately and a pair head combines u and v.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder import BertModel
from .tasks import REGRESSION, TaskSpec


class LinearHead(nn.Module):
    """Dropout + linear layer on one sentence (or cross-encoded pair) vector."""

    def __init__(self, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, out_dim)

    def forward(self, u):
        return self.proj(self.dropout(u))


class ConcatPairHead(nn.Module):
    """SBERT's classifier: W [u; v; |u-v|; u*v]."""

    def __init__(self, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(4 * hidden, out_dim)

    def forward(self, u, v):
        return self.proj(self.dropout(torch.cat([u, v, (u - v).abs(), u * v], -1)))


class DiffProdPairHead(nn.Module):
    """W [|u-v|; u*v]: symmetric in u and v."""

    def __init__(self, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(2 * hidden, out_dim)

    def forward(self, u, v):
        return self.proj(self.dropout(torch.cat([(u - v).abs(), u * v], -1)))


class CosinePairHead(nn.Module):
    """a * cos(u, v) + b with learned a, b. Regression starts at 2.5 (cos + 1) to map [-1,1] -> [0,5]."""

    def __init__(self, hidden: int, out_dim: int, dropout: float, regression: bool = False):
        super().__init__()
        scale, shift = (2.5, 2.5) if regression else (10.0, -5.0)
        self.scale = nn.Parameter(torch.tensor(scale))
        self.shift = nn.Parameter(torch.tensor(shift))

    def forward(self, u, v):
        return (self.scale * F.cosine_similarity(u, v, dim=-1) + self.shift).unsqueeze(-1)


PAIR_HEADS = {"concat": ConcatPairHead, "diffprod": DiffProdPairHead, "cosine": CosinePairHead}


def pool(out: dict, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return out["pooler_output"]
    if how == "mean":  # SBERT mean pooling over real tokens
        m = attention_mask.unsqueeze(-1).to(out["last_hidden_state"].dtype)
        return (out["last_hidden_state"] * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {how!r}")


class MultitaskModel(nn.Module):
    def __init__(self, encoder: BertModel, tasks: list[TaskSpec], pair_encoding: dict[str, str],
                 bi_head: str = "concat", pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.tasks = {t.name: t for t in tasks}
        self.pair_encoding = {t.name: (pair_encoding.get(t.name, "cross") if t.is_pair else "single") for t in tasks}
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        heads = {}
        for t in tasks:
            out_dim = t.kind.out_dim(t.num_labels)
            if self.pair_encoding[t.name] == "bi":
                if bi_head not in PAIR_HEADS:
                    raise ValueError(f"unknown bi-encoder head {bi_head!r}; choose from {sorted(PAIR_HEADS)}")
                extra = {"regression": t.kind is REGRESSION} if bi_head == "cosine" else {}
                heads[t.name] = PAIR_HEADS[bi_head](hidden, out_dim, dropout, **extra)
            else:
                heads[t.name] = LinearHead(hidden, out_dim, dropout)
                if t.kind is REGRESSION and t.label_range:  # start at the middle of the score range
                    nn.init.constant_(heads[t.name].proj.bias, sum(t.label_range) / 2)
        self.heads = nn.ModuleDict(heads)
        self.extensions: dict[str, dict] = {}  # structural techniques applied (see Technique.restore)

    def embed(self, inputs: dict, inputs_embeds=None) -> torch.Tensor:
        out = self.encoder(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                           inputs_embeds=inputs_embeds)
        return pool(out, inputs["attention_mask"], self.pooling)

    def forward(self, task: str, inputs: list[dict], inputs_embeds: list | None = None) -> torch.Tensor:
        """Logits (or scores) for one batch of `task`. `inputs` holds one padded sequence batch,
        or two for bi-encoded pairs; `inputs_embeds` optionally replaces their word embeddings."""
        embeds = inputs_embeds or [None] * len(inputs)
        vecs = [self.embed(x, e) for x, e in zip(inputs, embeds)]
        return self.heads[task](*vecs)
