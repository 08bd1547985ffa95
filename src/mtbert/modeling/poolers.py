"""Poolers: token states [B, T, H] -> one sentence vector [B, D] per sequence.

Chosen by `model.pooling`: a registered name, or several joined by '+' (concatenated).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert.core.errors import ConfigError
from mtbert.core.registry import Registry

POOLERS: Registry[type] = Registry("pooling")
ALL_EXPORTS = ("hf", "sentence-transformers", "onnx")  # what a pooler can be exported to, unless it says less


def masked_mean(x, mask):
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def masked_max(x, mask):
    return x.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(x.dtype).min).max(1).values


@POOLERS.register(name="cls")
class ClsPool(nn.Module):
    """BERT's pooler output: tanh(W h_[CLS])."""
    exports, export_note = ALL_EXPORTS, ""
    def __init__(self, hidden):
        super().__init__()
        self.dim = hidden

    def forward(self, out, mask):
        return out["pooler_output"]


@POOLERS.register(name="mean")
class MeanPool(nn.Module):
    """SBERT mean pooling over real (non-padding) tokens."""
    exports, export_note = ALL_EXPORTS, ""
    def __init__(self, hidden):
        super().__init__()
        self.dim = hidden

    def forward(self, out, mask):
        return masked_mean(out["last_hidden_state"], mask)


@POOLERS.register(name="cnn")
class CNNPool(nn.Module):
    """n-gram convolutions (n = 1..4) over token states, max-pooled over real positions [002]."""
    exports, export_note = ("hf", "onnx"), "sentence-transformers holds `cls` or `mean` pooling only"
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


@POOLERS.register(name="bilstm")
class BiLSTMPool(nn.Module):
    """A BiLSTM over token states, max-pooled over real positions [002]; padding is packed away."""
    exports = ("hf",)
    export_note = ("it runs on packed sequences, which torch.export cannot trace; sentence-transformers holds "
                   "`cls` or `mean` pooling only")
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




class ConcatPool(nn.Module):
    """Concatenation of poolers, e.g. `mean+cnn+bilstm` (002's SBERT + CNN-BiLSTM sentence vector)."""
    def __init__(self, hidden, names: list[str]):
        super().__init__()
        unknown = [n for n in names if n not in POOLERS]
        if unknown:
            raise ConfigError(f"unknown pooling {unknown}; choose from {sorted(POOLERS)} joined by '+'")
        self.parts = nn.ModuleList(POOLERS[n](hidden) for n in names)
        self.dim = sum(p.dim for p in self.parts)

    def forward(self, out, mask):
        return torch.cat([p(out, mask) for p in self.parts], -1)



def build_pooler(name: str, hidden: int) -> nn.Module:
    names = name.split("+")
    return POOLERS[names[0]](hidden) if len(names) == 1 and names[0] in POOLERS else ConcatPool(hidden, names)
