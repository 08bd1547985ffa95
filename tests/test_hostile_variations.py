"""Variations on the hostile runs and inputs (docs/security.md), found by probing the trust
boundary beyond the attacks the issue listed: outputs over the run a command reads, look-alike
run directories, a tokenizer whose rules panic, crafted adapter options and encoder sizes, run
files that are devices, a run config naming a tasks file, a dataset outside the data directory,
trackers that follow links. Each fails safely: one line, exit 2, nothing lost."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mtbert.apps.cli import main
from mtbert.core.errors import CheckpointError, ConfigError, DataError
from mtbert.core.tasks import task_from_definition
from mtbert.data.readers import ReadReport, task_rows
from mtbert.modeling.encoder import BertConfig
from mtbert.training.tracking import own_path
from tests.conftest import error_line, train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_data_dir):
    return train_tiny_run(tmp_path_factory.mktemp("variations") / "run", synthetic_data_dir, "train.max_steps=1",
                          "train.int8_check=false")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, synthetic_data_dir):
    return train_tiny_run(tmp_path_factory.mktemp("variations-lora") / "run", synthetic_data_dir,
                          "train.max_steps=1", "train.int8_check=false", "techniques={lora: {rank: 2}}")


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _edit_model_json(run: Path, edit) -> None:
    path = run / "best" / "model.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))


# ---------------------------------------------------------------- outputs over what a command reads

@pytest.mark.parametrize("argv", [
    ["predict", "{run}", "--task", "sst", "--input", "{src}", "--out", "{run}/best/model.safetensors"],
    ["evaluate", "{run}", "--json", "{run}/best/model.json"],
    ["evaluate", "{run}", "--json", "{run}/summary.json"],
    ["predict", "{run}", "--out", "{run}/best"],
    ["predict", "{run}", "--out", "{run}/epochs/0"],  # (where train.keep_epochs keeps checkpoints)
])
def test_an_output_over_the_run_it_reads_is_refused(run, tmp_path, capsys, argv):
    copy = _copy(run, tmp_path / "copy")
    src = tmp_path / "in.csv"
    src.write_text("id,sentence\n1,A fine film.\n")
    before = _files(copy)
    assert main([a.format(run=copy, src=src) for a in argv] + ["--device", "cpu"]) == 2
    assert "which this command reads" in error_line(capsys)
    assert _files(copy) == before


def test_predict_into_an_existing_folder_is_refused_before_the_model_loads(run, tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("id,sentence\n1,A fine film.\n")
    (tmp_path / "outdir").mkdir()
    assert main(["predict", str(run), "--task", "sst", "--input", str(src), "--out", str(tmp_path / "outdir")]) == 2
    assert "is a directory" in error_line(capsys)


def test_an_ensemble_never_replaces_a_folder_that_is_not_an_ensemble(run, tmp_path, capsys, synthetic_data_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "meta.json").write_text('{"mine": true}')
    assert main(["ensemble", str(run), "--out", str(mine), "--data-dir", str(synthetic_data_dir)]) == 2
    assert "not an ensemble's" in error_line(capsys)
    assert (mine / "config.yaml").read_text() == "my: settings\n" and json.loads((mine / "meta.json").read_text())


def test_overwrite_never_deletes_a_folder_that_only_looks_like_a_run(tmp_path, capsys, synthetic_data_dir):
    work = tmp_path / "work"
    (work / "pretrain").mkdir(parents=True)
    (work / "pretrain" / "corpus.txt").write_text("years of collected sentences")
    from tests.conftest import TINY_YAML
    assert main(["train", "--config", str(TINY_YAML), "--out", str(work), "--overwrite",
                 "--data-dir", str(synthetic_data_dir)]) == 2
    assert "but no mtbert run" in error_line(capsys)
    assert (work / "pretrain" / "corpus.txt").read_text() == "years of collected sentences"


# ---------------------------------------------------------------- crafted checkpoints

PANICS = "a" * 40 + "!"  # what the crafted rule below cannot match in time


def _with_panicking_tokenizer(run: Path, to: Path) -> Path:
    """A copy of `run` whose tokenizer.json adds a Replace normalizer with a catastrophic regex:
    the Rust library panics (retry limit) on PANICS."""
    copy = _copy(run, to)
    path = copy / "best" / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"Regex": "(a|aa)+$"}, "content": "x"}] + (
        [tok["normalizer"]] if tok.get("normalizer") else [])}
    path.write_text(json.dumps(tok))
    return copy


def test_a_tokenizer_whose_rules_panic_is_one_line(run, tmp_path, capsys):
    """A Replace normalizer with a catastrophic regex makes the Rust tokenizer panic (a
    BaseException in Python) on a matching input; that input fails in one line, exit 2."""
    copy = _with_panicking_tokenizer(run, tmp_path / "copy")
    src = tmp_path / "in.csv"
    src.write_text(f"id,sentence\n1,{PANICS}\n")
    code = main(["predict", str(copy), "--task", "sst", "--input", str(src), "--out", str(tmp_path / "o.csv"),
                 "--device", "cpu"])
    if code == 0:
        pytest.skip("this tokenizers build does not panic on the catastrophic regex")
    assert code == 2 and "tokenizer failed on this input" in error_line(capsys)


def test_the_server_answers_a_panicking_input_alone_and_keeps_serving(run, tmp_path):
    from fastapi.testclient import TestClient

    from mtbert.apps.serve import create_app
    copy = _with_panicking_tokenizer(run, tmp_path / "copy")
    with TestClient(create_app(copy, device="cpu"), base_url="http://localhost") as client:
        bad = client.post("/v1/sentiment", json={"texts": [PANICS]})
        assert 400 <= bad.status_code < 600 and "Traceback" not in bad.text
        ok = client.post("/v1/sentiment", json={"texts": ["A fine film."]})
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("lora, expected", [
    ({"alpha": float("nan")}, "alpha"),
    ({"alpha": 1e308}, "alpha"),
    ({"rank": 0}, "rank"),
    ({"rank": 2.0}, "rank must be int"),
    ({"dropout": 5}, "dropout"),
    ({"routed": "yes"}, "routed must be bool"),
    ({"extra": 1}, "exactly the keys"),
])
def test_crafted_adapter_options_are_one_line(lora_run, tmp_path, capsys, lora, expected):
    copy = _copy(lora_run, tmp_path / "copy")
    _edit_model_json(copy, lambda spec: spec["extensions"]["lora"].update(lora))
    assert main(["predict", str(copy), "--out", str(tmp_path / "preds"), "--device", "cpu"]) == 2
    err = error_line(capsys)
    assert "extension lora" in err and expected in err
    assert not (tmp_path / "preds").exists()


def test_one_token_type_cannot_hold_pairs(run, tmp_path, capsys):
    copy = _copy(run, tmp_path / "copy")
    _edit_model_json(copy, lambda spec: spec["encoder"].update(type_vocab_size=1))
    weights = load_file(str(copy / "best" / "model.safetensors"))
    key = next(k for k in weights if "token_type" in k)
    weights[key] = weights[key][:1].clone()
    save_file(weights, str(copy / "best" / "model.safetensors"))
    assert main(["predict", str(copy), "--out", str(tmp_path / "preds"), "--device", "cpu"]) == 2
    assert "type_vocab_size 1 cannot embed" in error_line(capsys)


def test_too_few_relative_position_buckets_are_refused():
    with pytest.raises(CheckpointError, match="relative_attention_num_buckets 2 is outside"):
        BertConfig.from_dict({"model_type": "mpnet", "relative_attention_num_buckets": 2})


@pytest.mark.parametrize("edit, expected", [
    (lambda spec: spec.update(pair_encoding={"qqp": "single"}), "pair encoding for qqp"),
    (lambda spec: spec.update(tasks=[]), "has no task heads"),
])
def test_a_model_json_that_describes_nothing_to_predict_is_one_line(run, tmp_path, capsys, edit, expected):
    copy = _copy(run, tmp_path / "copy")
    _edit_model_json(copy, edit)
    assert main(["predict", str(copy), "--out", str(tmp_path / "preds"), "--device", "cpu"]) == 2
    assert expected in error_line(capsys)
    assert not list((tmp_path / "preds").glob("*")) if (tmp_path / "preds").exists() else True


@pytest.mark.parametrize("tasks", [{}, {"sst": []}])
def test_an_ensemble_without_members_for_its_tasks_is_one_line(run, tmp_path, capsys, synthetic_data_dir, tasks):
    ens = tmp_path / "ens"
    assert main(["ensemble", str(run), "--out", str(ens), "--data-dir", str(synthetic_data_dir)]) == 0
    spec = json.loads((ens / "ensemble.json").read_text())
    spec["tasks"] = tasks
    (ens / "ensemble.json").write_text(json.dumps(spec))
    capsys.readouterr()
    assert main(["predict", str(ens), "--out", str(tmp_path / "p"), "--data-dir", str(synthetic_data_dir)]) == 2
    assert "at least one member" in error_line(capsys)


@pytest.mark.parametrize("name", ["model.json", "config.yaml", "meta.json", "tokenizer.json"])
def test_a_run_file_that_is_a_device_is_refused_unread(run, tmp_path, capsys, name):
    """A link from a run file to /dev/zero would be read until memory runs out."""
    copy = _copy(run, tmp_path / "copy")
    (copy / "best" / name).unlink()
    (copy / "best" / name).symlink_to("/dev/zero")
    assert main(["evaluate", str(copy), "--device", "cpu"]) == 2
    assert "not a regular file" in error_line(capsys)


def test_a_run_config_naming_a_tasks_file_reads_nothing(run, tmp_path, capsys):
    copy = _copy(run, tmp_path / "copy")
    secret = tmp_path / "secret.yaml"
    secret.write_text("SECRET_KEY: 1\n")
    raw = yaml.safe_load((copy / "best" / "config.yaml").read_text())
    raw["tasks"] = str(secret)
    (copy / "best" / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main(["evaluate", str(copy), "--device", "cpu"]) == 2
    err = error_line(capsys)
    assert "holds its task definitions inline" in err and "SECRET_KEY" not in err


# ---------------------------------------------------------------- reading and writing outside

@pytest.mark.parametrize("dataset", [{"path": "/tmp/elsewhere"}, {"name": "{outside}"}])
def test_a_loaded_runs_dataset_reads_only_under_the_data_dir(tmp_path, monkeypatch, dataset):
    outside = tmp_path / "outside"
    outside.mkdir()
    dataset = {k: v.format(outside=outside) for k, v in dataset.items()}
    from mtbert.core import tasks as tasks_module
    monkeypatch.setattr(tasks_module, "run_data_confined", lambda: True)
    spec = task_from_definition("mine", {"dataset": dataset, "text": "sentence",
                                         "label": {"column": "label", "kind": "binary"}})
    assert spec.confined
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(DataError, match="lies outside the data directory"):
        list(task_rows(spec, "dev", data_dir, ReadReport("mine")))


def test_a_tracker_never_follows_a_link_out_of_the_run(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    victim.mkdir()
    (run / "tensorboard").symlink_to(victim)
    (run / "mlflow_run_id").symlink_to(victim / "f")  # dangling: writing it would create the target
    for name in ("tensorboard", "mlflow_run_id"):
        with pytest.raises(ConfigError, match="is a link"):
            own_path(run, name)
    assert own_path(run, "mlflow.db") == run / "mlflow.db" and not list(victim.iterdir())


# ---------------------------------------------------------------- inputs

def test_a_lone_surrogate_in_jsonl_is_a_counted_skip(run, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"sentence": "\\ud800x"}\n{"sentence": "A fine film."}\n')
    assert main(["predict", str(run), "--task", "sst", "--input", str(src), "--out", str(tmp_path / "o.jsonl"),
                 "--device", "cpu"]) == 0
    assert "1 predictions; skipped 1 rows (invalid text: 1)" in capsys.readouterr().out


def test_data_check_survives_a_malformed_checksum_line_and_flags_a_missing_dataset(tmp_path, capsys,
                                                                                  synthetic_data_dir):
    data = _copy(synthetic_data_dir, tmp_path / "data")
    (data / "SHA256SUMS").write_text((data / "SHA256SUMS").read_text() + "deadbeef\n"
                                     if (data / "SHA256SUMS").exists() else "deadbeef\n")
    config = tmp_path / "ds.yaml"
    config.write_text(yaml.safe_dump({"tasks": {"ds": {"dataset": {"path": str(tmp_path / "missing")},
                                                       "text": "sentence",
                                                       "label": {"column": "label", "kind": "binary"}}}}))
    code = main(["data", "check", "--config", str(config), "--data-dir", str(data)])
    out = capsys.readouterr().out
    assert code == 1 and "dataset" in out and "MISSING" in out and "PROBLEMS FOUND" in out


def test_torch_weights_are_untouched_by_every_refusal_above(run):
    """(The module-scoped runs the tests copied from are intact.)"""
    assert torch.isfinite(next(iter(load_file(str(run / "best" / "model.safetensors")).values()))).all()


def _custom_run(root, data_dir, name, names):
    config = root / f"{name}.yaml"
    from tests.conftest import TINY_YAML
    config.write_text(yaml.safe_dump({
        "base": str(TINY_YAML), "data": {"tasks": ["mine", "sts"]},
        "tasks": {"mine": {"files": {"train": "{data_dir}/ids-sst-train.csv", "dev": "{data_dir}/ids-sst-dev.csv"},
                           "format": "tsv", "text": "sentence",
                           "label": {"column": "sentiment", "kind": "classification", "names": names}}}}))
    return train_tiny_run(root / name, data_dir, "train.max_steps=1", "train.int8_check=false", config=config)


def test_an_ensemble_refuses_members_that_define_a_shared_task_differently(tmp_path, capsys, synthetic_data_dir):
    """Two runs whose task `mine` has other label names (or another kind) would be averaged as one
    task, scored on whichever definition was read last."""
    a = _custom_run(tmp_path, synthetic_data_dir, "a", list("abcde"))
    b = _custom_run(tmp_path, synthetic_data_dir, "b", list("edcba"))
    same = _custom_run(tmp_path, synthetic_data_dir, "same", list("abcde"))
    capsys.readouterr()
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "ens"), "--data-dir",
                 str(synthetic_data_dir)]) == 2
    err = error_line(capsys)
    assert "define task 'mine' differently" in err and not (tmp_path / "ens").exists()
    assert main(["ensemble", str(a), str(same), "--out", str(tmp_path / "ok"), "--data-dir",
                 str(synthetic_data_dir)]) == 0


def test_two_loaded_runs_keep_their_own_definition_of_one_task_name(tmp_path, synthetic_data_dir):
    """Loading a run registers nothing process-wide: each model keeps the TaskSpecs it was trained
    with, so a second run that defines `mine` otherwise changes nothing about the first."""
    from mtbert.core.tasks import TASKS
    from mtbert.inference.loading import load_predictor
    from mtbert.inference.predictor import evaluate_examples, load_examples, task_specs
    a = _custom_run(tmp_path, synthetic_data_dir, "a", list("abcde"))
    b = _custom_run(tmp_path, synthetic_data_dir, "b", list("edcba"))
    TASKS._entries.pop("mine", None)  # (training registered it: a fresh process would not have it)
    first = load_predictor(a, "cpu", "fp32")
    before, _ = evaluate_examples(first, load_examples(task_specs(first).values(), synthetic_data_dir, "dev"))
    second = load_predictor(b, "cpu", "fp32")
    assert "mine" not in TASKS
    assert first.task_spec("mine").label_names == tuple("abcde") and second.task_spec("mine").label_names == tuple("edcba")
    after, _ = evaluate_examples(first, load_examples(task_specs(first).values(), synthetic_data_dir, "dev"))
    assert after == before


def test_an_hf_export_carries_its_user_tasks_definitions(tmp_path, synthetic_data_dir):
    """An hf export of a run with a user task loads in a process that never saw that task's config:
    the export stores the task's definition (and reading it imports nothing)."""
    from mtbert.core.tasks import TASKS
    from mtbert.modeling.hf_format import load_hf_export
    run = _custom_run(tmp_path, synthetic_data_dir, "a", list("abcde"))
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    TASKS._entries.pop("mine", None)
    model, _ = load_hf_export(tmp_path / "hf")
    assert model.tasks["mine"].label_names == tuple("abcde") and "mine" not in TASKS
