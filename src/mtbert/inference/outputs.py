"""What inference writes and prints: prediction records (label names, probabilities, scores),
prediction files for any input (streamed, so a file of any size runs in flat memory), the
CS224N leaderboard files, and metric tables. Every file is written beside its destination and
renamed into place, so a reader never sees half a file."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from mtbert.core.errors import DataError
from mtbert.core.io import atomic_write_text, atomic_writer
from mtbert.core.tasks import TaskSpec, format_of_path
from mtbert.data.readers import (
    ENCODING_HINT,
    ReadReport,
    examples_from_rows,
    header_of,
    read_rows,
)
from mtbert.inference.predictor import BasePredictor, load_examples

# ---------------------------------------------------------------- records

def prediction_records(task: TaskSpec, out: dict[str, np.ndarray]) -> list[dict]:
    """One JSON-ready record per example: the label (name) and index with the class
    probabilities, P(positive) for binary tasks, or the score."""
    records = []
    for i in range(len(out["pred"])):
        if task.kind.scores:
            records.append({"score": round(float(out["pred"][i]), 6)})
            continue
        index = int(out["pred"][i])
        rec = {"label": task.label_name(index), "label_index": index}
        prob = np.asarray(out["prob"][i], dtype=np.float64)
        if task.kind.positive_class is not None:  # prob is P(positive)
            rec["probability"] = round(float(prob), 6)
        else:
            rec["probabilities"] = {task.label_name(k): round(float(p), 6) for k, p in enumerate(prob)}
        records.append(rec)
    return records


def _flat(record: dict) -> dict:
    """A record as CSV columns: probabilities become `prob_<label>` columns."""
    flat = {k: v for k, v in record.items() if k != "probabilities"}
    for name, p in record.get("probabilities", {}).items():
        flat[f"prob_{name}"] = p
    return flat


# ---------------------------------------------------------------- any input file

def predict_file(predictor: BasePredictor, task_name: str, input_path: str | Path, out_path: str | Path, *,
                 fmt: str | None = None, delimiter: str | None = None, text_columns: list[str] | None = None,
                 id_column: str | None = None, encoding: str = "utf-8", chunk: int = 1024,
                 progress: bool = True) -> ReadReport:
    """Predict `task_name` for every row of a CSV / TSV / JSONL file and write CSV or JSONL (by
    `out_path`'s suffix), streaming `chunk` rows at a time. Rows without usable text are skipped
    and counted. Output rows keep the input's id (or row number) and add the prediction; an input
    with no rows gives an output with the header only. An input none of whose rows can be
    predicted is an error (DataError, nothing written) that says why: a missing column, an
    encoding."""
    if task_name not in predictor.tasks:
        raise DataError(f"this model has no task {task_name!r}; it has {predictor.tasks}")
    task = predictor.task_spec(task_name)
    input_path, out_path = Path(input_path), Path(out_path)
    if out_path.exists() and input_path.exists() and out_path.resolve() == input_path.resolve():
        raise DataError(f"--out {out_path} is the input file: the predictions would replace it; choose another --out")
    fmt = fmt or format_of_path(input_path)
    columns = tuple(text_columns or task.text_columns)
    if len(columns) != len(task.text_columns):
        raise DataError(f"task {task_name} takes {len(task.text_columns)} text column(s); got {list(columns)}")
    wanted = list(columns) + ([id_column] if id_column else [])
    check_input_columns(input_path, fmt, delimiter, wanted, encoding)
    reading = _reading_task(task, columns, id_column)
    out_fmt = "jsonl" if out_path.suffix.lower() in (".jsonl", ".json") else "csv"
    report = ReadReport(str(input_path))
    found: set[str] = set()  # JSON Lines: every key seen, for the error when no row has the columns
    rows = _noting_keys(read_rows(input_path, fmt, delimiter, report=report, encoding=encoding), found)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    predicted = 0
    with atomic_writer(out_path, newline="") as f:  # the previous file stays until this one is whole
        writer = csv.DictWriter(f, fieldnames=_csv_fields(task)) if out_fmt == "csv" else None
        if writer is not None:
            writer.writeheader()
        with tqdm(desc=f"predict {task_name}", unit=" rows", disable=not progress) as bar:  # (closed on errors too)
            for examples in _chunks(examples_from_rows(reading, rows, report, labeled=False), chunk):
                out = predictor.predict(task_name, examples)
                for ex, rec in zip(examples, prediction_records(task, out)):
                    rec = {"id": ex.id, **rec}
                    if writer is None:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    else:
                        writer.writerow(_flat(rec))
                predicted += len(examples)
                bar.update(len(examples))
        if report.rows and not predicted:
            raise DataError(_nothing_predicted(input_path, report, wanted, found))
    return report


def report_line(report: ReadReport) -> str:
    """What skipping cost, for the line `predict --input` prints ('' when nothing was skipped)."""
    if not report.skipped:
        return ""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.reasons.items()))
    hint = f"; {ENCODING_HINT}" if "undecodable bytes" in report.reasons else ""
    return f"; skipped {report.skipped} rows ({reasons}){hint}"


def _nothing_predicted(path: Path, report: ReadReport, wanted: list[str], found: set[str]) -> str:
    why = f"{path}: none of its {report.rows} rows could be predicted{report_line(report)}"
    absent = [c for c in wanted if c not in found]
    if found and absent and report.reasons.get("missing fields") == report.skipped:
        why += f"; no row has column(s) {absent}: its rows have {sorted(found)[:20]}; choose with --text-column"
    return why


def _noting_keys(rows: Iterator[dict], found: set[str]) -> Iterator[dict]:
    for row in rows:
        if len(found) < 1000:
            found.update(k for k in row if isinstance(k, str))
        yield row


def _csv_fields(task: TaskSpec) -> list[str]:
    """The columns of a CSV prediction file (as _flat lays out prediction_records)."""
    if task.kind.scores:
        return ["id", "score"]
    if task.kind.positive_class is not None:
        return ["id", "label", "label_index", "probability"]
    return ["id", "label", "label_index"] + [f"prob_{task.label_name(k)}" for k in range(task.num_labels)]


def check_input_columns(path: str | Path, fmt: str | None, delimiter: str | None, wanted: list[str],
                        encoding: str = "utf-8") -> None:
    """The input exists and has the `wanted` columns in its header (CSV / TSV; a JSON Lines file's
    rows name their own columns: checked as they are read). Fails naming the columns found and the
    flag that selects one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    header = header_of(path, fmt or format_of_path(path), delimiter, encoding)
    if header is not None:
        absent = [c for c in wanted if c not in header]
        if absent:
            raise DataError(f"{path} has no column(s) {absent}; its columns are {header}; "
                            f"choose with --text-column (and --id-column)")


def _reading_task(task: TaskSpec, columns: tuple[str, ...], id_column: str | None) -> TaskSpec:
    """The task as an input file is read: its text columns renamed, no labels."""
    return dataclasses.replace(task, text_columns=columns, id_column=id_column, label_column=None)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- leaderboard files

def write_prediction_files(predictor: BasePredictor, data_dir, out_dir, splits=("dev", "test")) -> dict[Path, str]:
    """For tasks with `cs224n_output`: {prefix}-{dev|test}-output.csv with the leaderboard's header
    and `id , value` rows. Other tasks: {task}-{split}-predictions.csv (id, label or score, probabilities).
    Returns each file written with its task."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str, str]] = []
    for split in splits:
        names = [t for t in predictor.tasks if predictor.task_spec(t).has_split(split)]
        for name, examples in load_examples([predictor.task_spec(n) for n in names], data_dir, split).items():
            task = predictor.task_spec(name)
            out = predictor.predict(name, examples)
            if task.cs224n_output:
                path = out_dir / f"{task.cs224n_output['prefix']}-{split}-output.csv"
                lines = [f"id \t {task.cs224n_output['header']} \n"]
                for ex, p in zip(examples, out["pred"]):
                    value = f"{float(p):.4f}" if task.kind.scores else int(p)
                    lines.append(f"{ex.id} , {value} \n")
                text = "".join(lines)
            else:
                path = out_dir / f"{name}-{split}-predictions.csv"
                buf = io.StringIO()
                records = [_flat({"id": ex.id, **r}) for ex, r in zip(examples, prediction_records(task, out))]
                writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["id"])
                writer.writeheader()
                writer.writerows(records)
                text = buf.getvalue()
            if path.resolve().parent != out_dir.resolve():  # (task definitions are checked; this is the last word)
                raise DataError(f"task {name}: its prediction file {path.name!r} would fall outside {out_dir}")
            written.append((path, text, name))
    for path, text, _ in written:  # only once every task has been predicted: a failure writes none
        atomic_write_text(path, text)
    return {path: name for path, _, name in written}


def format_table(rows: dict[str, float], title: str = "") -> str:
    width = max(len(k) for k in rows) if rows else 4
    lines = ([title] if title else []) + [f"{'task':<{width}}  metric", "-" * (width + 9)]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in rows.items()]
    return "\n".join(lines)
