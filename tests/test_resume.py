"""Resuming a run (mtbert train --resume) ends exactly where an uninterrupted run ends."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mtbert.apps.cli import main
from mtbert.modeling.checkpoint import load_checkpoint
from mtbert.training.state import find_state, resume_config
from mtbert.training.trainer import Trainer
from tests.conftest import TINY_YAML

# 3 epochs of 6 steps; evaluations at 4, 6, 8, 12 (and 12 = the end), saves also at 3 and 9.
RUN = ["train.max_steps=12", "train.epochs=3", "train.eval_every=4", "train.save_every=3", "train.threads=1"]


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("elapsed_s"), r.pop("memory")  # (wall time and resident memory differ between runs)
    return rows


def _same_weights(a, b) -> bool:
    return _same_tensors(a.state_dict(), b.state_dict())


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _saved_step(run_dir) -> int:
    try:
        return json.loads((run_dir / "last" / "meta.json").read_text())["step"]
    except (OSError, ValueError):  # none yet, or being swapped right now
        return -1


class Crash(Exception):
    pass


def _crash_after(monkeypatch, crash_step: int):
    """Make training die right after optimizer step `crash_step`, as a killed process would."""
    step = Trainer.train_step

    def crashing_step(self, tasks):
        out = step(self, tasks)
        if self.step == crash_step:
            raise Crash
        return out
    monkeypatch.setattr(Trainer, "train_step", crashing_step)


@pytest.mark.parametrize("overrides,crash_after", [
    ([], 10),  # resumes from the periodic save at step 9, mid-epoch
    # stateful parts: learned loss weights, EMA teacher, PCGrad's generator, plateau LR halving
    (["train.weighting=learnable", "techniques={bregman: {}, pcgrad: {}, plateau: {patience: 1}}"], 5),
    # sampled schedule, half-used passes, UDA's augmentation generator (beta 0: every example counts),
    # SMART's noise (torch generator)
    (["train.schedule=annealed", "train.weighting=uncertainty", "techniques={uda: {beta: 0}, smart: {}}"], 9),
], ids=["default", "learnable-bregman-pcgrad-plateau", "annealed-uda-smart"])
def test_resumed_run_equals_uninterrupted(tmp_path, tiny_cfg, monkeypatch, overrides, crash_after):
    cfg = tiny_cfg(*RUN, *overrides)
    full = Trainer(cfg, tmp_path / "full")
    expected = full.run()

    _crash_after(monkeypatch, crash_after)
    with pytest.raises(Crash):
        Trainer(cfg, tmp_path / "run").run()
    monkeypatch.undo()
    assert json.loads((find_state(tmp_path / "run") / "meta.json").read_text())["step"] < crash_after

    resumed = Trainer(cfg, tmp_path / "run", resume=True)  # fresh object; the global generators were used since
    summary = resumed.run()
    assert summary["best_dev"] == expected["best_dev"]
    assert summary["steps"] == expected["steps"] and summary["examples_seen"] == expected["examples_seen"]
    assert _rows(tmp_path / "run") == _rows(tmp_path / "full")
    assert _same_weights(resumed.model, full.model)
    assert _same_tensors(resumed.trained_parameters(), full.trained_parameters())  # learned loss weights too
    assert not (tmp_path / "run" / "last").exists()  # a finished run keeps best/ only


def _meta(checkpoint) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())


def test_keep_epochs_keeps_each_epoch_and_resume_can_switch_it_on(tmp_path, tiny_cfg, monkeypatch):
    """Each kept checkpoint is the model at its epoch's end (its dev metrics are that evaluation's
    row); switching keep_epochs on when resuming adds files only: the same rows, the same weights."""
    full = Trainer(tiny_cfg(*RUN, "train.keep_epochs=true"), tmp_path / "full")
    full.run()
    rows = {r["step"]: r for r in _rows(tmp_path / "full")}
    kept = sorted(p.name for p in (tmp_path / "full" / "epochs").iterdir())
    assert kept == ["0", "1"]  # epoch 0 ends at step 6, epoch 1 at max_steps 12 (no epoch 2)
    for epoch, step in ((0, 6), (1, 12)):
        meta = _meta(tmp_path / "full" / "epochs" / str(epoch))
        assert (meta["epoch"], meta["step"]) == (epoch, step) and meta["dev"] == rows[step]["dev"]
    model, *_ = load_checkpoint(tmp_path / "full" / "epochs" / "1")
    assert _same_weights(model, full.model)
    assert not _same_weights(load_checkpoint(tmp_path / "full" / "epochs" / "0")[0], full.model)

    _crash_after(monkeypatch, 10)  # started without it: epoch 0's checkpoint is not there
    with pytest.raises(Crash):
        Trainer(tiny_cfg(*RUN), tmp_path / "run").run()
    monkeypatch.undo()
    resumed = Trainer(resume_config(tmp_path / "run", None, ["train.keep_epochs=true"]), tmp_path / "run", resume=True)
    resumed.run()
    assert sorted(p.name for p in (tmp_path / "run" / "epochs").iterdir()) == ["1"]
    assert _rows(tmp_path / "run") == _rows(tmp_path / "full")
    assert _same_weights(resumed.model, full.model)


def test_crash_between_the_renames_of_a_save_resumes_from_last_old(tmp_path, tiny_cfg, monkeypatch):
    cfg = tiny_cfg(*RUN)
    _crash_after(monkeypatch, 5)
    with pytest.raises(Crash):
        Trainer(cfg, tmp_path / "run").run()
    monkeypatch.undo()
    os.replace(tmp_path / "run" / "last", tmp_path / "run" / "last.old")  # new copy not yet renamed in
    assert find_state(tmp_path / "run") == tmp_path / "run" / "last.old"
    assert Trainer(cfg, tmp_path / "run", resume=True).run()["steps"] == 12
    assert not (tmp_path / "run" / "last.old").exists()


def test_sigkill_mid_run_then_resume(tmp_path, tiny_cfg, data_dir):
    """A real process killed with SIGKILL resumes from its last save and ends like an uninterrupted run."""
    sets = ["train.max_steps=120", "train.epochs=20", "train.eval_every=10", "train.save_every=4",
            "train.threads=1", "train.progress=false"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mtbert.cli", "train", "--config", str(TINY_YAML), "--out", str(run),
           "--data-dir", str(data_dir), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while _saved_step(run) < 30:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "no resumable state appeared"
            time.sleep(0.02)
        time.sleep(0.1)  # somewhere between two saves
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it was killed"

    assert main(["train", "--resume", str(run), "--data-dir", str(data_dir)]) == 0
    rows = _rows(run)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 120

    expected = Trainer(tiny_cfg(*sets, f"data.data_dir={data_dir}"), tmp_path / "full")
    summary = expected.run()
    assert json.loads((run / "summary.json").read_text())["best_dev"] == summary["best_dev"]
    assert rows == _rows(tmp_path / "full")
    assert _same_weights(load_checkpoint(run)[0], load_checkpoint(tmp_path / "full")[0])


def test_resume_errors_are_clear(tmp_path, tiny_cfg, capsys):
    run = tmp_path / "run"
    assert main(["train", "--resume", str(run)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    assert main(["train", "--resume", str(run)]) == 2
    assert "no resumable state" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--set", "train.lr=1"]) == 2
    assert "--set train.lr cannot change it (only train.time_budget_min, train.keep_epochs)" in capsys.readouterr().err
    (run / "summary.json").write_text("{}")
    assert main(["train", "--resume", str(run)]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["train", "--config", str(TINY_YAML)]) == 2
    assert "--out RUN_DIR is required" in capsys.readouterr().err


def test_full_disk_while_saving_state_keeps_the_previous_one(tmp_path, tiny_cfg, data_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    saves, real_save = [], torch.save

    def filling_save(obj, f, *a, **k):  # the second state save finds the disk full, half-way through
        saves.append(f)
        if len(saves) == 2:
            open(f, "wb").write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", filling_save)
    args = ["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(data_dir),
            *[a for s in RUN for a in ("--set", s)]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "could not save checkpoint" in err and "No space left" in err and "previous last/ is kept" in err
    assert sorted(p.name for p in run.iterdir()) == ["best", "command.txt", "config.yaml", "last", "metrics.jsonl"]  # no temp dirs
    assert json.loads((run / "last" / "meta.json").read_text())["step"] == 3
    load_checkpoint(run)  # best/ intact
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert [r["step"] for r in _rows(run)] == [4, 6, 8, 12]
