import random

import pytest
import torch

from mtbert.core.tasks import get_task
from mtbert.data.readers import (
    DataError,
    check_data_dir,
    collate,
    encode_dataset,
    load_split,
    make_batches,
    pad,
    read_task_file,
)
from mtbert.data.tokenizer import BertTokenizer
from mtbert.modeling.encoder import default_backbone_dir

QQP_ROWS = (
    "\tid\tsentence1\tsentence2\tis_duplicate\n"
    "1\ta1\tHow do I cook rice?\tWhat is the best way to cook rice?\t1.0\n"
    "2\ta2\tIs this fine?\t\t0.0\n"                      # empty sentence2
    "3\ta3\tOnly one field\n"                           # missing fields
    "4\ta4\tWhy?\tHow?\t7.0\n"                          # label out of range
    "5\ta5\tWhy?\tHow?\tyes\n"                          # label not a number
    "6\ta6\t\"\"\"Quoted \"\"\"\"inner\"\"\"\" text\"\"\"\tPlain\t0.0\n"
)


@pytest.fixture
def tok():
    return BertTokenizer.from_dir(default_backbone_dir(), max_length=16)


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    p = tmp_path / "quora-train.csv"
    p.write_text(QQP_ROWS)
    examples, report = read_task_file(get_task("qqp"), p)
    assert [e.id for e in examples] == ["a1", "a6"]
    assert report.rows == 6 and report.skipped == 4
    assert report.reasons == {"empty field": 1, "missing fields": 1, "invalid label": 2}
    assert examples[0].label == 1 and examples[1].texts[0] == '"Quoted ""inner"" text"'
    assert "4 malformed skipped" in str(report)


def test_test_student_layout_without_labels(tmp_path):
    # The SST test-student file carries an extra leading index column; columns are found by name.
    p = tmp_path / "ids-sst-test-student.csv"
    p.write_text("0\t\tid\tsentence\n1\t0.0\tx1\t A fine film .\n2\t1.0\tx2\t Dull .\n")
    examples, report = read_task_file(get_task("sst"), p, labeled=False)
    assert [(e.id, e.texts[0], e.label) for e in examples] == [("x1", "A fine film .", None), ("x2", "Dull .", None)]


def test_missing_columns_and_files_are_clear_errors(tmp_path):
    p = tmp_path / "sts-train.csv"
    p.write_text("\tid\tsentence1\tscore\n1\ta\tb\t3\n")
    with pytest.raises(DataError, match="lacks column"):
        read_task_file(get_task("sts"), p)
    with pytest.raises(DataError, match="not found"):
        read_task_file(get_task("sts"), tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_task_file(get_task("sts"), tmp_path / "empty.csv")


@pytest.mark.real_data
def test_shared_data_counts(data_dir):
    results = {r["file"]: r for r in check_data_dir(data_dir, [get_task("qqp"), get_task("sst")])}
    assert results["quora-train.csv"]["rows"] == 14000
    assert results["quora-dev.csv"]["malformed"] == 1 and results["quora-dev.csv"]["examples"] == 2999
    assert results["quora-test-student.csv"]["malformed"] == 1
    assert results["ids-sst-train.csv"]["examples"] == 8544
    assert all(r["checksum"] == "ok" for r in results.values())


def test_checksum_mismatch_detected(tmp_path, data_dir):
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  ids-sst-dev.csv\n")
    (tmp_path / "ids-sst-dev.csv").write_text("\tid\tsentence\tsentiment\n0\ta\tgood .\t3\n")
    results = {r["file"]: r for r in check_data_dir(tmp_path, [get_task("sst")])}
    assert results["ids-sst-dev.csv"]["checksum"] == "MISMATCH"
    assert results["ids-sst-train.csv"]["exists"] is False


def test_pair_encoding_layout_and_truncation(tok):
    (ids, types), = tok.encode_pairs(["a cat"], ["a dog sat"])
    assert ids[0] == tok.cls_id and ids.count(tok.sep_id) == 2 and ids[-1] == tok.sep_id
    first_sep = ids.index(tok.sep_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    long = " ".join(["word"] * 100)
    for a, b in [(long, "short"), ("short", long), (long, long)]:
        (ids, types), = tok.encode_pairs([a], [b])
        assert len(ids) == 16 and ids.count(tok.sep_id) == 2
    (ids, _), = tok.encode([long])
    assert len(ids) == 16 and ids[-1] == tok.sep_id
    (ids, _), = tok.encode([""])
    assert ids == [tok.cls_id, tok.sep_id]


def test_bucketed_batches_cover_everything_once_with_less_padding(tok, data_dir):
    task = get_task("qqp")
    examples, _ = load_split(task, data_dir, "dev", limit=640)
    ds = encode_dataset(task, examples, BertTokenizer.from_dir(default_backbone_dir(), 128), "cross")
    rng = random.Random(0)
    plain = make_batches(ds, 32, shuffle=True, bucket=False, rng=rng)
    bucketed = make_batches(ds, 32, shuffle=True, bucket=True, rng=rng)
    assert sorted(i for b in bucketed for i in b) == list(range(len(ds)))

    def padded_tokens(batches):
        return sum(max(ds.length(i) for i in b) * len(b) for b in batches)
    assert padded_tokens(bucketed) < padded_tokens(plain)


def test_collate_bi_encoding_and_dynamic_padding(tok, data_dir):
    task = get_task("sts")
    examples, _ = load_split(task, data_dir, "dev", limit=8)
    ds = encode_dataset(task, examples, tok, "bi")
    batch = collate(ds, [0, 1, 2])
    assert len(batch["inputs"]) == 2 and batch["labels"].dtype == torch.float
    for slot, x in enumerate(batch["inputs"]):
        assert x["input_ids"].shape[1] == max(len(ds.inputs[i][slot][0]) for i in range(3))
        assert (x["attention_mask"].sum(1) == torch.tensor([len(ds.inputs[i][slot][0]) for i in range(3)])).all()


def test_pad_masks_padding():
    out = pad([([1, 2, 3], [0, 0, 0]), ([4], [0])])
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
