"""Text augmentations for consistency training (UDA) [000]: built-in word-level noise, or a file.

Built-ins are functions `(text, rng) -> text` that need no network or model. Paper 000 used
LLM back-translations and paraphrases; those are brought in as a file of augmentations keyed by
example id (`read_augment_file`). No synonym replacement: no lexicon (WordNet etc.) ships with
the environment, and a synonym file can be brought the same way.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from mtbert.core.errors import DataError
from mtbert.core.registry import Registry
from mtbert.core.tasks import format_of_path
from mtbert.data.readers import MAX_FIELD_CHARS, ReadReport, header_of, log, read_rows

MASK = "[MASK]"  # BERT's mask token; the tokenizer keeps it as one special token

# name -> `(text, rng) -> text`; a user's own: `my_module:my_function` in `uda.augment`
AUGMENTATIONS: Registry[Callable[[str, random.Random], str]] = Registry("augmentation")
register = AUGMENTATIONS.register
get_augmentation = AUGMENTATIONS.get


@register
def token_dropout(text: str, rng: random.Random, p: float = 0.1) -> str:
    """Drop each word with probability p; at least one word goes (so the text changes), one stays."""
    words = text.split()
    if len(words) < 2:
        return text
    keep = [w for w in words if rng.random() >= p]
    if len(keep) == len(words):
        keep.pop(rng.randrange(len(keep)))
    return " ".join(keep or [rng.choice(words)])


@register
def swap(text: str, rng: random.Random, p: float = 0.1) -> str:
    """Swap max(1, round(p·n)) random pairs of adjacent words."""
    words = text.split()
    if len(words) < 2:
        return text
    for _ in range(max(1, round(p * len(words)))):
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _span(n: int, rng: random.Random, frac: float, longest: int) -> tuple[int, int]:
    length = min(longest, max(1, round(frac * n)))
    start = rng.randrange(n - length + 1)
    return start, start + length


@register
def mask_span(text: str, rng: random.Random, frac: float = 0.15) -> str:
    """Replace a random span of ~frac of the words by [MASK], one per word (000's random-mask, unfilled)."""
    words = text.split()
    if not words:
        return text
    a, b = _span(len(words), rng, frac, len(words))
    return " ".join(words[:a] + [MASK] * (b - a) + words[b:])


@register
def drop_span(text: str, rng: random.Random, frac: float = 0.15) -> str:
    """Delete a random span of ~frac of the words (never the whole text)."""
    words = text.split()
    if len(words) < 2:
        return text
    a, b = _span(len(words), rng, frac, len(words) - 1)
    return " ".join(words[:a] + words[b:])


def augment_texts(texts: tuple[str, ...], names: list[str], rng: random.Random) -> tuple[str, ...]:
    """One built-in augmentation, drawn from `names`, applied to each sentence of an example."""
    fn = get_augmentation(rng.choice(names))
    return tuple(fn(t, rng) for t in texts)


# ---------------------------------------------------------------- user-provided augmentations

SINGLE_COLUMNS, PAIR_COLUMNS = ("text", "sentence"), ("sentence1", "sentence2")


def _texts_of(row: dict) -> tuple[str, ...] | None:
    """(text,) or (sentence1, sentence2) from a row; None if it has neither."""
    if all(c in row for c in PAIR_COLUMNS):
        return tuple(row[c] for c in PAIR_COLUMNS)
    for c in SINGLE_COLUMNS:
        if c in row:
            return (row[c],)
    return None


def read_augment_file(path: str | Path) -> tuple[dict[str, list[tuple[str, ...]]], ReadReport]:
    """id -> augmented texts from a .tsv, .csv or .jsonl file with columns `id` plus `text` (or
    `sentence`) for single sentences, or `sentence1`, `sentence2` for pairs. An id may appear on
    several rows (several paraphrases). Malformed rows are skipped and counted, never fatal."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"augmentation file not found: {path}")
    fmt = format_of_path(path, default="tsv")
    header = header_of(path, fmt)
    if header is not None and ("id" not in header or _texts_of(dict.fromkeys(header, "")) is None):
        raise DataError(f"{path}: header needs id and text (or sentence1, sentence2); found {header}")
    report, out = ReadReport(str(path)), {}
    for row in read_rows(path, fmt, report=report):
        if row.get("id") is None or not str(row["id"]).strip():
            report.skip("missing id")
            continue
        texts = _texts_of({k: v for k, v in row.items() if v is not None})
        if texts is None:
            report.skip("missing fields")
            continue
        if not all(isinstance(t, str) for t in texts):
            report.skip("text not a string")
            continue
        texts = tuple(t.strip() for t in texts)
        if any(t == "" for t in texts):
            report.skip("empty field")
            continue
        if any(len(t) > MAX_FIELD_CHARS for t in texts):
            report.skip("text too long")
            continue
        out.setdefault(str(row["id"]).strip(), []).append(texts)
    if report.skipped:
        log.warning("%s", report)
    return out, report
