import json
import subprocess
import sys

from mtbert.apps.cli import main
from mtbert.core.tasks import get_task
from mtbert.data.readers import load_split
from tests.conftest import TINY_YAML


def test_train_evaluate_predict_smoke(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(data_dir),
                 "--set", "train.max_steps=6", "--set", "train.eval_every=3"]) == 0
    out = capsys.readouterr().out
    assert "best dev metrics" in out and "overall" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    assert set(rows[-1]["dev"]) == {"sst", "qqp", "sts", "overall"}
    assert (run / "best" / "model.safetensors").exists() and (run / "summary.json").exists()

    assert main(["evaluate", str(run), "--data-dir", str(data_dir), "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert f"{metrics['overall']:.4f}" in table
    # evaluate uses the full dev set, so compare with the selection metric only in kind, not value
    assert 0.0 <= metrics["sst"] <= 1.0 and -1.0 <= metrics["sts"] <= 1.0

    preds = tmp_path / "preds"
    assert main(["predict", str(run), "--out", str(preds), "--data-dir", str(data_dir)]) == 0
    names = sorted(p.name for p in preds.iterdir())
    assert names == sorted(["MANIFEST.json", *(f"{p}-{s}-output.csv" for p in ("sst", "para", "sts")
                                                for s in ("dev", "test"))])
    sst_test = (preds / "sst-test-output.csv").read_text().splitlines()
    assert sst_test[0] == "id \t Predicted_Sentiment "
    assert len(sst_test) == 1 + _usable("sst", "test", data_dir)  # every usable test row
    ident, value = sst_test[1].split(" , ")
    assert len(ident) == 25 and value.strip() in {"0", "1", "2", "3", "4"}
    sts_dev = (preds / "sts-dev-output.csv").read_text().splitlines()
    assert sts_dev[0] == "id \t Predicted_Similiarity " and len(sts_dev) == 1 + _usable("sts", "dev", data_dir)
    para_dev = (preds / "para-dev-output.csv").read_text().splitlines()
    assert para_dev[0] == "id \t Predicted_Is_Paraphrase " and len(para_dev) == 1 + _usable("qqp", "dev", data_dir)


def _usable(task: str, split: str, data_dir) -> int:
    return len(load_split(get_task(task), data_dir, split)[0])


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no mtbert checkpoint" in capsys.readouterr().err
    assert main(["train", "--config", str(TINY_YAML), "--out", str(tmp_path / "r"), "--set", "train.nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["data", "check", "--data-dir", str(tmp_path)]) == 1
    assert "MISSING" in capsys.readouterr().out


def test_console_script_data_check(data_dir):
    r = subprocess.run([sys.executable, "-m", "mtbert.cli", "data", "check", "--data-dir", str(data_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "quora-dev.csv" in r.stdout and "all files present" in r.stdout
