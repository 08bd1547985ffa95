"""Hostile use of the CLI: bad config files and values, impossible numeric options, training into a
finished run, a diverging run, Ctrl-C, corrupted tokenizer files, failing writes. Every anticipated
error is one line on stderr and exit 2, and nothing a run produced is lost."""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtbert.apps.cli import main
from mtbert.core.io import atomic_write_text, finite_json, to_json
from mtbert.training.trainer import Trainer
from tests.conftest import TINY_YAML


def one_line_error(capsys, code, expected: str, rc: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert code == rc, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert expected in err, err
    return err


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"bare {name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_data_dir):
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(synthetic_data_dir),
                 "--set", "train.max_steps=2"]) == 0
    return run


# ---------------------------------------------------------------- config files

@pytest.mark.parametrize("files, expected", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "inherit in a cycle: a.yaml -> b.yaml -> a.yaml"),
    ({"a.yaml": "base: a.yaml\n"}, "inherit in a cycle"),
    ({"a.yaml": "model: [1,\n"}, "not valid YAML"),
    ({"a.yaml": "train:\n  lr: 1\n   epochs: 2\n"}, "not valid YAML"),
    ({"a.yaml": "- 1\n- 2\n"}, "must be a mapping of sections"),
    ({"a.yaml": "just a string\n"}, "must be a mapping of sections"),
    ({"a.yaml": b"\xff\xfe\x00model"}, "cannot read config file"),
    ({"a.yaml": "base: gone.yaml\n"}, "config file not found"),
    ({"a.yaml": "base: [x]\n"}, "base must be a file name"),
    ({"a.yaml": "model: 5\n"}, "model. must be a mapping"),
])
def test_config_file_errors_are_one_line(tmp_path, capsys, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    code = main(["train", "--config", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expected", [
    ("train.device=gpu", "train.device must be auto, cpu, cuda, cuda:N or mps"),
    ("train.device=cuda:99", "device cuda:99 requested"),
    ("train.threads=-1", "train.threads must be at least 1"),
    ("train.threads=100000000", "train.threads must be at most"),
    ("data.tasks=[]", "at least one task"),
    ("data.tasks=[nope]", "unknown task(s) ['nope']"),
    ("data.tasks=[sst, sst]", "lists a task twice"),
    ("data.tasks=[sts, sts_bins]", "lists a task twice"),
    ("data.tasks=sst", "data.tasks must be a list"),
    ("train.clip_norm=-1", "train.clip_norm must be positive"),
    ("train.head_lr=-1e-3", "train.head_lr must be positive"),
    ("train.lr=0", "train.lr must be positive"),
    ("train.lr=.nan", "must be a float (a finite number)"),
    ("train.epochs=.inf", "must be a whole number"),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio must be in [0, 1]"),
    ("pretrain.warmup_ratio=1.5", "pretrain.warmup_ratio must be in [0, 1]"),
    ("data.train_fraction=0", "data.train_fraction must be in (0, 1]"),
    ("train.time_budget_min=-5", "train.time_budget_min must be at least 0"),
    ("data.batch_size=0", "data.batch_size must be at least 1"),
    ("data.eval_batch_size=-8", "data.eval_batch_size must be at least 1"),
    ("data.limit=0", "data.limit must be at least 1"),
    ("train.eval_every=0", "train.eval_every must be at least 1"),
    ("train.seed=-1", "train.seed must be at least 0"),
    ("train.weight_decay=-0.01", "train.weight_decay must be at least 0"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
    ("pretrain.tau=0", "pretrain.tau must be positive"),
    ("techniques={smart: {weight: -1}}", "techniques.smart.weight must be a finite number of at least 0"),
    ("train.weighting_args={weights: {sst: .inf}}", "train.weighting_args.weights.sst must be a finite number"),
    ("train.lr=[1", "value is not valid YAML"),
])
def test_impossible_config_values_are_one_line(tmp_path, capsys, override, expected):
    if override == "train.device=cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    code = main(["train", "--config", str(TINY_YAML), "--out", str(tmp_path / "run"), "--set", override])
    one_line_error(capsys, code, expected)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- numeric options, every command

@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "R", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["evaluate", "R", "--limit", "-3"], "--limit: must be at least 1"),
    (["predict", "R", "--out", "o", "--batch-size", "-1"], "--batch-size: must be at least 1"),
    (["ensemble", "R", "--out", "o", "--limit", "0"], "--limit: must be at least 1"),
    (["ensemble", "R", "--out", "o", "--batch-size", "x"], "must be a whole number"),
    (["report", "R", "--out", "o", "--top", "-1"], "--top: must be at least 0"),
    (["report", "R", "--out", "o", "--tsne-points", "-5"], "--tsne-points: must be at least 0"),
    (["report", "R", "--out", "o", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["serve", "R", "--port", "70000"], "--port: must be 0..65535"),
    (["serve", "R", "--port", "-1"], "--port: must be 0..65535"),
    (["serve", "R", "--max-items", "0"], "--max-items: must be at least 1"),
    (["serve", "R", "--max-chars", "-1"], "--max-chars: must be at least 1"),
    (["serve", "R", "--max-batch-items", "0"], "--max-batch-items: must be at least 1"),
    (["serve", "R", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["serve", "R", "--read-timeout", "0"], "--read-timeout: must be a positive number"),
    (["serve", "R", "--keep-alive-timeout", "inf"], "--keep-alive-timeout: must be a positive number"),
    (["serve", "R", "--max-connections", "0"], "--max-connections: must be at least 1"),
])
def test_numeric_options_are_checked_on_every_command(capsys, argv, expected):
    one_line_error(capsys, main(argv), expected)


def test_ensemble_threshold_must_be_finite(tmp_path, capsys, finished_run):
    code = main(["ensemble", str(finished_run), "--out", str(tmp_path / "e"), "--threshold", "sst=nan"])
    one_line_error(capsys, code, "--threshold expects TASK=VALUE")


def test_serve_port_in_use_and_unknown_host_are_one_line(capsys, finished_run):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["serve", str(finished_run), "--port", str(taken.getsockname()[1])])
        one_line_error(capsys, code, "Address already in use")
    code = main(["serve", str(finished_run), "--host", "no-such-host.invalid"])
    one_line_error(capsys, code, "cannot listen on no-such-host.invalid")


# ---------------------------------------------------------------- no accidental loss

def test_train_into_an_existing_run_is_refused_and_touches_nothing(tmp_path, capsys, finished_run, data_dir):
    before = tree_digest(finished_run)
    code = main(["train", "--config", str(TINY_YAML), "--out", str(finished_run), "--data-dir", str(data_dir),
                 "--set", "train.max_steps=1"])
    err = one_line_error(capsys, code, "already holds a finished run")
    assert "--resume" in err and "--overwrite" in err
    assert tree_digest(finished_run) == before
    # an unfinished run (interrupted after a save) is refused too, and --resume is the way on
    run = tmp_path / "unfinished"
    (run / "last").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    code = main(["train", "--config", str(TINY_YAML), "--out", str(run), "--set", "train.max_steps=1"])
    assert "already holds a run" in one_line_error(capsys, code, f"--resume {run}")
    assert (run / "config.yaml").read_text() == "x: 1\n"
    code = main(["train", "--resume", str(run), "--overwrite"])
    one_line_error(capsys, code, "give only one of them")


def test_overwrite_replaces_the_run_and_leaves_nothing_stale(tmp_path, finished_run, data_dir):
    run = tmp_path / "copy"
    import shutil
    shutil.copytree(finished_run, run)
    (run / "best.old").mkdir()  # a stale left-over that must not outlive the old run
    old_meta = json.loads((run / "best" / "meta.json").read_text())
    assert main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(data_dir),
                 "--set", "train.max_steps=1", "--overwrite"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
    assert json.loads((run / "best" / "meta.json").read_text())["step"] == 1 != old_meta["step"]
    assert not (run / "best.old").exists() and [r["step"] for r in strict_json_lines(run / "metrics.jsonl")] == [1]
    assert not list(run.glob(".replaced-*"))


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, finished_run, data_dir,
                                                                        capsys, monkeypatch):
    """--overwrite moves the old run aside; a new run that fails before its first checkpoint
    (here: its first step's loss is NaN) puts it back whole."""
    run = tmp_path / "copy"
    import shutil
    shutil.copytree(finished_run, run)
    (run / "command.txt").unlink()  # (an old run without one: the new run's must not stay behind)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    seen_aside = []
    real = Trainer.step_loss

    def fails_at_once(self, batches):
        seen_aside.extend(run.glob(".replaced-*/best/model.safetensors"))
        return {t: loss * float("nan") for t, loss in real(self, batches).items()}

    monkeypatch.setattr(Trainer, "step_loss", fails_at_once)
    code = main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(data_dir),
                 "--set", "train.max_steps=3", "--overwrite"])
    one_line_error(capsys, code, "training diverged at step 1")
    assert seen_aside, "the old run was not kept aside while the new one trained"
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # every file of the old run, byte for byte, and nothing of the new one


# ---------------------------------------------------------------- divergence is failure

def test_non_finite_loss_stops_training_and_keeps_the_last_good_model(tmp_path, capsys, monkeypatch, data_dir):
    real = Trainer.step_loss

    def explodes_after_step_4(self, batches):
        losses = real(self, batches)
        return {t: loss * float("nan") for t, loss in losses.items()} if self.step >= 4 else losses

    monkeypatch.setattr(Trainer, "step_loss", explodes_after_step_4)
    run = tmp_path / "run"
    code = main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(data_dir),
                 "--set", "train.max_steps=12", "--set", "train.eval_every=2"])
    err = one_line_error(capsys, code, "training diverged at step 5")
    assert "best/ keeps the best model so far" in err and "nan" in err
    assert not (run / "summary.json").exists()
    rows = strict_json_lines(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    assert json.loads((run / "best" / "meta.json").read_text())["step"] in (2, 4)
    assert all(math.isfinite(v) for r in rows for v in r["dev"].values())


def test_metrics_lines_are_strict_json():
    row = {"dev": {"sts": float("nan"), "sst": 0.5}, "train_loss": {"qqp": float("inf")}, "lr": [1e-3, float("-inf")]}
    assert finite_json(row) == {"dev": {"sts": None, "sst": 0.5}, "train_loss": {"qqp": None}, "lr": [1e-3, None]}
    assert "NaN" not in to_json(row) and "Infinity" not in to_json(row)


# ---------------------------------------------------------------- the error boundary

def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert main(["-v", "evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("mtbert evaluate: error: no mtbert checkpoint")


@pytest.mark.parametrize("error", [RuntimeError, ValueError, KeyError, TypeError])
def test_unexpected_errors_are_one_line_too(tmp_path, capsys, monkeypatch, error):
    """A bug (any error that is not an MtbertError, OSError or YAML error) exits 1 as internal,
    even a ValueError or KeyError: those are no longer taken for the user's mistakes."""
    import mtbert.apps.cli as cli

    def broken(*args, **kwargs):
        raise error("something\nunforeseen")

    monkeypatch.setattr(cli, "check_data_dir", broken)
    code = main(["data", "check", "--data-dir", str(tmp_path)])
    one_line_error(capsys, code, f"internal error: {error.__name__}: ", rc=1)


def test_every_anticipated_error_is_an_mtbert_error():
    from mtbert.core import errors
    from mtbert.core.trust import UntrustedCodeError
    for cls in (errors.ConfigError, errors.RegistryError, errors.UnknownTaskError, errors.DataError,
                errors.CheckpointError, errors.TrainingDiverged, UntrustedCodeError):
        assert issubclass(cls, errors.MtbertError), cls
    assert issubclass(errors.UnknownTaskError, KeyError) and str(errors.UnknownTaskError("no task 'x'")) == "no task 'x'"
    from mtbert.core.tasks import get_task
    with pytest.raises(errors.UnknownTaskError, match="unknown task 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_kill_says_how_to_resume_and_leaves_no_temporaries(tmp_path, data_dir, sig, code):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "mtbert.cli", "train", "--config", str(TINY_YAML), "--out",
                             str(run), "--data-dir", str(data_dir), "--set", "train.max_steps=100000",
                             "--set", "train.save_every=1", "--set", "train.epochs=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # Ctrl-C reaches a foreground command; a shell starts background ones
                            # (`cmd &`) with SIGINT ignored, and the child would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (run / "last" / "train_state.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (run / "last" / "train_state.pt").exists(), "no state saved within 120 s"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == code, (err, out[-500:])
    assert "Traceback" not in err and f"mtbert train --resume {run}" in err.strip().splitlines()[-1]
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- corrupted files

@pytest.mark.parametrize("content, expected", [
    ("garbage{", "corrupt or unreadable tokenizer"),
    ("", "corrupt or unreadable tokenizer"),
    ('{"version": "1.0", "model": 5}', "corrupt or unreadable tokenizer"),
    ("UNK-LESS", "corrupt or unreadable tokenizer"),
    ("HUGE-ID", "do not belong together"),
])
def test_corrupted_tokenizer_files_are_one_line(tmp_path, capsys, finished_run, content, expected):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "best" / "tokenizer.json"
    if content in ("UNK-LESS", "HUGE-ID"):
        spec = json.loads(path.read_text())
        if content == "UNK-LESS":
            spec["model"]["vocab"] = {"a": 0}
        else:
            spec["model"]["vocab"]["zzzextra"] = 10 ** 6
        content = json.dumps(spec)
    path.write_text(content)
    one_line_error(capsys, main(["evaluate", str(run), "--limit", "4"]), expected)


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_an_atomic_write_removes_a_dead_writers_temporaries_only(tmp_path):
    from mtbert.core.io import atomic_write_text
    dead, alive = tmp_path / ".out.csv.tmp-999999999-ab", tmp_path / f".out.csv.tmp-{os.getppid()}-cd"
    dead.write_text("half")
    alive.write_text("half")
    atomic_write_text(tmp_path / "out.csv", "id\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "out.csv"])


def test_a_run_that_fails_while_building_leaves_no_run_directory(tmp_path, capsys, data_dir):
    """The run directory is touched last: a backbone that is not there fails before it exists."""
    out = tmp_path / "new-run"
    code = main(["train", "--config", str(TINY_YAML), "--out", str(out), "--data-dir", str(data_dir),
                 "--set", "model.tiny=null", "--set", f"model.backbone={tmp_path / 'no-such-backbone'}"])
    one_line_error(capsys, code, "backbone not found")
    assert not out.exists()



def test_overwrite_puts_the_old_run_back_when_a_tracker_cannot_start(tmp_path, finished_run, data_dir, capsys,
                                                                    monkeypatch):
    import shutil

    from mtbert.core.errors import ConfigError
    from mtbert.training import trainer as trainer_module
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def no_tracker(*args, **kwargs):
        raise ConfigError("train.report_to tensorboard needs the `tensorboard` package")

    monkeypatch.setattr(trainer_module, "build_trackers", no_tracker)
    code = main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(data_dir),
                 "--set", "train.max_steps=3", "--overwrite"])
    one_line_error(capsys, code, "needs the `tensorboard` package")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_too_few_examples_to_score_is_one_line(tmp_path, capsys, finished_run, data_dir):
    code = main(["evaluate", str(finished_run), "--data-dir", str(data_dir), "--limit", "1"])
    one_line_error(capsys, code, "needs at least two examples")
