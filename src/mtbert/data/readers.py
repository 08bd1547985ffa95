"""CS224N CSV readers, data checks, and length-bucketed dynamic-padding batches."""
from __future__ import annotations

import csv
import hashlib
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtbert.core.errors import DataError
from mtbert.core.tasks import TaskSpec

log = logging.getLogger("mtbert")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
MAX_FIELD_CHARS = 100_000  # longer texts are skipped as malformed: they cannot be sentences


@dataclass
class Example:
    id: str
    texts: tuple[str, ...]
    label: int | float | None


@dataclass
class ReadReport:
    path: str
    rows: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return f"{Path(self.path).name}: {self.rows} rows, {self.skipped} malformed skipped" + (f" ({why})" if why else "")


def complete_rows(reader, report: ReadReport, n_fields: int):
    """Rows of a csv.reader that have at least `n_fields` fields; unparseable and short rows are
    counted in `report` as skipped. Every row read is counted in `report.rows`."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            report.rows += 1
            report.skip("unparseable row")
            continue
        report.rows += 1
        if len(row) < n_fields:
            report.skip("missing fields")
            continue
        yield row


def read_task_file(task: TaskSpec, path: str | Path, labeled: bool = True) -> tuple[list[Example], ReadReport]:
    """Read one CS224N tab-separated file; malformed rows are skipped and counted, never fatal."""
    path = Path(path)
    report = ReadReport(str(path))
    if not path.exists():
        raise DataError(f"data file not found: {path} (set --data-dir or MTBERT_DATA)")
    examples: list[Example] = []
    needed = ("id",) + task.text_columns + ((task.label_column,) if labeled else ())
    with open(path, newline="", encoding="utf-8", errors="replace") as fp:
        reader = csv.reader(fp, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path} is empty") from None
        except csv.Error as e:
            raise DataError(f"{path}: unreadable header: {e}") from None
        col = {name.strip(): i for i, name in enumerate(header)}
        absent = [c for c in needed if c not in col]
        if absent:
            raise DataError(f"{path}: header lacks column(s) {absent}; found {header}")
        for row in complete_rows(reader, report, len(header)):
            values = {c: row[col[c]].strip() for c in needed}
            if any(v == "" for v in values.values()):
                report.skip("empty field")
                continue
            if any(len(values[c]) > MAX_FIELD_CHARS for c in task.text_columns):
                report.skip("text too long")
                continue
            label = None
            if labeled:
                try:
                    label = task.parse_label(values[task.label_column])
                except ValueError:
                    report.skip("invalid label")
                    continue
            examples.append(Example(values["id"], tuple(values[c] for c in task.text_columns), label))
    if report.skipped:
        log.warning("%s", report)
    return examples, report


def load_split(task: TaskSpec, data_dir: Path, split: str, limit: int | None = None):
    examples, report = read_task_file(task, Path(data_dir) / task.file(split), labeled=split != "test")
    return (examples[:limit] if limit else examples), report


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_data_dir(data_dir: Path, tasks) -> list[dict]:
    """Checksums against SHA256SUMS plus row / malformed counts per file."""
    data_dir = Path(data_dir)
    sums = {}
    if (data_dir / "SHA256SUMS").exists():
        for line in (data_dir / "SHA256SUMS").read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[name.strip().lstrip("*")] = digest
    results = []
    for task in tasks:
        for split in ("train", "dev", "test"):
            path = data_dir / task.file(split)
            entry = {"file": path.name, "exists": path.exists()}
            if path.exists():
                expected = sums.get(path.name)
                entry["checksum"] = "missing from SHA256SUMS" if expected is None else (
                    "ok" if sha256(path) == expected else "MISMATCH")
                try:
                    ex, rep = read_task_file(task, path, labeled=split != "test")
                    entry.update(rows=rep.rows, examples=len(ex), malformed=rep.skipped, reasons=rep.reasons)
                except DataError as e:
                    entry["error"] = str(e)
            results.append(entry)
    return results


# ---------------------------------------------------------------- encoding and batching

@dataclass
class EncodedDataset:
    """Token ids per example. Pairs hold one sequence (cross-encoding) or two (bi-encoding)."""
    task: TaskSpec
    examples: list[Example]
    inputs: list[tuple]   # per example: ((ids, types),) for one sequence, or two for bi-encoding

    def __len__(self):
        return len(self.examples)

    def length(self, i: int) -> int:
        return sum(len(seq[0]) for seq in self.inputs[i])


def encode_dataset(task: TaskSpec, examples: list[Example], tokenizer, pair_mode: str = "cross") -> EncodedDataset:
    if not task.is_pair:
        enc = [(x,) for x in tokenizer.encode([e.texts[0] for e in examples])]
    elif pair_mode == "cross":
        enc = [(x,) for x in tokenizer.encode_pairs([e.texts[0] for e in examples], [e.texts[1] for e in examples])]
    elif pair_mode in ("bi", "cross+cos"):
        a = tokenizer.encode([e.texts[0] for e in examples])
        b = tokenizer.encode([e.texts[1] for e in examples])
        if pair_mode == "bi":
            enc = list(zip(a, b))
        else:  # the pair as one sequence, then each side alone
            pair = tokenizer.encode_pairs([e.texts[0] for e in examples], [e.texts[1] for e in examples])
            enc = list(zip(pair, a, b))
    else:
        raise ValueError(f"pair encoding must be 'cross', 'bi' or 'cross+cos', got {pair_mode!r}")
    return EncodedDataset(task, examples, enc)


def pad(seqs: list[tuple[list[int], list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    types = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (x, t) in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        types[i, : len(t)] = torch.tensor(t)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def collate(ds: EncodedDataset, indices: list[int], pad_id: int = 0) -> dict:
    """Pad each sequence slot to the longest in this batch (dynamic padding)."""
    n_slots = len(ds.inputs[indices[0]])
    batch = {"inputs": [pad([ds.inputs[i][s] for i in indices], pad_id) for s in range(n_slots)],
             "indices": torch.tensor(indices)}
    labels = [ds.examples[i].label for i in indices]
    if labels[0] is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], float) else torch.long)
    return batch


def make_batches(ds: EncodedDataset, batch_size: int, shuffle: bool, bucket: bool, rng: random.Random,
                 bucket_factor: int = 50) -> list[list[int]]:
    """Index batches. Bucketing sorts within windows of `bucket_factor` batches by length so
    batches are near-uniform in length (little padding) yet the order stays random."""
    idx = list(range(len(ds)))
    if shuffle:
        rng.shuffle(idx)
    if bucket:
        window = batch_size * bucket_factor
        idx = [i for s in range(0, len(idx), window)
               for i in sorted(idx[s: s + window], key=ds.length)]
    batches = [idx[s: s + batch_size] for s in range(0, len(idx), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
