"""Committed predictions stay what RESULTS.md says: `mtbert predict RUN --out DIR` writes a
MANIFEST.json (run, config, seed, commit, commands, each file's sha256, dev metrics computed from
the dev files), and `mtbert predict --verify DIR` recomputes those metrics from the files against
the dev labels and checks every hash, failing (exit 2, the file named) on any difference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mtbert.apps.cli import main
from mtbert.core.errors import CheckpointError
from mtbert.core.metrics import pearson
from mtbert.inference.ensemble import ENSEMBLE_FILE
from mtbert.inference.loading import load_predictor
from mtbert.inference.manifest import MANIFEST, provenance
from mtbert.inference.predictor import evaluate_examples, load_examples
from tests.conftest import train_tiny_run


@pytest.fixture(scope="module")
def predictions(tmp_path_factory, synthetic_data_dir):
    root = tmp_path_factory.mktemp("manifest")
    run = train_tiny_run(root / "run", synthetic_data_dir, "train.max_steps=2", "train.int8_check=false")
    assert main(["predict", str(run), "--out", str(root / "preds"), "--data-dir", str(synthetic_data_dir),
                 "--device", "cpu", "--precision", "fp32"]) == 0
    return run, root / "preds"


def _copy(preds, to):
    shutil.copytree(preds, to)
    return to


def test_the_manifest_records_the_run_and_metrics_that_match_evaluate(predictions, synthetic_data_dir):
    run, preds = predictions
    manifest = json.loads((preds / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in preds.iterdir() if p.name != MANIFEST)
    assert {e["task"] for e in manifest["files"].values()} == {"sst", "qqp", "sts"}
    assert manifest["run"] == "run" and manifest["seeds"] == [manifest["config"]["train"]["seed"]]
    assert manifest["commands"]["train"].startswith("mtbert train") and "predict" in manifest["commands"]["predict"]
    predictor = load_predictor(run, "cpu", "fp32")
    metrics, _ = evaluate_examples(predictor, load_examples(predictor.tasks, synthetic_data_dir, "dev"))
    for task in ("sst", "qqp"):  # class labels: the files hold them exactly
        assert manifest["dev_metrics"][task] == pytest.approx(metrics[task], abs=1e-12)
    # sts: the files hold scores rounded to 4 decimals, as the leaderboard reads them (the tiny
    # model's scores are nearly constant, so rounding moves its correlation a lot)
    examples = load_examples(["sts"], synthetic_data_dir, "dev")["sts"]
    rounded = [float(f"{v:.4f}") for v in predictor.predict("sts", examples)["pred"]]
    assert manifest["dev_metrics"]["sts"] == pytest.approx(pearson(rounded, [e.label for e in examples]), abs=1e-12)
    assert "overall" in manifest["dev_metrics"]


def test_verify_passes_on_untouched_files(predictions, synthetic_data_dir, capsys):
    _, preds = predictions
    assert main(["predict", "--verify", str(preds), "--data-dir", str(synthetic_data_dir)]) == 0
    assert "every file matches" in capsys.readouterr().out


def _change_a_prediction(path):
    lines = path.read_text().splitlines(keepends=True)
    ex_id, _, value = lines[1].partition(",")
    lines[1] = f"{ex_id}, {1 - int(value)} \n"
    path.write_text("".join(lines))


@pytest.mark.parametrize("tamper, expected", [
    (lambda d: _change_a_prediction(d / "para-dev-output.csv"), "para-dev-output.csv: its sha256 differs"),
    (lambda d: (d / "sts-test-output.csv").unlink(), "sts-test-output.csv: listed in MANIFEST.json but missing"),
    (lambda d: (d / "extra.csv").write_text("x"), "['extra.csv'] are not in MANIFEST.json"),
    (lambda d: d.joinpath(MANIFEST).write_text("[]"), "not a format-1 prediction manifest"),
    (lambda d: d.joinpath(MANIFEST).write_text(d.joinpath(MANIFEST).read_text().replace(
        '"sst": 0.', '"sst": NaN, "was": 0.', 1)), "dev sst recomputed from the files"),
])
def test_verify_names_what_does_not_match(predictions, tmp_path, synthetic_data_dir, capsys, tamper, expected):
    _, preds = predictions
    copy = _copy(preds, tmp_path / "copy")
    tamper(copy)
    assert main(["predict", "--verify", str(copy), "--data-dir", str(synthetic_data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_verify_recomputes_the_metrics_not_only_the_hashes(predictions, tmp_path, synthetic_data_dir, capsys):
    """A changed prediction with its hash updated in the manifest still fails: the recorded dev
    metric no longer matches the files."""
    _, preds = predictions
    copy = _copy(preds, tmp_path / "copy")
    _change_a_prediction(copy / "para-dev-output.csv")
    from mtbert.core.io import sha256
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["para-dev-output.csv"]["sha256"] = sha256(copy / "para-dev-output.csv")
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert main(["predict", "--verify", str(copy), "--data-dir", str(synthetic_data_dir)]) == 2
    assert "dev qqp recomputed from the files" in capsys.readouterr().err


def test_verify_takes_no_run(predictions, capsys):
    _, preds = predictions
    assert main(["predict", "somewhere", "--verify", str(preds)]) == 2
    assert "give no RUN_DIR" in capsys.readouterr().err


COMMITTED = sorted(p.parent for p in Path(__file__).resolve().parents[1].glob("results/predictions/*/MANIFEST.json"))


@pytest.mark.real_data
@pytest.mark.parametrize("directory", COMMITTED, ids=[d.name for d in COMMITTED])
def test_the_committed_predictions_verify(directory, capsys):
    """What RESULTS.md's leaderboard table points to: every hash, and the dev metrics recomputed
    from the files against the real dev labels."""
    assert main(["predict", "--verify", str(directory)]) == 0, capsys.readouterr().err


def test_an_ensembles_manifest_names_each_members_seed_and_training_command(predictions, tmp_path,
                                                                             synthetic_data_dir):
    """An ensemble's files come from several models: the manifest lists each member's seed and the
    command that trained it (a kept epoch's is its run's), and the command that built the ensemble."""
    run, _ = predictions
    other = train_tiny_run(tmp_path / "other", synthetic_data_dir, "train.max_steps=2", "train.int8_check=false",
                           "train.seed=7", "train.keep_epochs=true")
    ens, out = tmp_path / "ens", tmp_path / "preds"
    assert main(["ensemble", str(run), str(other / "epochs" / "0"), "--out", str(ens),
                 "--data-dir", str(synthetic_data_dir), "--device", "cpu", "--precision", "fp32"]) == 0
    assert main(["predict", str(ens), "--out", str(out), "--data-dir", str(synthetic_data_dir),
                 "--device", "cpu", "--precision", "fp32"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    trained = (run / "command.txt").read_text().strip(), (other / "command.txt").read_text().strip()
    run_seed = yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"]
    assert run_seed != 7 and manifest["seeds"] == [run_seed, 7]
    assert manifest["members"] == {"run": {"seed": run_seed, "train": trained[0]},
                                   "other-epoch0": {"seed": 7, "train": trained[1]}}
    assert "--set train.seed=7" in trained[1]
    assert manifest["commands"]["ensemble"].startswith("mtbert ensemble ") and "train" not in manifest["commands"]
    assert main(["predict", "--verify", str(out), "--data-dir", str(synthetic_data_dir)]) == 0


def test_provenance_reads_only_the_members_in_use(predictions, tmp_path):
    """A member no task uses (below every threshold) is neither listed nor read, so its broken files
    cannot stop the command; an ensemble without its readable record gives a null build command."""
    run, _ = predictions
    unused = tmp_path / "unused"
    shutil.copytree(run / "best", unused)
    (unused / "config.yaml").write_text("train: [unclosed")
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / ENSEMBLE_FILE).write_text(json.dumps({
        "format": "mtbert-ensemble/1", "tasks": {"sst": ["run"], "qqp": ["run"]},
        "members": [{"name": "run", "checkpoint": str(run / "best")},
                    {"name": "unused", "checkpoint": str(unused)}]}))
    origin = provenance(ens)
    assert list(origin["members"]) == ["run"] and origin["commands"] == {"ensemble": None}
    assert origin["members"]["run"]["train"] == (run / "command.txt").read_text().strip()
    (ens / ENSEMBLE_FILE).write_text((ens / ENSEMBLE_FILE).read_text().replace('["run"], "qqp"', '["unused"], "qqp"'))
    with pytest.raises(CheckpointError, match="config.yaml"):  # in use and corrupt: one clear error
        provenance(ens)
