"""The multitask model: one shared BERT encoder, one small head per task.

Single sentences and cross-encoded pairs go through the encoder once and a head reads the
sentence vector. Bi-encoded pairs encode each side separately and a pair head combines them.
`cross+cos` pairs do both: a cross-encoder score plus a learned multiple of the bi-encoder cosine
(paper 002). Sentence vectors come from a pooler: [CLS], mean, n-gram CNN, BiLSTM, or a concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder import BertModel
from .tasks import REGRESSION, TaskSpec


@dataclass
class Rep:
    """An encoded sequence batch: pooled vector [B, D], token states [B, T, H], mask [B, T]."""
    vec: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


# ---------------------------------------------------------------- poolers (token states -> vector)

def masked_mean(x, mask):
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def masked_max(x, mask):
    return x.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(x.dtype).min).max(1).values


class ClsPool(nn.Module):
    """BERT's pooler output: tanh(W h_[CLS])."""
    def __init__(self, hidden):
        super().__init__()
        self.dim = hidden

    def forward(self, out, mask):
        return out["pooler_output"]


class MeanPool(nn.Module):
    """SBERT mean pooling over real (non-padding) tokens."""
    def __init__(self, hidden):
        super().__init__()
        self.dim = hidden

    def forward(self, out, mask):
        return masked_mean(out["last_hidden_state"], mask)


class CNNPool(nn.Module):
    """n-gram convolutions (n = 1..4) over token states, max-pooled over real positions [002]."""
    def __init__(self, hidden, channels: int = 128, ngrams=(1, 2, 3, 4)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(hidden, channels, n, padding=n - 1) for n in ngrams)
        self.dim = channels * len(ngrams)

    def forward(self, out, mask):
        x = out["last_hidden_state"].transpose(1, 2)  # [B, H, T]
        T = x.shape[-1]
        feats = []
        for conv in self.convs:
            # With padding n-1 the output has T + n - 1 positions; window ending at j (< T) covers
            # tokens j-n+1..j, so it contains padding only if token j is padding: reuse the token mask.
            y = F.relu(conv(x))[..., :T].transpose(1, 2)
            feats.append(masked_max(y, mask))
        return torch.cat(feats, -1)


class BiLSTMPool(nn.Module):
    """A BiLSTM over token states, max-pooled over real positions [002]; padding is packed away."""
    def __init__(self, hidden, lstm_hidden: int = 128):
        super().__init__()
        self.lstm = nn.LSTM(hidden, lstm_hidden, batch_first=True, bidirectional=True)
        self.dim = 2 * lstm_hidden

    def forward(self, out, mask):
        x = out["last_hidden_state"]
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x.float(), lengths, batch_first=True, enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return masked_max(y, mask)


POOLERS = {"cls": ClsPool, "mean": MeanPool, "cnn": CNNPool, "bilstm": BiLSTMPool}


class ConcatPool(nn.Module):
    """Concatenation of poolers, e.g. `mean+cnn+bilstm` (002's SBERT + CNN-BiLSTM sentence vector)."""
    def __init__(self, hidden, names: list[str]):
        super().__init__()
        unknown = [n for n in names if n not in POOLERS]
        if unknown:
            raise ValueError(f"unknown pooling {unknown}; choose from {sorted(POOLERS)} joined by '+'")
        self.parts = nn.ModuleList(POOLERS[n](hidden) for n in names)
        self.dim = sum(p.dim for p in self.parts)

    def forward(self, out, mask):
        return torch.cat([p(out, mask) for p in self.parts], -1)


# ---------------------------------------------------------------- heads

class LinearHead(nn.Module):
    """Dropout + linear layer on one sentence (or cross-encoded pair) vector."""

    def __init__(self, dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, a: Rep):
        return self.proj(self.dropout(a.vec))


class _PairFeatures(nn.Module):
    """Pair head = feature map of (u, v), then dropout, an optional shared first layer, a linear layer."""
    n_features = 1

    def __init__(self, dim: int, out_dim: int, dropout: float, shared: nn.Module | None = None):
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


class ConcatPairHead(_PairFeatures):
    """SBERT's classifier input [u; v; |u-v|; u*v]."""
    n_features = 4

    def features(self, a, b):
        u, v = a.vec, b.vec
        return torch.cat([u, v, (u - v).abs(), u * v], -1)


class DiffProdPairHead(_PairFeatures):
    """[|u-v|; u*v]: symmetric in u and v."""
    n_features = 2

    def features(self, a, b):
        return torch.cat([(a.vec - b.vec).abs(), a.vec * b.vec], -1)


class AttentionPairHead(_PairFeatures):
    """Dot-product attention between the two token sequences (paper 000's Arc1 attention): each
    token attends over the other sentence, and [mean(a - ã); mean(a * ã); mean(b - b̃); mean(b * b̃)]
    compares every token with what it aligns to. Reads token states, so its width is the hidden size."""
    n_features = 4

    def features(self, a, b):
        A, B = a.tokens, b.tokens
        scores = A @ B.transpose(1, 2) / A.shape[-1] ** 0.5               # [N, Ta, Tb]
        neg = torch.finfo(scores.dtype).min
        a_to_b = scores.masked_fill(~b.mask.bool()[:, None, :], neg).softmax(-1) @ B
        b_to_a = scores.transpose(1, 2).masked_fill(~a.mask.bool()[:, None, :], neg).softmax(-1) @ A
        return torch.cat([masked_mean(A - a_to_b, a.mask), masked_mean(A * a_to_b, a.mask),
                          masked_mean(B - b_to_a, b.mask), masked_mean(B * b_to_a, b.mask)], -1)


class CosinePairHead(nn.Module):
    """a * cos(u, v) + b with learned a, b. Regression starts at 2.5 (cos + 1) to map [-1,1] -> [0,5]."""

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


PAIR_HEADS = {"concat": ConcatPairHead, "diffprod": DiffProdPairHead, "attention": AttentionPairHead,
              "cosine": CosinePairHead}
PAIR_ENCODINGS = ("cross", "bi", "cross+cos")


def build_pooler(name: str, hidden: int) -> nn.Module:
    names = name.split("+")
    return POOLERS[names[0]](hidden) if len(names) == 1 and names[0] in POOLERS else ConcatPool(hidden, names)


class MultitaskModel(nn.Module):
    def __init__(self, encoder: BertModel, tasks: list[TaskSpec], pair_encoding: dict[str, str],
                 bi_head: str = "concat", pooling: str = "cls", dropout: float = 0.1,
                 shared_pair_layer: int = 0):
        super().__init__()
        self.encoder = encoder
        self.tasks = {t.name: t for t in tasks}
        self.pair_encoding = {t.name: (pair_encoding.get(t.name, "cross") if t.is_pair else "single") for t in tasks}
        self.pooling, self.bi_head, self.shared_pair_layer = pooling, bi_head, shared_pair_layer
        hidden = encoder.config.hidden_size
        self.pooler = build_pooler(pooling, hidden)
        dim = self.pooler.dim
        if bi_head not in PAIR_HEADS:
            raise ValueError(f"unknown bi-encoder head {bi_head!r}; choose from {sorted(PAIR_HEADS)}")
        bi_tasks = [t for t in tasks if self.pair_encoding[t.name] == "bi"]
        # Optional first layer shared by all bi-encoded pair tasks (paper 003: Para and STS).
        self.shared_pair = None
        if shared_pair_layer and bi_head in ("concat", "diffprod", "attention") and len(bi_tasks) > 1:
            width = PAIR_HEADS[bi_head].n_features * (hidden if bi_head == "attention" else dim)
            self.shared_pair = nn.Sequential(nn.Linear(width, shared_pair_layer), nn.LeakyReLU())
        heads = {}
        for t in tasks:
            out_dim, mode = t.kind.out_dim(t.num_labels), self.pair_encoding[t.name]
            regression = t.kind is REGRESSION
            if mode == "bi":
                if bi_head == "cosine" and out_dim != 1:
                    raise ValueError(f"the cosine head gives one score; task {t.name} needs {out_dim} outputs")
                extra = {"regression": regression} if bi_head == "cosine" else {"shared": self.shared_pair}
                width = hidden if bi_head == "attention" else dim
                heads[t.name] = PAIR_HEADS[bi_head](width, out_dim, dropout, **extra)
            elif mode == "cross+cos":
                heads[t.name] = CrossPlusCosineHead(dim, out_dim, dropout, regression)
            elif mode in ("cross", "single"):
                heads[t.name] = LinearHead(dim, out_dim, dropout)
            else:
                raise ValueError(f"pair encoding for {t.name} must be one of {PAIR_ENCODINGS}, got {mode!r}")
            if regression and t.label_range and mode in ("cross", "single"):  # start mid-range
                nn.init.constant_(heads[t.name].proj.bias, sum(t.label_range) / 2)
        self.heads = nn.ModuleDict(heads)
        self.extensions: dict[str, dict] = {}  # structural techniques applied (see Technique.restore)

    def encode(self, inputs: dict, inputs_embeds=None) -> Rep:
        out = self.encoder(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                           inputs_embeds=inputs_embeds)
        return Rep(self.pooler(out, inputs["attention_mask"]), out["last_hidden_state"], inputs["attention_mask"])

    def embed(self, inputs: dict, inputs_embeds=None) -> torch.Tensor:
        """Pooled sentence vectors of one padded batch."""
        return self.encode(inputs, inputs_embeds).vec

    def forward(self, task: str, inputs: list[dict], inputs_embeds: list | None = None) -> torch.Tensor:
        """Logits (or scores) for one batch of `task`. `inputs` holds the padded sequence batches the
        task's encoding needs (one; two for bi-encoding; pair then each side for cross+cos);
        `inputs_embeds` optionally replaces their word embeddings."""
        embeds = inputs_embeds or [None] * len(inputs)
        return self.heads[task](*[self.encode(x, e) for x, e in zip(inputs, embeds)])
