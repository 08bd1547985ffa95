"""A run directory is data, not code (docs/security.md): crafted runs that, before core.trust,
ran a command on --resume, imported a module on load, or answered with NaN weights. Each must now
fail safely: nothing runs, nothing is imported, one line and exit 2. And the user's own files:
predict --out equal to --input, and --overwrite with a mistyped --data-dir."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import mtbert
from mtbert.apps.cli import main
from mtbert.core.trust import UntrustedCodeError
from tests.conftest import TINY_YAML, error_line, train_tiny_run


@pytest.fixture
def stopped_run(tmp_path, data_dir):
    """A tiny run stopped by its time budget after one step: it keeps last/ for --resume."""
    run = train_tiny_run(tmp_path / "run", data_dir, "train.time_budget_min=0", "train.int8_check=false")
    assert (run / "last" / "train_state.pt").exists()
    return run


@pytest.fixture
def finished_run(tmp_path_factory, synthetic_data_dir):
    return train_tiny_run(tmp_path_factory.mktemp("hostile") / "run", synthetic_data_dir, "train.max_steps=2",
                          "train.int8_check=false")


def _edit_yaml(path: Path, edit) -> None:
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize("key, value", [
    ("schedule", "subprocess:run"),
    ("weighting", "subprocess:run"),
])
def test_resume_runs_no_command_a_run_names(stopped_run, tmp_path, capsys, key, value):
    marker = tmp_path / "pwned"
    for config in (stopped_run / "config.yaml", stopped_run / "last" / "config.yaml"):
        _edit_yaml(config, lambda raw: raw["train"].update({key: value, f"{key}_args": {
            "args": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]}}))
    assert main(["train", "--resume", str(stopped_run)]) == 2
    err = error_line(capsys)
    assert "a run directory is data, not code" in err and "--trust-run-code" in err
    assert not marker.exists()


def test_resume_runs_no_technique_a_run_names(stopped_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    for config in (stopped_run / "config.yaml", stopped_run / "last" / "config.yaml"):
        _edit_yaml(config, lambda raw: raw.update({"techniques": {"subprocess:run": {
            "args": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]}}}))
    assert main(["train", "--resume", str(stopped_run)]) == 2
    assert "--trust-run-code" in error_line(capsys) and not marker.exists()


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module on sys.path (as the current directory is under `python -m`) that leaves a marker
    when imported."""
    name = f"evil_{abs(hash(tmp_path)) % 10**8}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nx = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def _copy_run(run: Path, to: Path) -> Path:
    import shutil
    shutil.copytree(run, to)
    return to


def test_load_imports_no_plugin_a_run_names(finished_run, tmp_path, evil_module, capsys):
    name, marker = evil_module
    run = _copy_run(finished_run, tmp_path / "copy")
    _edit_yaml(run / "best" / "config.yaml", lambda raw: raw.update({"plugins": [name]}))
    with pytest.raises(UntrustedCodeError, match="plugin module"):
        mtbert.load(run, device="cpu")
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    assert "--trust-run-code" in error_line(capsys)
    assert not marker.exists()
    mtbert.load(run, device="cpu", trust_run_code=True)  # the user's word: then it is imported
    assert marker.exists()


@pytest.mark.parametrize("field", ["bi_head", "tasks"])
def test_load_imports_no_path_a_model_json_names(finished_run, tmp_path, evil_module, capsys, field):
    name, marker = evil_module
    run = _copy_run(finished_run, tmp_path / "copy")
    spec_path = run / "best" / "model.json"
    spec = json.loads(spec_path.read_text())
    spec[field] = f"{name}:x" if field == "bi_head" else [f"{name}:x", *spec["tasks"][1:]]
    spec_path.write_text(json.dumps(spec))
    assert main(["predict", str(run), "--out", str(tmp_path / "preds"), "--device", "cpu"]) == 2
    assert "a run directory is data, not code" in error_line(capsys)
    assert not marker.exists() and not (tmp_path / "preds").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(finished_run, tmp_path, capsys, bad):
    run = _copy_run(finished_run, tmp_path / "copy")
    weights = load_file(str(run / "best" / "model.safetensors"))
    name = next(k for k in weights if k.endswith("weight") and "heads" in k) if any("heads" in k for k in weights) \
        else next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = bad
    save_file(weights, str(run / "best" / "model.safetensors"))
    assert main(["predict", str(run), "--out", str(tmp_path / "preds"), "--device", "cpu"]) == 2
    err = error_line(capsys)
    assert "NaN or infinite" in err and name in err
    assert not (tmp_path / "preds").exists()


def test_predict_refuses_an_out_that_is_its_input(finished_run, tmp_path, capsys):
    source = tmp_path / "reviews.csv"
    source.write_text("id,sentence\n1,A gorgeous film.\n")
    before = source.read_bytes()
    assert main(["predict", str(finished_run), "--task", "sst", "--input", str(source), "--out", str(source),
                 "--device", "cpu"]) == 2
    assert "is the input file" in error_line(capsys)
    assert source.read_bytes() == before


def test_overwrite_with_a_mistyped_data_dir_deletes_nothing(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "copy")
    before = sorted(p.name for p in run.iterdir())
    assert main(["train", "--config", str(TINY_YAML), "--out", str(run), "--overwrite",
                 "--data-dir", str(tmp_path / "no-such-dir")]) == 2
    assert "not found" in error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == before and (run / "best" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def custom_task_run(tmp_path_factory, synthetic_data_dir):
    """A tiny run of a user task `mine` (SST's files) whose predictions have CS224N-style names."""
    root = tmp_path_factory.mktemp("custom")
    config = root / "mine.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(TINY_YAML), "data": {"tasks": ["mine"]},
        "tasks": {"mine": {"files": {"train": "{data_dir}/ids-sst-train.csv", "dev": "{data_dir}/ids-sst-dev.csv"},
                           "format": "tsv", "text": "sentence",
                           "label": {"column": "sentiment", "kind": "classification", "names": list("abcde")},
                           "cs224n_output": {"prefix": "mine", "header": "Predicted"}}}}))
    return train_tiny_run(root / "run", synthetic_data_dir, "train.max_steps=1", "train.int8_check=false",
                          config=config)


@pytest.mark.parametrize("output", [
    {"prefix": "/tmp/elsewhere/sst", "header": "Predicted_Sentiment"},
    {"prefix": "../sst", "header": "Predicted_Sentiment"},
    {"prefix": "sst", "header": "Predicted\nattacker text"},
])
def test_a_run_task_cannot_write_outside_out_or_add_lines(custom_task_run, tmp_path, capsys, output):
    run = _copy_run(custom_task_run, tmp_path / "copy")
    _edit_yaml(run / "best" / "config.yaml", lambda raw: raw["tasks"]["mine"].update({"cs224n_output": output}))
    assert main(["predict", str(run), "--out", str(tmp_path / "preds"), "--device", "cpu"]) == 2
    assert "cs224n_output's prefix and header must be words" in error_line(capsys)
    assert not (tmp_path / "elsewhere").exists() and not list(tmp_path.glob("*-output.csv"))


def test_an_hf_export_imports_nothing_it_names(finished_run, tmp_path, evil_module):
    from mtbert.modeling.hf_format import HEADS_SPEC, load_hf_export
    name, marker = evil_module
    out = tmp_path / "export"
    assert main(["export", str(finished_run), "--format", "hf", "--out", str(out)]) == 0
    spec = json.loads((out / HEADS_SPEC).read_text())
    spec["bi_head"] = f"{name}:x"
    (out / HEADS_SPEC).write_text(json.dumps(spec))
    with pytest.raises(UntrustedCodeError):
        load_hf_export(out)
    assert not marker.exists()


def test_a_run_trained_with_the_users_own_plugins_finishes_with_its_int8_check(tmp_path, data_dir):
    """The trainer reloads the checkpoint it wrote (the int8 check): the user's own plugins, named
    in their own --config, are theirs to import."""
    (tmp_path / "my_plugin_for_mtbert.py").write_text("LOADED = True\n")
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"base": str(TINY_YAML), "plugins": ["my_plugin_for_mtbert"]}))
    sys.path.insert(0, str(tmp_path))
    try:
        run = tmp_path / "run"
        assert main(["train", "--config", str(config), "--out", str(run), "--data-dir", str(data_dir),
                     "--set", "train.max_steps=2"]) == 0
        assert (run / "best" / "int8_check.json").exists()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_plugin_for_mtbert", None)


def test_outputs_respect_the_umask(finished_run, tmp_path):
    """mkstemp / mkdtemp make 0600 / 0700 temporaries; renamed into place they would be private."""
    import os

    from mtbert.core.io import atomic_write_text
    from mtbert.modeling.checkpoint import load_checkpoint, save_checkpoint
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "out.csv", "id,label\n")
        model, tok, cfg, meta = load_checkpoint(finished_run)
        save_checkpoint(tmp_path / "ckpt", model, tok, cfg, meta)
    finally:
        os.umask(old)
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("content", [b"not a torch file", "pickle"])
def test_a_corrupt_or_pickled_train_state_gives_no_advice_to_unpickle(stopped_run, tmp_path, capsys, content):
    import pickle

    class Payload:  # what a pickle that runs code looks like to torch.load(weights_only=True)
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    data = pickle.dumps(Payload()) if content == "pickle" else content
    (stopped_run / "last" / "train_state.pt").write_bytes(data)
    assert main(["train", "--resume", str(stopped_run)]) == 2
    err = error_line(capsys)
    assert "train_state.pt is corrupt" in err and "weights_only" not in err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("edit, expected", [
    (lambda st: st.update(step="ten"), "'step' is str"),
    (lambda st: st.pop("streams"), "'streams' is NoneType"),
    (lambda st: st.update(format=99), "format 99"),
    (lambda st: st.update(streams={"sst": "x"}), "does not fit this run"),
    (lambda st: st.update(log="[1, 2]"), "does not fit this run"),
])
def test_a_malformed_train_state_is_one_line(stopped_run, capsys, edit, expected):
    import torch
    path = stopped_run / "last" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    assert main(["train", "--resume", str(stopped_run)]) == 2
    assert expected in error_line(capsys)


def _set(path: list, value):
    """An edit of model.json: set the key at `path` (a missing value deletes it)."""
    def edit(spec):
        *parents, last = path
        for key in parents:
            spec = spec[key]
        if value is _DELETE:
            del spec[last]
        else:
            spec[last] = value
    return edit


_DELETE = object()


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, synthetic_data_dir):
    """One tiny run for the tests that only read copies of it."""
    return train_tiny_run(tmp_path_factory.mktemp("shared") / "run", synthetic_data_dir, "train.max_steps=1",
                          "train.int8_check=false")


@pytest.mark.parametrize("edit, expected", [
    (_set(["encoder", "num_attention_heads"], 7), "does not divide hidden_size"),
    (_set(["encoder", "vocab_size"], 200_000_000), "vocab_size 200000000 is outside"),
    (_set(["encoder", "vocab_size"], 900_000), "mis-shaped keys"),          # plausible, but not the file's tensors
    (_set(["encoder", "num_hidden_layers"], 40), "missing keys"),
    (_set(["encoder", "hidden_size"], "384"), "hidden_size must be int"),
    (_set(["encoder", "layer_norm_eps"], True), "layer_norm_eps must be float"),
    (_set(["encoder", "hidden_act"], "os.system"), "hidden_act"),
    (_set(["encoder"], [1, 2]), "encoder must be dict"),
    (_set(["pooling"], _DELETE), "lacks 'pooling'"),
    (_set(["tasks"], [1]), "tasks must be a list of task names"),
    (_set(["tasks"], "sst"), "tasks must be list"),
    (_set(["dropout"], "0.1"), "dropout must be a number"),
    (_set(["extensions"], {"no_such": {}}), "unknown to this mtbert"),
    (lambda spec: spec.clear(), "lacks 'encoder'"),
])
def test_a_malformed_model_json_is_one_line_before_anything_is_allocated(shared_run, tmp_path, capsys, edit, expected):
    run = _copy_run(shared_run, tmp_path / "copy")
    spec_path = run / "best" / "model.json"
    spec = json.loads(spec_path.read_text())
    edit(spec)
    spec_path.write_text(json.dumps(spec))
    assert main(["predict", str(run), "--out", str(tmp_path / "preds"), "--device", "cpu"]) == 2
    err = error_line(capsys)
    assert expected in err and "model" in err
    assert not (tmp_path / "preds").exists()


@pytest.mark.parametrize("file, content, expected", [
    ("model.json", "[1, 2]", "expected a dict"),
    ("model.json", "{not json", "corrupt "),
    ("meta.json", '"a string"', "expected a dict"),
    ("config.yaml", "- a\n- list\n", "expected a dict"),
    ("config.yaml", "model: {max_length: 100000}\n", "exceeds the encoder's"),
    ("config.yaml", "train: {lr: fast}\n", "config.yaml"),
])
def test_malformed_checkpoint_files_are_one_line(shared_run, tmp_path, capsys, file, content, expected):
    run = _copy_run(shared_run, tmp_path / "copy")
    target = run / "best" / file
    if file == "config.yaml" and content.startswith(("model", "train")):  # an edit of the real config
        raw = yaml.safe_load(target.read_text())
        for section, values in yaml.safe_load(content).items():
            raw[section].update(values)
        target.write_text(yaml.safe_dump(raw))
    else:
        target.write_text(content)
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    assert expected in error_line(capsys)


@pytest.mark.parametrize("where", ["absolute", "{data_dir}/..", "data_dir"])
def test_a_run_reads_data_only_under_the_data_dir_the_user_gives(custom_task_run, tmp_path, capsys, where,
                                                                   synthetic_data_dir):
    """A run that names a file outside the data directory (its task's files, or its own data.data_dir)
    would copy that file's ids (or texts) into the predictions written under --out."""
    secret = tmp_path / "secret" / "ids-sst-dev.csv"
    secret.parent.mkdir()
    secret.write_text("id\tsentence\tsentiment\nSECRET-TOKEN-1\tx\t1\n")
    run = _copy_run(custom_task_run, tmp_path / "copy")
    if where == "data_dir":  # the run's own data directory is not a fallback for the user's
        _edit_yaml(run / "best" / "config.yaml", lambda raw: raw["data"].update({"data_dir": str(secret.parent)}))
    else:
        up_to_root = "/".join([".."] * (len(synthetic_data_dir.parts) - 1))
        dev = str(secret) if where == "absolute" else f"{{data_dir}}/{up_to_root}{secret}"
        _edit_yaml(run / "best" / "config.yaml", lambda raw: raw["tasks"]["mine"]["files"].update({"dev": dev}))
    out = tmp_path / "preds"
    code = main(["predict", str(run), "--out", str(out), "--data-dir", str(synthetic_data_dir), "--device", "cpu"])
    written = "".join(p.read_text() for p in out.glob("*")) if out.exists() else ""
    assert "SECRET-TOKEN" not in written
    if where != "data_dir":
        assert code == 2 and "lies outside the data directory" in error_line(capsys)
