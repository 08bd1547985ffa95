"""Tasks as data (issue 12): a task declared only in YAML trains beside the built-in ones, is
evaluated with its own metric, predicted from a file, served and used from Python; bad
definitions are one clear error each before any model loads."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import mtbert
from mtbert.apps.cli import main
from mtbert.apps.serve import create_app
from mtbert.core.config import ConfigError, load_config
from mtbert.core.errors import DataError
from mtbert.core.tasks import (
    TASKS,
    get_task,
    overall_scorer,
    task_from_definition,
    with_overall,
)
from mtbert.training import trainer as trainer_module
from mtbert.training.trainer import Trainer
from tests.conftest import TINY_YAML

TOPICS = {"sports": ["match", "goal", "team", "coach"], "politics": ["vote", "party", "law", "senate"],
          "tech": ["code", "chip", "robot", "software"]}


def _topic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(sorted(TOPICS))
        words = [rng.choice(TOPICS[topic]) for _ in range(3)] + [rng.choice(["the", "a", "new", "big"]) for _ in range(3)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "topic": topic})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "topic"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def topic_config(tmp_path) -> Path:
    """A user's config: the topic task declared in YAML, files given relative to the config."""
    (tmp_path / "data").mkdir()
    _write_csv(tmp_path / "data" / "topic-train.csv", _topic_rows(64, 0))
    _write_csv(tmp_path / "data" / "topic-dev.csv", _topic_rows(30, 1) + [{"text": "", "topic": "tech"},
                                                                           {"text": "ok", "topic": "weather"}])
    cfg = tmp_path / "topic.yaml"
    cfg.write_text(f"""
base: {TINY_YAML}
tasks:
  topic:
    files: {{train: data/topic-train.csv, dev: data/topic-dev.csv}}
    text: text
    label: {{column: topic, kind: classification, names: [sports, politics, tech]}}
    metrics: [macro_f1, accuracy]
data:
  tasks: [sst, qqp, topic]
  overall: mean
train:
  max_steps: 6
""")
    return cfg


def test_a_yaml_task_trains_with_built_ins_and_is_used_everywhere(tmp_path, topic_config, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(topic_config), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    dev = summary["best_dev"]
    # main metric under the task's name, the other metric beside it, overall = mean of main metrics
    assert {"sst", "qqp", "topic", "topic/accuracy", "overall"} <= set(dev)
    assert dev["overall"] == pytest.approx((dev["sst"] + dev["qqp"] + dev["topic"]) / 3)
    spec = get_task("topic")
    assert spec.main_metric == "macro_f1" and spec.id_column is None and spec.format == "csv"

    # a loaded run reads its task files only under the data directory the user names (docs/security.md)
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    assert "lies outside the data directory" in capsys.readouterr().err
    for built_in in data_dir.iterdir():
        (tmp_path / "data" / built_in.name).write_bytes(built_in.read_bytes())
    assert main(["evaluate", str(run), "--data-dir", str(tmp_path / "data"), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["topic"] == pytest.approx(dev["topic"]) or metrics["topic"] >= 0  # fp32 vs training's precision

    # predicted from a JSONL file (its own column name), written as JSONL
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"body": r["text"]}) + "\n" for r in _topic_rows(5, 2))
                      + '{"body": ""}\nnot json\n')
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run), "--task", "topic", "--input", str(inputs), "--out", str(out),
                 "--text-column", "body"]) == 0
    assert "5 predictions; skipped 2 rows" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"]  # no id column: row numbers
    for r in records:
        assert r["label"] in TOPICS and set(r["probabilities"]) == set(TOPICS)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    # called from Python
    model = mtbert.load(run)
    assert model.tasks["topic"] == {"kind": "classification", "input": "text", "text_columns": ["text"],
                                    "metrics": ["macro_f1", "accuracy"], "labels": ["sports", "politics", "tech"]}
    got = model.predict("topic", ["the team scored a goal"])
    assert got[0]["label"] == records[0]["label"] or got[0]["label"] in TOPICS
    assert model.predict("qqp", [("How is chess played?", "How do you play chess?")])[0]["label"] in \
        ("not paraphrase", "paraphrase")
    vecs = model.embed(["a", "the team scored", "a"])
    assert vecs.shape[0] == 3 and np.allclose(vecs[0], vecs[2], atol=1e-5)

    # served through /v1/tasks/{task}
    client = TestClient(create_app(run), base_url="http://localhost")
    info = client.get("/v1/info").json()
    assert info["task_info"]["topic"]["labels"] == ["sports", "politics", "tech"]
    assert info["task_info"]["qqp"]["input"] == "pair" and info["task_info"]["topic"]["path"] == "/v1/tasks/topic"
    answer = client.post("/v1/tasks/topic", json={"texts": ["the team scored a goal", "a new chip"]})
    assert answer.status_code == 200 and len(answer.json()["results"]) == 2
    assert answer.json()["results"][0]["label"] in TOPICS
    pair = client.post("/v1/tasks/qqp", json={"pairs": [["How is chess played?", "How do you play chess?"]]})
    assert pair.status_code == 200 and 0 <= pair.json()["results"][0]["probability"] <= 1
    assert client.post("/v1/tasks/topic", json={"pairs": [["a", "b"]]}).status_code == 422
    assert client.post("/v1/tasks/nope", json={"texts": ["a"]}).status_code == 404
    assert client.post("/v1/sentiment", json={"texts": ["lovely"]}).status_code == 200  # old routes stay


def test_data_check_counts_a_declared_tasks_bad_rows(topic_config, capsys):
    assert main(["data", "check", "--config", str(topic_config)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("topic-dev.csv"))
    assert "32" in line and "2" in line and "empty field" in line and "invalid label" in line


def test_build_model_is_never_reached_by_a_bad_definition(tmp_path, topic_config, monkeypatch):
    """Bad definitions and files fail before any model loads."""
    monkeypatch.setattr(trainer_module, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    base = topic_config.read_text()
    cases = {
        "text: text": ("text: body", DataError, "lacks column(s) ['body']"),
        "kind: classification": ("kind: ordinal", ConfigError, "label.kind must be one of"),
        "metrics: [macro_f1, accuracy]": ("metrics: [bleu]", ConfigError, "unknown metric 'bleu'"),
        "names: [sports, politics, tech]": ("names: [sports, politics, tech, sports]", ConfigError, "distinct names"),
        "dev: data/topic-dev.csv": ("dev: data/missing.csv", DataError, "dev file not found"),
        "  topic:": ("  sst:", ConfigError, "task 'sst' is built in"),
        "metrics: [macro_f1, accuracy]\n": ("metrics: [pearson]\n", ConfigError, "does not apply to a classification"),
    }
    for old, (new, error, message) in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(base.replace(old, new, 1))
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            Trainer(load_config(path), tmp_path / f"r-{len(message)}")
    (tmp_path / "twice.yaml").write_text(base.replace("data:\n", "  topic:\n    files: {train: x.csv}\ndata:\n", 1))
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(tmp_path / "twice.yaml")
    bad_labels = tmp_path / "labels.yaml"
    _write_csv(tmp_path / "data" / "topic-dev.csv", [{"text": "x", "topic": "weather"}] * 4)
    bad_labels.write_text(base)
    with pytest.raises(DataError, match="no row of .* has a valid label"):
        Trainer(load_config(bad_labels), tmp_path / "r-labels")


@pytest.mark.parametrize("label, kind_error", [
    ({"column": "y", "kind": "regression", "range": [5, 0]}, "low < high"),
    ({"column": "y", "kind": "binary", "names": ["a", "b", "c"]}, "two names"),
    ({"column": "y", "kind": "binned", "range": [0, 1]}, "bins"),
    ({"column": "y", "kind": "classification"}, "needs `names`"),
])
def test_label_definitions_are_checked(label, kind_error):
    with pytest.raises(ConfigError, match=kind_error):
        task_from_definition("t", {"files": {"train": "t.csv"}, "text": "x", "label": label})


def test_labels_by_name_or_index_and_ranges():
    cls = task_from_definition("t", {"files": {"train": "t.csv"}, "text": "x",
                                     "label": {"column": "y", "kind": "classification", "names": ["neg", "pos"]}})
    assert cls.parse_label("pos") == 1 and cls.parse_label("0") == 0 and cls.parse_label(1) == 1
    for bad in ("maybe", "2", "0.5", "-1"):
        with pytest.raises(ValueError):
            cls.parse_label(bad)
    reg = task_from_definition("r", {"files": {"train": "t.jsonl"}, "text": ["a", "b"],
                                     "label": {"column": "y", "kind": "regression", "range": [1, 2]}})
    assert reg.format == "jsonl" and reg.is_pair and reg.metrics == ("pearson",) and reg.parse_label("1.5") == 1.5
    with pytest.raises(ValueError):
        reg.parse_label("2.5")


def test_overall_scores_are_pluggable():
    m = {"sst": 0.5, "qqp": 0.8, "sts": 0.6}
    assert with_overall(dict(m))["overall"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)  # leaderboard: (r + 1) / 2
    assert "overall" not in with_overall({"sst": 0.5, "qqp": 0.8})  # auto: only with the three CS224N tasks
    weighted = overall_scorer("mean", {"sst": 3.0})
    assert weighted(dict(m)) == pytest.approx((3 * 0.5 + 0.8 + 0.6) / 5)
    with pytest.raises(ConfigError):
        overall_scorer("mean", {"sst": -1.0})


def test_builtin_tasks_are_definitions_without_special_cases():
    for name in ("sst", "qqp", "sts", "sts_bins", "cfimdb"):
        spec = TASKS.get(name)
        assert spec.builtin and spec.files and spec.cs224n_output
    assert get_task("sts_bins").variant_of == "sts" and get_task("sst").leaderboard == "cs224n"


def test_prediction_is_streamed_in_chunks(tmp_path, topic_config):
    """`predict --input` holds one chunk of rows at a time, whatever the file's size."""
    from mtbert.inference.outputs import predict_file
    load_config(topic_config)  # registers the topic task

    class Recorder:
        tasks = ["topic"]
        sizes: list[int] = []

        def task_spec(self, task):
            return get_task(task)

        def predict(self, task, examples):
            self.sizes.append(len(examples))
            n = len(examples)
            return {"pred": np.zeros(n, dtype=int), "prob": np.full((n, 3), 1 / 3)}

    src = tmp_path / "big.csv"
    _write_csv(src, _topic_rows(2500, 3))
    rec = Recorder()
    report = predict_file(rec, "topic", src, tmp_path / "big-out.csv", chunk=1000, progress=False)
    assert rec.sizes == [1000, 1000, 500] and report.rows == 2500
    lines = (tmp_path / "big-out.csv").read_text().splitlines()
    assert lines[0] == "id,label,label_index,prob_sports,prob_politics,prob_tech" and len(lines) == 2501


def test_hugging_face_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra")
    rows = _topic_rows(12, 4)
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:6])})
    ds.save_to_disk(str(tmp_path / "topics"))
    cfg_path = tmp_path / "hf.yaml"
    cfg_path.write_text("""
tasks:
  hf_topic:
    dataset: {path: topics, splits: {train: train, dev: validation}}
    text: text
    label: {column: topic, kind: classification, names: [sports, politics, tech]}
""")
    load_config(cfg_path)
    from mtbert.data.readers import read_task_split
    examples, report = read_task_split(get_task("hf_topic"), "dev", tmp_path)
    assert len(examples) == 6 and report.rows == 6
    assert examples[0].texts == (rows[0]["text"],) and examples[0].label == ["sports", "politics", "tech"].index(rows[0]["topic"])


def test_row_number_ids_count_skipped_rows_and_csv_quotes_never_merge_rows(tmp_path):
    spec = task_from_definition("rows", {"files": {"train": "x.csv"}, "text": "x",
                                         "label": {"column": "y", "kind": "binary"}})
    path = tmp_path / "x.csv"
    path.write_text('x,y\nhello,1\nbad,extra,1\n"unclosed,0\nfine,0\nlast,1\n')
    from mtbert.data.readers import read_task_file
    examples, report = read_task_file(spec, path)
    assert [(e.id, e.texts[0]) for e in examples] == [("0", "hello"), ("3", "fine"), ("4", "last")]
    assert report.rows == 5 and report.reasons == {"extra fields": 1, "unparseable row": 1}


def test_overflowing_labels_are_invalid_not_crashes():
    cls = get_task("sst")
    for raw in ("inf", "1e400", "nan"):
        with pytest.raises(ValueError):
            cls.parse_label(raw)
    free = task_from_definition("free", {"files": {"train": "t.csv"}, "text": "x",
                                         "label": {"column": "y", "kind": "regression"}})
    with pytest.raises(ValueError):
        free.parse_label("inf")


def test_each_loaded_model_keeps_its_own_task_definition(tmp_path, topic_config):
    """Two runs declaring `topic` with different labels, loaded in one process."""
    run_a = tmp_path / "a"
    assert main(["train", "--config", str(topic_config), "--out", str(run_a), "--set", "train.max_steps=2"]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(topic_config.read_text().replace("names: [sports, politics, tech]", "names: [sports, politics, tech, misc]"))
    (tmp_path / "data" / "topic-train.csv").write_text((tmp_path / "data" / "topic-train.csv").read_text() + "x y,misc\n")
    run_b = tmp_path / "b"
    assert main(["train", "--config", str(other), "--out", str(run_b), "--set", "train.max_steps=2"]) == 0
    a, b = mtbert.load(run_a), mtbert.load(run_b)
    assert a.tasks["topic"]["labels"] == ["sports", "politics", "tech"]
    assert b.tasks["topic"]["labels"] == ["sports", "politics", "tech", "misc"]
    assert set(a.predict("topic", ["a goal"])[0]["probabilities"]) == {"sports", "politics", "tech"}


def test_bad_overall_weights_and_input_columns_fail_before_training(tmp_path, topic_config, capsys):
    with pytest.raises(ConfigError, match="not in data.tasks"):
        load_config(topic_config, ["data.overall_weights={tpoic: 2}"])
    with pytest.raises(ConfigError, match="go with data.overall: mean"):
        load_config(topic_config, ["data.overall=auto", "data.overall_weights={topic: 2}"])
    src = tmp_path / "in.csv"
    src.write_text("body\nhello\n")
    assert main(["predict", str(tmp_path / "no-run"), "--task", "topic", "--input", str(src),
                 "--out", str(tmp_path / "o.csv"), "--text-column", "headline"]) == 2
    assert "has no column(s) ['headline']" in capsys.readouterr().err  # checked before the (missing) model loads
    assert not (tmp_path / "o.csv").exists()
