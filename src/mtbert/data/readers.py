"""Readers for task files (CSV, TSV, JSON Lines, or a Hugging Face dataset), data checks, and
length-bucketed dynamic-padding batches.

Reading never stops at a bad row: it is skipped and counted by reason (ReadReport). What counts
as bad: undecodable bytes, an unparseable line, missing or extra fields, an empty or over-long
text, an invalid label. Tab-separated files (the CS224N format) are read one line per record: a
quoted field (the CS224N files use "" escapes) cannot run past the end of its line, so a stray
quote costs at most its own row, counted, and never merges rows. Comma-separated files follow RFC
4180 as Python's csv module and pandas write them: a quoted field may hold newlines, so a review
with a line break is one record; a record still open after MAX_RECORD_CHARS characters is a stray
quote, skipped and counted, and reading resumes on the line after it began. A byte-order mark
before the header is dropped. Ids of files without an id column are record numbers, counting
skipped records too. Files are UTF-8 unless told otherwise (`encoding:` in a task definition,
`--encoding` for `predict --input`); a file that does not decode says how to name its encoding.
"""
from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from mtbert.core.errors import DataError
from mtbert.core.io import lies_under, sha256, text_encoding
from mtbert.core.tasks import FORMATS, TaskSpec

log = logging.getLogger("mtbert")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
MAX_FIELD_CHARS = 100_000  # longer texts are skipped as malformed: they cannot be sentences
MAX_RECORD_CHARS = 200_000  # a CSV record spanning lines ends within this, or it is a stray quote
NOT_CHECKED = "-"  # data check: a file outside the data directory has no checksum to compare
ENCODING_HINT = "give the file's encoding: --encoding (e.g. latin-1) for predict --input, encoding: in a task definition"


def check_encoding(encoding: str) -> str:
    try:
        return text_encoding(encoding)
    except ValueError as e:
        raise DataError(f"encoding: {e}") from None


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


# ---------------------------------------------------------------- rows of a file

def _decoded_lines(fp, report: ReadReport, encoding: str = "utf-8") -> Iterator[str]:
    """Text lines of a binary file; a line that does not decode is counted (it is a row) and dropped."""
    check_encoding(encoding)
    if codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        yield from _decoded_wide_lines(fp, report, encoding)  # (a newline byte may sit inside a character)
        return
    first = True
    for raw in fp:
        try:
            line = raw.decode(encoding)
        except UnicodeDecodeError:
            if first:
                raise DataError(f"{report.path}: the first line is not {encoding} text; {ENCODING_HINT}") from None
            report.rows += 1
            report.skip("undecodable bytes")
            continue
        if first:
            line, first = line.removeprefix("\ufeff"), False  # byte-order mark
        yield line


def _decoded_wide_lines(fp, report: ReadReport, encoding: str) -> Iterator[str]:
    """Lines of a UTF-16 / UTF-32 file (its codec drops the byte-order mark). Bytes that do not
    decode end the file as one counted row: a wide encoding cannot resynchronise on a line break."""
    text = io.TextIOWrapper(fp, encoding=encoding, newline="")
    try:
        yield from text
    except UnicodeDecodeError:
        report.rows += 1
        report.skip("undecodable bytes")
    finally:
        if not fp.closed:  # (the caller's file: not the wrapper's to close)
            text.detach()


class _RecordTooLong(Exception):
    pass


def _csv_records(lines: Iterator[str], delimiter: str, max_chars: int) -> Iterator[list[str] | None]:
    """RFC 4180 records: a quoted field may hold delimiters, newlines and "" escapes. A record
    that is unterminated, malformed or longer than `max_chars` (a stray quote) is None, and reading
    resumes at the line after its first one: one bad quote costs a bounded stretch, never the rest
    of the file."""
    taken: list[str] = []  # the lines of the record being read

    def feed(source: Iterator[str]):
        size = 0
        for line in source:
            taken.append(line)
            size += len(line)
            if size > max_chars and len(taken) > 1:
                raise _RecordTooLong
            yield line
            if not taken:  # a record ended with that line
                size = 0

    source = lines
    while True:
        reader = csv.reader(feed(source), delimiter=delimiter, strict=True)
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except (csv.Error, _RecordTooLong):
                yield None
                source, taken[:] = itertools.chain(taken[1:], source), []
                break
            taken.clear()
            yield record


def _split_lines(lines: Iterator[str], delimiter: str, report: ReadReport, one_line_records: bool):
    """Lists of fields (None for a record that cannot be parsed). With `one_line_records` (TSV),
    each line is parsed alone, so an unbalanced quote is an error of that line only; otherwise
    records follow RFC 4180 (_csv_records)."""
    if not one_line_records:
        yield from _csv_records(lines, delimiter, MAX_RECORD_CHARS)
        return
    for line in lines:
        line = line.rstrip("\r\n")
        try:
            yield next(csv.reader([line], delimiter=delimiter, strict=True))
        except (csv.Error, StopIteration):
            yield None


def read_rows(path: str | Path, fmt: str, delimiter: str | None = None, columns: tuple[str, ...] | None = None,
              report: ReadReport | None = None, encoding: str = "utf-8") -> Iterator[dict]:
    """Stream the rows of a CSV / TSV / JSON Lines file as mappings column -> value. Rows that
    cannot be parsed, and rows with fewer or more fields than the header, are counted in
    `report` and skipped. `columns` names the columns of a file without a header row."""
    path = Path(path)
    report = report if report is not None else ReadReport(str(path))
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file")
    with open(path, "rb") as fp:
        lines = _decoded_lines(fp, report, encoding)
        if fmt == "jsonl":
            for line in lines:
                if not line.strip():
                    continue
                report.rows += 1
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    report.skip("unparseable row")
                    continue
                if not isinstance(row, dict):
                    report.skip("row is not a JSON object")
                    continue
                yield row
            return
        sep = delimiter or FORMATS[fmt]
        rows = _split_lines(lines, sep, report, one_line_records=sep != ",")
        header = list(columns) if columns else next(rows, [])
        if header is None:
            raise DataError(f"{path}: unreadable header")
        if not header:
            raise DataError(f"{path} is empty")
        header = [h.strip() for h in header]
        for row in rows:
            if row is not None and not any(f.strip() for f in row):
                continue  # a blank line is no row
            report.rows += 1
            if row is None:
                report.skip("unparseable row")
            elif len(row) < len(header):
                report.skip("missing fields")
            elif len(row) > len(header):
                report.skip("extra fields")
            else:
                yield dict(zip(header, row))


def header_of(path: str | Path, fmt: str, delimiter: str | None = None, encoding: str = "utf-8") -> list[str] | None:
    """The column names of a CSV / TSV file (None for JSON Lines, whose rows name their own)."""
    if fmt == "jsonl":
        return None
    with open(path, "rb") as fp:
        first = next(_decoded_lines(fp, ReadReport(str(path)), encoding), "")
    try:
        return [h.strip() for h in next(csv.reader(io.StringIO(first), delimiter=delimiter or FORMATS[fmt]), [])]
    except csv.Error as e:
        raise DataError(f"{path}: unreadable header: {e}") from None


# ---------------------------------------------------------------- examples of a task

def example_from_row(task: TaskSpec, row: dict, number: int, labeled: bool, report: ReadReport) -> Example | None:
    """One Example from a row mapping, or None (the reason counted in `report`)."""
    texts = []
    for c in task.text_columns:
        value = row.get(c)
        if value is None:
            report.skip("missing fields")
            return None
        if not isinstance(value, str):
            report.skip("text not a string")
            return None
        value = value.strip()
        if value == "":
            report.skip("empty field")
            return None
        if len(value) > MAX_FIELD_CHARS:
            report.skip("text too long")
            return None
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no text a tokenizer can take
                report.skip("invalid text")
                return None
        texts.append(value)
    if task.id_column is None:
        ex_id = str(number)
    else:
        raw_id = row.get(task.id_column)
        ex_id = str(raw_id).strip() if raw_id is not None else ""
        if ex_id == "":
            report.skip("empty field")
            return None
    label = None
    if labeled:
        raw = row.get(task.label_column)
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            report.skip("empty field")
            return None
        try:
            label = task.parse_label(raw)
        except (ValueError, TypeError):
            report.skip("invalid label")
            return None
    return Example(ex_id, tuple(texts), label)


def examples_from_rows(task: TaskSpec, rows: Iterator[dict], report: ReadReport, labeled: bool) -> Iterator[Example]:
    """The usable examples of streamed rows; a row's number counts skipped rows too, so ids of
    files without an id column match their lines."""
    for row in rows:
        ex = example_from_row(task, row, report.rows - 1, labeled, report)
        if ex is not None:
            yield ex


def task_rows(task: TaskSpec, split: str, data_dir: str | Path, report: ReadReport) -> Iterator[dict]:
    """The raw rows of one split of a task: from its file, or from its Hugging Face dataset."""
    if task.dataset is not None:
        if task.confined:
            _check_confined_dataset(task, data_dir)
        yield from _dataset_rows(task, split, report)
        return
    path = task.path(split, data_dir)  # (its existence and columns: check_task_columns)
    report.path = str(path)
    yield from read_rows(path, task.format, task.delimiter, task.columns, report, task.encoding)


def _check_confined_dataset(task: TaskSpec, data_dir: str | Path) -> None:
    """A loaded run's dataset reads only under the data directory: a saved dataset's `path`, or a
    hub `name` that is not a local folder (datasets.load_dataset would read one)."""
    for key in ("path", "name"):
        value = task.dataset.get(key)
        if not value:
            continue
        local = Path(str(value)).expanduser()
        if (key == "path" or local.exists()) and not lies_under(local, data_dir):
            raise DataError(f"task {task.name}: its dataset {key} {value!r} lies outside the data directory "
                            f"{data_dir}; a loaded run's tasks read only under the data directory you give")


def _dataset_rows(task: TaskSpec, split: str, report: ReadReport) -> Iterator[dict]:
    """Rows of a Hugging Face `datasets` split (the optional `datasets` extra)."""
    try:
        import datasets  # optional: pip install 'mtbert[datasets]'
    except ImportError:
        raise DataError(f"task {task.name} reads a Hugging Face dataset: pip install 'mtbert[datasets]'") from None
    spec = task.dataset
    splits = spec.get("splits") or {"train": "train", "dev": "validation", "test": "test"}
    if split not in splits:
        raise DataError(f"task {task.name}: dataset.splits names no {split!r} split (it has {sorted(splits)})")
    report.path = f"{spec.get('path') or spec.get('name')}[{splits[split]}]"
    try:
        if spec.get("path"):
            ds = datasets.load_from_disk(spec["path"])
            ds = ds[splits[split]] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(spec["name"], spec.get("config"), split=splits[split])
    except Exception as e:  # a missing path, a split that is not there, no network for a hub name
        raise DataError(f"task {task.name}: cannot load dataset split {report.path}: {e}") from e
    for row in ds:
        report.rows += 1
        yield row


def read_task_split(task: TaskSpec, split: str, data_dir: str | Path, limit: int | None = None,
                    labeled: bool | None = None) -> tuple[list[Example], ReadReport]:
    """Every usable example of one split (the first `limit`), and the report of what was skipped."""
    labeled = split != "test" if labeled is None else labeled
    check_task_columns(task, data_dir, (split,))
    report = ReadReport(task.name)
    examples = list(itertools.islice(examples_from_rows(task, task_rows(task, split, data_dir, report), report,
                                                        labeled), limit or None))
    if report.skipped:
        log.warning("%s", report)
    if labeled and report.rows and report.reasons.get("invalid label", 0) == report.rows:
        declared = (f"names {list(task.label_names)} or class indices" if task.label_names
                    else f"range {list(task.label_range)}" if task.label_range else "labels")
        raise DataError(f"task {task.name}: no row of {report.path} has a valid label in column "
                        f"{task.label_column!r} (declared: {declared})")
    return examples, report


def read_task_file(task: TaskSpec, path: str | Path, labeled: bool = True) -> tuple[list[Example], ReadReport]:
    """Read one file in the task's format; malformed rows are skipped and counted, never fatal."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path} (set --data-dir or MTBERT_DATA)")
    require_columns(task, path, labeled)
    report = ReadReport(str(path))
    examples = list(examples_from_rows(task, read_rows(path, task.format, task.delimiter, task.columns, report,
                                                       task.encoding), report, labeled))
    if report.skipped:
        log.warning("%s", report)
    return examples, report


def load_split(task: TaskSpec, data_dir: Path, split: str, limit: int | None = None):
    return read_task_split(task, split, data_dir, limit)


def require_columns(task: TaskSpec, path: Path, labeled: bool) -> None:
    """The file's header has the task's columns (JSON Lines rows name their own: not checked)."""
    header = list(task.columns) if task.columns else header_of(path, task.format, task.delimiter, task.encoding)
    if header is None:
        return
    needed = list(task.text_columns) + [task.label_column] * labeled + ([task.id_column] if task.id_column else [])
    absent = [c for c in needed if c not in header]
    if absent:
        raise DataError(f"task {task.name}: {path} header lacks column(s) {absent}; its columns are {header}")


def check_task_columns(task: TaskSpec, data_dir: str | Path, splits=("train", "dev")) -> None:
    """Before any model loads: the task's files exist and have the declared columns."""
    if task.dataset is not None:
        return
    for split in splits:
        if split not in task.files:
            continue
        path = task.path(split, data_dir)
        if not path.exists():
            raise DataError(f"task {task.name}: {split} file not found: {path} (set --data-dir or MTBERT_DATA)")
        require_columns(task, path, labeled=split != "test")


def check_data_dir(data_dir: Path, tasks) -> list[dict]:
    """Checksums against SHA256SUMS (where the directory has one) plus rows and malformed rows,
    by reason, per file of every task."""
    data_dir = Path(data_dir)
    sums = {}
    if (data_dir / "SHA256SUMS").exists():
        for number, line in enumerate((data_dir / "SHA256SUMS").read_text(errors="replace").splitlines(), 1):
            fields = line.split(maxsplit=1)
            if len(fields) == 2:
                sums[fields[1].strip().lstrip("*")] = fields[0]
            elif fields:
                log.warning("SHA256SUMS line %d is not 'DIGEST  NAME': ignored", number)
    results = []
    for task in tasks:
        if task.dataset is not None:
            path = task.dataset.get("path")
            if path and not Path(path).exists():  # (a hub dataset is checked when it is loaded)
                results.append({"task": task.name, "file": f"dataset {path}", "path": str(path), "exists": False})
            continue
        for split in ("train", "dev", "test"):
            if split not in task.files:
                continue
            path = task.path(split, data_dir)
            entry = {"task": task.name, "file": path.name, "path": str(path), "exists": path.exists()}
            if path.exists():
                in_dir = path.parent.resolve() == data_dir.resolve()
                expected = sums.get(path.name) if in_dir else None
                if not in_dir:  # a declared task's own file: the data directory's SHA256SUMS says nothing of it
                    entry["checksum"] = NOT_CHECKED
                else:
                    entry["checksum"] = ("missing from SHA256SUMS" if sums else "no SHA256SUMS") if expected is None \
                        else ("ok" if sha256(path) == expected else "MISMATCH")
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
    truncated: list[bool] | None = None  # per example: was any of its sequences cut to max_length

    def __len__(self):
        return len(self.examples)

    def length(self, i: int) -> int:
        return sum(len(seq[0]) for seq in self.inputs[i])


def encode_dataset(task: TaskSpec, examples: list[Example], tokenizer, pair_mode: str = "cross") -> EncodedDataset:
    """`examples` tokenised for `task` in `pair_mode`, with each example's truncation flag (the
    cross-encoded pair, a bi-encoded side or, for cross+cos, either, cut to fit max_length)."""
    first = [e.texts[0] for e in examples]
    second = [e.texts[1] for e in examples] if task.is_pair else None
    if not task.is_pair:
        enc, cut = tokenizer.encode_flagged(first)
        enc = [(x,) for x in enc]
    elif pair_mode == "cross":
        enc, cut = tokenizer.encode_pairs_flagged(first, second)
        enc = [(x,) for x in enc]
    elif pair_mode in ("bi", "cross+cos"):
        (a, cut_a), (b, cut_b) = tokenizer.encode_flagged(first), tokenizer.encode_flagged(second)
        cut = [x or y for x, y in zip(cut_a, cut_b)]
        if pair_mode == "bi":
            enc = list(zip(a, b))
        else:  # the pair as one sequence, then each side alone
            pair, cut_pair = tokenizer.encode_pairs_flagged(first, second)
            enc, cut = list(zip(pair, a, b)), [x or y for x, y in zip(cut, cut_pair)]
    else:
        raise ValueError(f"pair encoding must be 'cross', 'bi' or 'cross+cos', got {pair_mode!r}")
    return EncodedDataset(task, examples, enc, cut)


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
