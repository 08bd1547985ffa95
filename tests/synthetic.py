"""Small synthetic data in the CS224N layout, so that the suite needs no ../shared/data.

The files have the real ones' names, header and tab-separated layout (an unnamed row-number
column, then id, texts, label), a learnable signal (sentiment words, shuffled duplicates, word
overlap), "" quoting in some rows, and one malformed row in the Quora dev and test files, like
the real data. `make_cs224n_data(dir)` writes them with a SHA256SUMS file.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

POSITIVE = ["good", "great", "lovely", "brilliant", "moving", "fine", "charming", "superb"]
NEGATIVE = ["bad", "dull", "awful", "boring", "messy", "weak", "tedious", "poor"]
NEUTRAL = ["film", "movie", "story", "actor", "plot", "scene", "script", "music", "the", "a", "is", "was"]
TOPICS = ["cooking", "travel", "music", "football", "python", "history", "chess", "gardening", "physics", "poetry"]
SIZES = {"train": 160, "dev": 48, "test": 30}


def _sentence(rng: random.Random, valence: int) -> str:
    """valence in -2..2: that many more positive than negative words."""
    pos, neg = max(valence, 0) + rng.randint(0, 1), max(-valence, 0) + rng.randint(0, 1)
    words = [rng.choice(POSITIVE) for _ in range(pos)] + [rng.choice(NEGATIVE) for _ in range(neg)]
    words += [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 8))]
    rng.shuffle(words)
    text = " ".join(words)
    return f'"the ""{text}"" one"' if rng.random() < 0.05 else text  # CSV quoting, as in the real files


def _question(rng: random.Random) -> list[str]:
    return [rng.choice(["how", "what", "why", "where"]), "is", rng.choice(TOPICS)] + \
        [rng.choice(NEUTRAL + TOPICS) for _ in range(rng.randint(2, 6))]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = ["\t".join([""] + header)] + ["\t".join([str(i)] + r) for i, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_cs224n_data(root: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    n = 0

    def uid() -> str:
        nonlocal n
        n += 1
        return f"{n:025x}"

    for split, size in SIZES.items():
        labeled = split != "test"
        file_split = "test-student" if split == "test" else split
        # SST: 5 classes from the balance of sentiment words
        rows = []
        for _ in range(size):
            label = rng.randint(0, 4)
            rows.append([uid(), _sentence(rng, label - 2)] + ([str(label)] if labeled else []))
        _write(root / f"ids-sst-{file_split}.csv", ["id", "sentence"] + (["sentiment"] if labeled else []), rows)
        # CFIMDB: 2 classes
        rows = []
        for _ in range(size // 2):
            label = rng.randint(0, 1)
            rows.append([uid(), _sentence(rng, 2 if label else -2)] + ([str(label)] if labeled else []))
        _write(root / f"ids-cfimdb-{file_split}.csv", ["id", "sentence"] + (["sentiment"] if labeled else []), rows)
        # Quora: a duplicate is the same question reordered; one malformed row (an empty field)
        rows = []
        for i in range(size):
            a = _question(rng)
            dup = rng.random() < 0.4
            b = a[:3] + rng.sample(a[3:], len(a) - 3) if dup else _question(rng)
            row = [uid(), " ".join(a) + "?", " ".join(b) + "?"] + ([f"{float(dup):.1f}"] if labeled else [])
            if split != "train" and i == 7:
                row[2] = ""
            rows.append(row)
        _write(root / f"quora-{file_split}.csv",
               ["id", "sentence1", "sentence2"] + (["is_duplicate"] if labeled else []), rows)
        # STS: similarity = 5 × the share of words kept
        rows = []
        for _ in range(size):
            a = _question(rng)
            keep = rng.randint(0, len(a))
            b = a[:keep] + [rng.choice(NEUTRAL + TOPICS) for _ in range(len(a) - keep)]
            score = round(5 * keep / len(a), 1)
            rows.append([uid(), " ".join(a), " ".join(b)] + ([f"{score}"] if labeled else []))
        _write(root / f"sts-{file_split}.csv",
               ["id", "sentence1", "sentence2"] + (["similarity"] if labeled else []), rows)
    sums = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(root.glob("*.csv"))]
    (root / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return root
