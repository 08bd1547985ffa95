"""Tokenization with the `tokenizers` library: single sentences and sentence pairs, as each encoder
family formats them (the `style`, from the encoder's family):

    style     single               pair                          token types
    bert      [CLS] a [SEP]        [CLS] a [SEP] b [SEP]         0 for a's side, 1 for b's
    roberta   <s> a </s>           <s> a </s></s> b </s>         all 0 (RoBERTa, MPNet)

The word pieces come from the directory's tokenizer.json (WordPiece, byte-level BPE, ...), or
from vocab.txt (BERT) or vocab.json + merges.txt (RoBERTa) where there is none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer


@dataclass(frozen=True)
class PairStyle:
    cls: str         # first token of every sequence
    sep: str         # closes each side
    pad: str
    pair_sep: int    # separators between the two sides of a pair
    segments: bool   # the second side gets token type 1


STYLES = {"bert": PairStyle("[CLS]", "[SEP]", "[PAD]", pair_sep=1, segments=True),
          "roberta": PairStyle("<s>", "</s>", "<pad>", pair_sep=2, segments=False)}


def detect_style(tok: Tokenizer) -> str:
    """The style a tokenizer.json's post-processor uses (RoBERTa's for RoBERTa and MPNet), else bert."""
    try:
        processor = json.loads(tok.to_str()).get("post_processor") or {}
    except ValueError:
        processor = {}
    return "roberta" if processor.get("type") == "RobertaProcessing" else "bert"

from mtbert.core.errors import CheckpointError, ConfigError, DataError
from mtbert.core.io import read_run_text


class BertTokenizer:
    """Encodes texts for one encoder family (see the module docstring); the name is historical."""

    def __init__(self, tok: Tokenizer, max_length: int = 128, style: str | None = None):
        style = style or detect_style(tok)
        if style not in STYLES:
            raise ValueError(f"tokenizer style must be one of {sorted(STYLES)}, got {style!r}")
        self.style, s = style, STYLES[style]
        self.single_overhead = 2                    # special tokens around one text
        self.pair_overhead = 2 + s.pair_sep         # ... and around a pair
        if max_length < self.pair_overhead:
            raise ConfigError(f"max_length must be at least {self.pair_overhead} (a pair's special tokens need "
                             f"room), got {max_length}")
        self.tok = tok
        self.tok.no_padding()
        self.tok.no_truncation()
        self.max_length = max_length
        self.cls_id = tok.token_to_id(s.cls)
        self.sep_id = tok.token_to_id(s.sep)
        if self.cls_id is None or self.sep_id is None:
            raise CheckpointError(f"tokenizer has no {s.cls}/{s.sep} tokens: not a {style}-style tokenizer")
        pad = tok.token_to_id(s.pad)
        if pad is None and style != "bert":  # (BERT vocabularies without [PAD] pad with id 0, as before)
            raise CheckpointError(f"tokenizer has no {s.pad} token: not a {style}-style tokenizer")
        self.pad_id = pad or 0
        self._segments, self._pair_sep = s.segments, [self.sep_id] * s.pair_sep

    @classmethod
    def from_dir(cls, directory: str | Path, max_length: int = 128, style: str | None = None) -> "BertTokenizer":
        """`style`: the encoder family's pair style; None reads it from tokenizer.json."""
        d = Path(directory)
        try:
            if (d / "tokenizer.json").exists():
                tokenizer = cls(Tokenizer.from_str(read_run_text(d / "tokenizer.json")), max_length, style)
            elif (d / "vocab.txt").exists():
                lower = True
                tc = d / "tokenizer_config.json"
                if tc.exists():
                    lower = json.loads(tc.read_text()).get("do_lower_case", True)
                tokenizer = cls(BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=lower)._tokenizer, max_length,
                                style or "bert")
            elif (d / "vocab.json").exists() and (d / "merges.txt").exists():  # RoBERTa without tokenizer.json
                bpe = ByteLevelBPETokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
                tokenizer = cls(bpe._tokenizer, max_length, style or "roberta")
            else:
                raise FileNotFoundError(f"no tokenizer.json, vocab.txt or vocab.json + merges.txt in {d}")
            tokenizer.encode_pairs(["A probe, 123."], ["Ünïcode ünknown wörds"])  # fails now, not per request
            return tokenizer
        except FileNotFoundError:
            raise
        except Exception as e:  # the tokenizers library raises plain Exceptions for unreadable files
            if isinstance(e, ValueError) and "max_length" in str(e):
                raise
            reason = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"corrupt or unreadable tokenizer in {d}: {reason}") from None

    def save(self, directory: str | Path) -> None:
        self.tok.save(str(Path(directory) / "tokenizer.json"))

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        # Encode without special tokens; we add them ourselves so truncation is under our control.
        try:
            encoded = self.tok.encode_batch([t if t else "" for t in texts], add_special_tokens=False)
        except BaseException as e:  # a Rust panic (a crafted tokenizer.json's regex) is a BaseException
            if not type(e).__name__ == "PanicException":
                raise
            raise DataError(f"the tokenizer failed on this input (a panic in its rules: "
                            f"{' '.join(str(e).split())[:200]})") from None
        return [e.ids for e in encoded]

    def encode(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Return (input_ids, token_type_ids) per text: [CLS] text [SEP] (<s> text </s>),
        truncated to max_length."""
        return self.encode_flagged(texts)[0]

    def encode_flagged(self, texts: list[str]) -> tuple[list[tuple[list[int], list[int]]], list[bool]]:
        """`encode`, and per text whether it was cut to fit max_length."""
        out, cut = [], []
        for ids in self._pieces(texts):
            cut.append(len(ids) + self.single_overhead > self.max_length)
            ids = [self.cls_id] + ids[: self.max_length - 2] + [self.sep_id]
            out.append((ids, [0] * len(ids)))
        return out, cut

    def encode_pairs(self, a: list[str], b: list[str]) -> list[tuple[list[int], list[int]]]:
        """[CLS] a [SEP] b [SEP] with segment ids 0/1 (<s> a </s></s> b </s>, all 0);
        the longer side is trimmed first."""
        return self.encode_pairs_flagged(a, b)[0]

    def encode_pairs_flagged(self, a: list[str], b: list[str]) -> tuple[list[tuple[list[int], list[int]]], list[bool]]:
        """`encode_pairs`, and per pair whether it was cut to fit max_length."""
        out, cut = [], []
        budget = self.max_length - self.pair_overhead
        for x, y in zip(self._pieces(a), self._pieces(b)):
            cut.append(len(x) + len(y) > budget)
            if cut[-1]:  # longest-first truncation, in closed form
                half = budget // 2
                if len(x) <= half:
                    y = y[: budget - len(x)]
                elif len(y) <= half:
                    x = x[: budget - len(y)]
                else:
                    x, y = x[: budget - half], y[:half]
            first = [self.cls_id] + x + self._pair_sep
            ids = first + y + [self.sep_id]
            out.append((ids, [0] * len(first) + [int(self._segments)] * (len(y) + 1)))
        return out, cut
