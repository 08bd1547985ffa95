"""Input files that used to give exit 0 with nothing predicted (issue: standard files read as
standard): a JSON Lines file keyed other than the task's column, a Latin-1 file, a header-only
file, and `data check` on a task without one valid row. Each now either works (with
--encoding, with the task's `encoding:` key) or fails in one line, exit 2, writing nothing."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from mtbert.apps.cli import main
from tests.conftest import TINY_YAML, error_line, train_tiny_run

LATIN1_ROWS = [("1", "Un film très réussi."), ("2", "Naïve et ennuyeux.")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_data_dir):
    return train_tiny_run(tmp_path_factory.mktemp("input") / "run", synthetic_data_dir, "train.max_steps=1",
                          "train.int8_check=false")


def _predict(run, source, out, *extra) -> int:
    return main(["predict", str(run), "--task", "sst", "--input", str(source), "--out", str(out), "--device", "cpu",
                 *extra])


def _latin1_csv(path):
    path.write_bytes(("id,sentence\n" + "".join(f"{i},{t}\n" for i, t in LATIN1_ROWS)).encode("latin-1"))
    return path


@pytest.mark.parametrize("suffix, content", [
    (".jsonl", "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in LATIN1_ROWS)),
    (".jsonl", json.dumps({"review": "fine"}) + "\n" + json.dumps({"body": "bad"}) + "\n"),
    (".csv", "id,text\n1,A gorgeous film.\n"),
    (".tsv", "id\ttext\n1\tA gorgeous film.\n"),
])
def test_an_input_without_the_task_column_fails_naming_what_it_has(run, tmp_path, capsys, suffix, content):
    source = tmp_path / f"in{suffix}"
    source.write_text(content)
    out = tmp_path / "out.csv"
    assert _predict(run, source, out) == 2
    err = error_line(capsys)
    assert "sentence" in err and "--text-column" in err
    assert ("text" in err or "review" in err) and not out.exists()


def test_the_text_column_flag_then_reads_it(run, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in LATIN1_ROWS))
    out = tmp_path / "out.jsonl"
    assert _predict(run, source, out, "--text-column", "text", "--id-column", "id") == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1", "2"]


def test_a_latin1_file_fails_with_the_encoding_hint_and_reads_with_encoding(run, tmp_path, capsys):
    source = _latin1_csv(tmp_path / "latin1.csv")
    out = tmp_path / "out.csv"
    assert _predict(run, source, out) == 2
    err = error_line(capsys)
    assert "--encoding" in err and "none of its 2 rows" in err and not out.exists()

    assert _predict(run, source, out, "--encoding", "latin-1") == 0
    assert "2 predictions" in capsys.readouterr().out
    assert [r["id"] for r in csv.DictReader(out.open())] == ["0", "1"]  # row numbers: no --id-column


def test_some_undecodable_rows_are_counted_with_the_hint(run, tmp_path, capsys):
    source = tmp_path / "mixed.csv"
    source.write_bytes(b"id,sentence\n1,A fine film.\n2,Un film tr\xe8s r\xe9ussi.\n")
    assert _predict(run, source, tmp_path / "out.csv") == 0
    line = capsys.readouterr().out
    assert "1 predictions; skipped 1 rows (undecodable bytes: 1)" in line and "--encoding" in line


def test_a_header_in_another_encoding_fails_with_the_hint(run, tmp_path, capsys):
    source = tmp_path / "header.csv"
    source.write_bytes("id,phrasé\n1,x\n".encode("latin-1"))
    assert _predict(run, source, tmp_path / "out.csv") == 2
    assert "--encoding" in error_line(capsys)


def test_a_utf16_file_reads_with_encoding(run, tmp_path, capsys):
    source = tmp_path / "utf16.tsv"
    source.write_text("id\tsentence\n" + "".join(f"{i}\t{t}\n" for i, t in LATIN1_ROWS), encoding="utf-16")
    out = tmp_path / "out.csv"
    assert _predict(run, source, out, "--encoding", "utf-16") == 0
    assert [r["id"] for r in csv.DictReader(out.open())] == ["0", "1"]  # row numbers: no --id-column


def test_an_unknown_encoding_is_one_line(run, tmp_path, capsys):
    source = _latin1_csv(tmp_path / "latin1.csv")
    assert _predict(run, source, tmp_path / "out.csv", "--encoding", "no-such-codec") == 2
    assert "not a text encoding" in error_line(capsys)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_header_only_input_gives_a_header_only_output(run, tmp_path, suffix):
    source = tmp_path / "empty.csv"
    source.write_text("id,sentence\n")
    out = tmp_path / f"out{suffix}"
    assert _predict(run, source, out) == 0
    if suffix == ".csv":
        header = out.read_text().splitlines()
        assert header == ["id,label,label_index," + ",".join(f"prob_{n}" for n in (
            "very negative", "negative", "neutral", "positive", "very positive"))]
    else:
        assert out.read_text() == ""


def test_the_csv_header_matches_the_rows_it_heads(run, tmp_path):
    source = tmp_path / "one.csv"
    source.write_text("id,sentence\n7,A gorgeous film.\n")
    out = tmp_path / "out.csv"
    assert _predict(run, source, out) == 0
    (row,) = csv.DictReader(out.open())
    assert row["id"] == "0" and None not in row and all(v != "" for v in row.values())


def test_rows_that_are_all_unusable_fail_and_write_nothing(run, tmp_path, capsys):
    source = tmp_path / "blank.csv"
    source.write_text('id,sentence\n1,""\n2,"  "\n')
    out = tmp_path / "out.csv"
    out.write_text("an older output\n")
    assert _predict(run, source, out) == 2
    assert "empty field: 2" in error_line(capsys)
    assert out.read_text() == "an older output\n"


def _task_config(tmp_path, data: str, written_as: str = "utf-8", **definition) -> str:
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "train.csv").write_bytes(data.encode(written_as))
    (tmp_path / "d" / "dev.csv").write_bytes(data.encode(written_as))
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(TINY_YAML), "data": {"tasks": ["mine"]},
        "tasks": {"mine": {"files": {"train": str(tmp_path / "d" / "train.csv"), "dev": str(tmp_path / "d" / "dev.csv")},
                           "text": "sentence", "label": {"column": "label", "kind": "binary"}, **definition}}}))
    return str(config)


def test_data_check_fails_a_task_without_valid_rows(tmp_path, capsys, synthetic_data_dir):
    config = _task_config(tmp_path, "id,sentence,label\n1,,0\n2,  ,1\n")
    assert main(["data", "check", "--config", config, "--data-dir", str(synthetic_data_dir)]) != 0
    out = capsys.readouterr().out
    assert "no valid rows" in out and "PROBLEMS FOUND" in out


def test_a_task_encoding_key_reads_its_files(tmp_path, capsys, synthetic_data_dir):
    data = "id,sentence,label\n1,très bien,1\n2,ennuyé,0\n"
    config = _task_config(tmp_path, data, "latin-1", encoding="latin-1")
    assert main(["data", "check", "--config", config, "--data-dir", str(synthetic_data_dir)]) == 0
    assert "undecodable" not in capsys.readouterr().out
    bad = _task_config(tmp_path, data, "latin-1", encoding="klingon")
    assert main(["data", "check", "--config", bad, "--data-dir", str(synthetic_data_dir)]) == 2
    assert "encoding" in error_line(capsys)
