"""CSV read as RFC 4180 (data/readers.py): what Python's csv writer (and pandas) produce reads back
as written, newlines inside quoted fields included; a stray quote costs a bounded stretch of the
file, counted, never the rest of it. Tab-separated files keep one record per line."""
from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtbert.data import readers
from mtbert.data.readers import ReadReport, read_rows

# printable text with the characters that matter to CSV: separators, quotes and line breaks
FIELD = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00")
                | st.sampled_from([",", '"', "\n", "\r", " "]), max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(FIELD, FIELD), max_size=12))
def test_any_rows_the_csv_writer_produces_read_back_identically(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b"])
        writer.writerows(rows)
    report = ReadReport(str(path))
    got = [(r["a"], r["b"]) for r in read_rows(path, "csv", report=report)]
    # a row of two empty fields is written as a blank line's worth (',') and kept; only a truly
    # blank record is dropped, as before
    expected = [r for r in rows if any(f.strip() for f in r)]
    assert got == expected and report.skipped == 0


def test_a_review_with_a_line_break_is_one_record(tmp_path):
    path = tmp_path / "reviews.csv"
    buf = io.StringIO()
    csv.writer(buf).writerows([["id", "sentence"], ["1", "Great.\nReally great."], ["2", 'He said ""hi"".']])
    path.write_text(buf.getvalue())
    report = ReadReport(str(path))
    assert [r["sentence"] for r in read_rows(path, "csv", report=report)] == ["Great.\nReally great.",
                                                                             'He said ""hi"".']
    assert report.rows == 2 and report.skipped == 0


def test_a_stray_quote_costs_a_bounded_stretch(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_RECORD_CHARS", 100)
    lines = ["id,sentence\n", '1,"never closed\n'] + [f"{i},fine {i}\n" for i in range(2, 40)]
    path = tmp_path / "stray.csv"
    path.write_text("".join(lines))
    report = ReadReport(str(path))
    got = [r["id"] for r in read_rows(path, "csv", report=report)]
    # the open quote swallows lines until the bound, then reading resumes on the line after it
    assert got == [str(i) for i in range(2, 40)]
    assert report.skipped == 1 and report.reasons == {"unparseable row": 1}


def test_tsv_keeps_one_record_per_line(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text('id\tsentence\n1\t"open quote\n2\tfine\n')
    report = ReadReport(str(path))
    assert [r["id"] for r in read_rows(path, "tsv", report=report)] == ["2"]
    assert report.skipped == 1


@pytest.mark.parametrize("tail", ['3,"open at the end\n', '3,"open at the end'])
def test_an_unterminated_last_record_is_counted(tmp_path, tail):
    path = tmp_path / "end.csv"
    path.write_text("id,sentence\n1,a\n2,b\n" + tail)
    report = ReadReport(str(path))
    assert [r["id"] for r in read_rows(path, "csv", report=report)] == ["1", "2"]
    assert report.skipped == 1
