"""Tokenization with the `tokenizers` library: single sentences and [CLS] a [SEP] b [SEP] pairs."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from mtbert.core.errors import CheckpointError


class BertTokenizer:
    def __init__(self, tok: Tokenizer, max_length: int = 128):
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3 ([CLS] a [SEP] b [SEP] needs room), got {max_length}")
        self.tok = tok
        self.tok.no_padding()
        self.tok.no_truncation()
        self.max_length = max_length
        self.pad_id = tok.token_to_id("[PAD]") or 0
        self.cls_id = tok.token_to_id("[CLS]")
        self.sep_id = tok.token_to_id("[SEP]")
        if self.cls_id is None or self.sep_id is None:
            raise ValueError("tokenizer has no [CLS]/[SEP] tokens: not a BERT tokenizer")

    @classmethod
    def from_dir(cls, directory: str | Path, max_length: int = 128) -> "BertTokenizer":
        d = Path(directory)
        if not (d / "tokenizer.json").exists() and not (d / "vocab.txt").exists():
            raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {d}")
        try:
            if (d / "tokenizer.json").exists():
                tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            else:
                lower = True
                tc = d / "tokenizer_config.json"
                if tc.exists():
                    lower = json.loads(tc.read_text()).get("do_lower_case", True)
                tok = BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=lower)._tokenizer
            tokenizer = cls(tok, max_length)
            tokenizer.encode_pairs(["A probe, 123."], ["Ünïcode ünknown wörds"])  # fails now, not per request
            return tokenizer
        except Exception as e:  # the tokenizers library raises plain Exceptions for unreadable files
            if isinstance(e, ValueError) and "max_length" in str(e):
                raise
            reason = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"corrupt or unreadable tokenizer in {d}: {reason}") from None

    def save(self, directory: str | Path) -> None:
        self.tok.save(str(Path(directory) / "tokenizer.json"))

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        # Encode without special tokens; we add them ourselves so truncation is under our control.
        return [e.ids for e in self.tok.encode_batch([t if t else "" for t in texts], add_special_tokens=False)]

    def encode(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Return (input_ids, token_type_ids) per text: [CLS] text [SEP], truncated to max_length."""
        out = []
        for ids in self._pieces(texts):
            ids = [self.cls_id] + ids[: self.max_length - 2] + [self.sep_id]
            out.append((ids, [0] * len(ids)))
        return out

    def encode_pairs(self, a: list[str], b: list[str]) -> list[tuple[list[int], list[int]]]:
        """[CLS] a [SEP] b [SEP] with segment ids 0/1; the longer side is trimmed first."""
        out = []
        budget = self.max_length - 3
        for x, y in zip(self._pieces(a), self._pieces(b)):
            if len(x) + len(y) > budget:  # longest-first truncation, in closed form
                half = budget // 2
                if len(x) <= half:
                    y = y[: budget - len(x)]
                elif len(y) <= half:
                    x = x[: budget - len(y)]
                else:
                    x, y = x[: budget - half], y[:half]
            ids = [self.cls_id] + x + [self.sep_id] + y + [self.sep_id]
            out.append((ids, [0] * (len(x) + 2) + [1] * (len(y) + 1)))
        return out
