import json
import shutil

import numpy as np
import pytest

from mtbert.apps.cli import main
from mtbert.core.tasks import TASKS, get_task
from mtbert.inference.ensemble import build_ensemble, parse_thresholds
from mtbert.inference.loading import load_predictor
from mtbert.inference.predictor import (
    EnsemblePredictor,
    Predictor,
    average_outputs,
    evaluate_examples,
    load_examples,
)
from tests.conftest import TINY_YAML

TASK_FILES = ("ids-sst", "quora", "sts")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, synthetic_data_dir):
    """The first rows of each sst / quora / sts file, so evaluate and predict take seconds."""
    d = tmp_path_factory.mktemp("data")
    for stem in TASK_FILES:
        for split, rows in (("train", 60), ("dev", 40), ("test-student", 30)):
            name = f"{stem}-{split}.csv"
            lines = (synthetic_data_dir / name).read_text(encoding="utf-8").splitlines(keepends=True)
            (d / name).write_text("".join(lines[: 1 + rows]), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """Three tiny runs: a and b differ only in seed (cross-encoded pairs), c bi-encodes qqp and sts."""
    root = tmp_path_factory.mktemp("runs")
    extra = {"a": [], "b": ["train.seed=1"], "c": ["model.pair_encoding={qqp: bi, sts: bi}", "train.seed=2"]}
    for name, sets in extra.items():
        args = ["train", "--config", str(TINY_YAML), "--out", str(root / name), "--data-dir", str(small_data),
                "--set", "train.max_steps=2"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 0
    return {name: root / name for name in extra}


def _dev(small_data):
    return load_examples(["sst", "qqp", "sts"], small_data, "dev")


def test_ensemble_of_one_run_is_that_run(tmp_path, runs, small_data, capsys):
    ens = tmp_path / "ens1"
    assert main(["ensemble", str(runs["a"]), "--out", str(ens), "--data-dir", str(small_data)]) == 0
    printed = capsys.readouterr().out
    assert "ENSEMBLE" in printed and "sst" in printed
    assert sorted(p.name for p in ens.iterdir()) == ["config.yaml", "ensemble.json", "meta.json"]
    spec = json.loads((ens / "ensemble.json").read_text())
    assert spec["members"][0]["checkpoint"] == str((runs["a"] / "best").resolve())
    assert spec["tasks"] == {"sst": ["a"], "qqp": ["a"], "sts": ["a"]}

    single, ensemble = load_predictor(runs["a"], "cpu"), load_predictor(ens, "cpu")
    assert isinstance(single, Predictor) and isinstance(ensemble, EnsemblePredictor)
    for task, examples in _dev(small_data).items():
        a, e = single.predict(task, examples), ensemble.predict(task, examples)
        assert np.array_equal(a["pred"], e["pred"]) and np.array_equal(a["prob"], e["prob"]), task

    # evaluate: same metrics (on the data the user names: never a directory the ensemble's files name)
    assert main(["evaluate", str(runs["a"]), "--data-dir", str(small_data), "--json", str(tmp_path / "a.json")]) == 0
    assert main(["evaluate", str(ens), "--data-dir", str(small_data), "--json", str(tmp_path / "e.json")]) == 0
    capsys.readouterr()
    m_run, m_ens = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "e.json"))
    assert m_run == m_ens and set(m_ens) == {"sst", "qqp", "sts", "overall"}
    assert json.loads((ens / "meta.json").read_text())["dev"] == m_ens

    # predict: byte-identical files
    assert main(["predict", str(runs["a"]), "--out", str(tmp_path / "pa"), "--data-dir", str(small_data)]) == 0
    assert main(["predict", str(ens), "--out", str(tmp_path / "pe"), "--data-dir", str(small_data)]) == 0
    names = sorted(p.name for p in (tmp_path / "pa").iterdir() if p.name != "MANIFEST.json")  # (names its run)
    assert names == sorted(p.name for p in (tmp_path / "pe").iterdir() if p.name != "MANIFEST.json")
    assert len(names) == 6
    for n in names:
        assert (tmp_path / "pa" / n).read_bytes() == (tmp_path / "pe" / n).read_bytes(), n
    sst = (tmp_path / "pe" / "sst-test-output.csv").read_text().splitlines()
    assert sst[0] == "id \t Predicted_Sentiment " and len(sst) == 1 + 30
    # an ensemble's prediction folder verifies (its record's `tasks` lists members, not definitions)
    assert main(["predict", "--verify", str(tmp_path / "pe"), "--data-dir", str(small_data)]) == 0


def _check_average(ens, members, examples_by_task):
    """The ensemble's outputs against a hand average of independently loaded member predictors."""
    for task, examples in examples_by_task.items():
        outs = [m.predict(task, examples) for m in members]
        got = ens.predict(task, examples)
        kind = get_task(task).kind.name
        mean = np.mean([o["prob"] for o in outs], axis=0)
        assert np.allclose(got["prob"], mean, atol=1e-6), task
        if kind == "classification":
            assert got["prob"].shape == (len(examples), 5)
            top2 = np.sort(mean, -1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] > 1e-5
            assert np.array_equal(got["pred"][clear], mean.argmax(-1)[clear])
        elif kind == "binary":
            clear = np.abs(mean - 0.5) > 1e-6
            assert np.array_equal(got["pred"][clear], (mean > 0.5)[clear].astype(int))
        else:
            assert np.allclose(got["pred"], np.mean([o["pred"] for o in outs], axis=0), atol=1e-6)
        # averaging really happened: the ensemble is neither member
        for o in outs:
            assert not np.allclose(got["prob"], o["prob"], atol=1e-7), task


def test_two_runs_average_probabilities(tmp_path, runs, small_data):
    summary = build_ensemble([runs["a"], runs["b"]], tmp_path / "ens", small_data, device="cpu")
    assert summary["tasks"] == {t: ["a", "b"] for t in ("sst", "qqp", "sts")}
    ens = load_predictor(tmp_path / "ens", "cpu")
    members = [load_predictor(runs[n], "cpu") for n in ("a", "b")]
    dev = _dev(small_data)
    _check_average(ens, members, dev)
    metrics, _ = evaluate_examples(ens, dev)
    assert metrics == summary["dev"] == json.loads((tmp_path / "ens" / "meta.json").read_text())["dev"]
    member_dev = {r["name"]: r["dev"] for r in summary["members"]}
    assert member_dev["a"] == evaluate_examples(members[0], dev)[0]


def test_cross_and_bi_members_combine(tmp_path, runs, small_data):
    build_ensemble([runs["a"], runs["c"]], tmp_path / "ens", small_data, device="cpu")
    ens = load_predictor(tmp_path / "ens", "cpu")
    assert ens.members["a"].model.pair_encoding["qqp"] == "cross"
    assert ens.members["c"].model.pair_encoding["qqp"] == "bi"
    c = load_predictor(runs["c"], "cpu")
    dev = _dev(small_data)
    qqp = c.encode("qqp", dev["qqp"][:3])
    assert len(qqp.inputs[0]) == 2  # each member encodes the pair its own way
    _check_average(ens, [load_predictor(runs["a"], "cpu"), c], dev)


def test_thresholds_exclude_members(tmp_path, runs, small_data, capsys):
    base = build_ensemble([runs["a"], runs["b"]], tmp_path / "all", small_data, device="cpu")
    dev = {r["name"]: r["dev"] for r in base["members"]}
    assert dev["a"]["sts"] != dev["b"]["sts"]
    best_sts = max(dev, key=lambda n: dev[n]["sts"])
    ens = tmp_path / "thr"
    # sts: exactly the best member's metric (inclusive); qqp: unreachable, so the best member alone
    assert main(["ensemble", str(runs["a"]), str(runs["b"]), "--out", str(ens), "--data-dir", str(small_data),
                 "--threshold", f"sts={dev[best_sts]['sts']!r}", "--threshold", "qqp=1.5"]) == 0
    printed = capsys.readouterr().out
    assert "no member reaches qqp >= 1.5" in printed
    spec = json.loads((ens / "ensemble.json").read_text())
    assert spec["thresholds"] == {"sts": dev[best_sts]["sts"], "qqp": 1.5}
    assert spec["tasks"]["sts"] == [best_sts] and spec["tasks"]["sst"] == ["a", "b"]
    assert spec["tasks"]["qqp"] == [spec["fallbacks"]["qqp"]] and list(spec["fallbacks"]) == ["qqp"]
    assert dev[spec["fallbacks"]["qqp"]]["qqp"] == max(d["qqp"] for d in dev.values())

    ensemble, best = load_predictor(ens, "cpu"), load_predictor(runs[best_sts], "cpu")
    examples = _dev(small_data)["sts"]
    assert np.array_equal(ensemble.predict("sts", examples)["pred"], best.predict("sts", examples)["pred"])
    meta = json.loads((ens / "meta.json").read_text())
    assert meta["dev"]["sts"] == dev[best_sts]["sts"] and meta["dev"]["qqp"] == max(d["qqp"] for d in dev.values())


def test_moved_or_changed_member_is_a_clear_error(tmp_path, runs, small_data, capsys):
    member = tmp_path / "member"
    shutil.copytree(runs["a"], member)
    ens = tmp_path / "ens"
    assert main(["ensemble", str(member), "--out", str(ens), "--data-dir", str(small_data), "--limit", "5"]) == 0
    capsys.readouterr()
    member.rename(tmp_path / "moved")
    assert main(["evaluate", str(ens)]) == 2
    err = capsys.readouterr().err
    assert "member 'member' not found at" in err and str(member / "best") in err and "Traceback" not in err
    assert main(["predict", str(ens), "--out", str(tmp_path / "p")]) == 2
    assert "not found" in capsys.readouterr().err

    (tmp_path / "moved").rename(member)
    shutil.copy(runs["b"] / "best" / "model.safetensors", member / "best" / "model.safetensors")
    assert main(["evaluate", str(ens)]) == 2
    assert "changed since the ensemble was built" in capsys.readouterr().err


def test_bad_ensemble_commands(tmp_path, runs, small_data, capsys):
    common = ["--data-dir", str(small_data), "--limit", "5"]
    assert main(["ensemble", str(tmp_path / "nope"), "--out", str(tmp_path / "e")] + common) == 2
    assert "no mtbert checkpoint" in capsys.readouterr().err
    assert main(["ensemble", str(runs["a"]), "--out", str(tmp_path / "e"), "--threshold", "sst"] + common) == 2
    assert "TASK=VALUE" in capsys.readouterr().err
    assert main(["ensemble", str(runs["a"]), "--out", str(tmp_path / "e"), "--threshold", "cfimdb=0.5"] + common) == 2
    assert "no member has" in capsys.readouterr().err
    assert main(["ensemble", str(runs["a"]), str(runs["a"] / "best"), "--out", str(tmp_path / "e")] + common) == 2
    assert "same checkpoint" in capsys.readouterr().err
    assert main(["ensemble", str(runs["b"]), "--out", str(runs["a"])] + common) == 2
    assert "is a training run" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (runs["a"] / "ensemble.json").exists()
    assert main(["ensemble", str(runs["a"]), "--out", str(tmp_path / "e")] + common) == 0
    capsys.readouterr()
    assert main(["ensemble", str(tmp_path / "e"), "--out", str(tmp_path / "e2")] + common) == 2
    assert "is an ensemble" in capsys.readouterr().err


def test_average_outputs_rules():
    sst, qqp, sts = get_task("sst"), get_task("qqp"), get_task("sts")
    p1 = np.array([[0.6, 0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    p2 = np.array([[0.0, 0.9, 0.1, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    out = average_outputs(sst, [{"prob": p1}, {"prob": p2}])
    assert out["pred"].tolist() == [1, 4]  # argmax of the mean, not a vote
    assert np.allclose(np.exp(out["logits"]), out["prob"])
    out = average_outputs(qqp, [{"prob": np.array([0.9, 0.2])}, {"prob": np.array([0.3, 0.4])}])
    assert out["pred"].tolist() == [1, 0] and np.allclose(out["prob"], [0.6, 0.3])
    assert np.allclose(1 / (1 + np.exp(-out["logits"][:, 0])), out["prob"])
    out = average_outputs(sts, [{"prob": np.array([1.0, 4.0])}, {"prob": np.array([2.0, 5.0])}])
    assert np.allclose(out["pred"], [1.5, 4.5]) and np.allclose(out["score"], out["pred"])
    if "sts_bins" in TASKS:
        bins = get_task("sts_bins")
        a, b = np.zeros((1, 26)), np.zeros((1, 26))
        a[0, 5], b[0, 15] = 1.0, 1.0  # scores 1.0 and 3.0
        assert np.allclose(average_outputs(bins, [{"prob": a}, {"prob": b}])["pred"], [2.0])


def test_parse_thresholds_and_listing(capsys):
    assert parse_thresholds(["sst=0.53", "qqp = 0.88"]) == {"sst": 0.53, "qqp": 0.88}
    with pytest.raises(ValueError, match="TASK=VALUE"):
        parse_thresholds(["sst=high"])
    assert main(["techniques"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("ensemble"))
    assert "002, 004" in line and "mtbert ensemble RUN_DIR... --out RUN_DIR" in line


def test_an_ensemble_of_one_runs_kept_epochs(tmp_path, small_data, capsys):
    """train.keep_epochs' checkpoints are ensemble members, named after their run and epoch."""
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(small_data),
                 "--set", "train.epochs=2", "--set", "train.keep_epochs=true"]) == 0
    ens = tmp_path / "ens"
    assert main(["ensemble", str(run / "epochs" / "0"), str(run / "epochs" / "1"), "--out", str(ens),
                 "--data-dir", str(small_data)]) == 0
    assert "run-epoch0" in capsys.readouterr().out
    members = json.loads((ens / "ensemble.json").read_text())["members"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["name"] for m in members] == ["run-epoch0", "run-epoch1"]
    assert [m["step"] for m in members] == [r["step"] for r in rows] and rows[0]["step"] < rows[1]["step"]
