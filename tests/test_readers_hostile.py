"""Hostile files (issue 16): a quote never merges rows, extra fields and undecodable bytes are
counted, a byte-order mark is dropped; nothing is lost without being counted."""
from __future__ import annotations

import pytest

from mtbert.core.errors import DataError
from mtbert.core.tasks import get_task
from mtbert.data.readers import read_task_file

HEADER = "\tid\tsentence\tsentiment\n"


def _rows(n: int) -> str:
    return "".join(f"{i}\tid{i}\tsentence number {i}\t{i % 5}\n" for i in range(n))


def test_a_stray_quote_costs_only_its_own_row(tmp_path):
    # an opening quote here and a closing one 45 rows later: a CSV parser would merge 45 rows
    lines = _rows(60).splitlines(keepends=True)
    lines[5] = '5\tid5\t"an unclosed quote\t0\n'
    lines[50] = '50\tid50\tand its end" later\t0\n'
    path = tmp_path / "q.csv"
    path.write_text(HEADER + "".join(lines))
    examples, report = read_task_file(get_task("sst"), path)
    assert report.rows == 60 and report.skipped == 1 and report.reasons == {"unparseable row": 1}
    assert len(examples) == 59 and examples[49].texts == ('and its end" later',)  # mid-field quote: text


def test_an_unclosed_quote_does_not_lose_the_rest_of_the_file(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text(HEADER + '0\tid0\t"never closed\t1\n' + _rows(10)[len("0\tid0\tsentence number 0\t0\n"):])
    examples, report = read_task_file(get_task("sst"), path)
    assert [e.id for e in examples] == [f"id{i}" for i in range(1, 10)] and report.skipped == 1


def test_quoted_fields_with_escaped_quotes_are_read_as_the_cs224n_files_write_them(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(HEADER + '0\tid0\t"He said ""wow"" twice"\t4\n')
    (ex,), _ = read_task_file(get_task("sst"), path)
    assert ex.texts == ('He said "wow" twice',)


def test_extra_fields_and_undecodable_bytes_are_counted(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes((HEADER + "0\tid0\tfine\t1\n" + "1\tid1\ttoo\tmany\t2\n").encode()
                     + b"2\tid2\tbad \xff\xfe bytes\t3\n" + b"3\tid3\talso fine\t0\n")
    examples, report = read_task_file(get_task("sst"), path)
    assert [e.id for e in examples] == ["id0", "id3"]
    assert report.rows == 4 and report.reasons == {"extra fields": 1, "undecodable bytes": 1}


def test_a_byte_order_mark_is_dropped_from_the_header(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffid\tsentence\tsentiment\n".encode() + "a\tfine\t2\n".encode())
    (ex,), report = read_task_file(get_task("sst"), path)
    assert ex.id == "a" and report.skipped == 0


def test_a_file_that_is_not_text_is_one_clear_error(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xd8\xff\xe0 not a header\n")
    with pytest.raises(DataError, match="not utf-8 text; give the file.s encoding"):
        read_task_file(get_task("sst"), path)
