import json

import pytest
import torch

from mtbert.training.trainer import Trainer


def _trainer(tmp_path, tiny_cfg, *overrides):
    return Trainer(tiny_cfg(*overrides), tmp_path / "run")


def test_frozen_mode_trains_heads_only(tmp_path, tiny_cfg):
    tr = _trainer(tmp_path, tiny_cfg, "model.finetune=frozen", "train.max_steps=3")
    enc0 = {k: v.clone() for k, v in tr.model.encoder.state_dict().items()}
    head0 = tr.model.heads["sst"].proj.weight.clone()
    tr.run()
    assert all(torch.equal(enc0[k], v) for k, v in tr.model.encoder.state_dict().items())
    assert not torch.equal(head0, tr.model.heads["sst"].proj.weight)


def test_single_task_run_selects_on_its_metric(tmp_path, tiny_cfg):
    tr = _trainer(tmp_path, tiny_cfg, "data.tasks=[cfimdb]", "train.max_steps=2", "model.max_length=32")
    summary = tr.run()
    assert set(summary["best_dev"]) == {"cfimdb"}


@pytest.mark.parametrize("schedule", ["sequential", "round_robin", "interleaved", "annealed"])
def test_schedules_drive_the_loop(tmp_path, tiny_cfg, schedule):
    tr = _trainer(tmp_path, tiny_cfg, f"train.schedule={schedule}", "train.epochs=2", "data.limit=16")
    tr.run()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[-1]["step"] == tr.total_steps == sum(len(p) for p in tr.plans)


@pytest.mark.parametrize("weighting", ["learnable", "uncertainty", "awl"])
def test_weighting_parameters_are_trained_with_their_own_lr(tmp_path, tiny_cfg, weighting):
    tr = _trainer(tmp_path, tiny_cfg, f"train.weighting={weighting}", "train.max_steps=2",
                  "train.weighting_args={lr: 0.05}")
    before = {n: p.clone() for n, p in tr.trained_parameters().items() if n.startswith("weighting.")}
    lrs = [lr for n, lr in tr.learning_rates().items() if n in before]
    assert lrs and all(lr == pytest.approx(0.05 * tr.lr_factor(0)) for lr in lrs)
    tr.run()
    assert any(not torch.equal(p, tr.trained_parameters()[n]) for n, p in before.items())


def test_same_seed_same_metrics(tmp_path, tiny_cfg):
    a = Trainer(tiny_cfg("train.max_steps=3"), tmp_path / "a").run()
    b = Trainer(tiny_cfg("train.max_steps=3"), tmp_path / "b").run()
    assert a["best_dev"] == b["best_dev"]


def test_unwritable_output_is_a_clear_error(tmp_path, tiny_cfg):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        Trainer(tiny_cfg(), blocker / "run")


def test_time_budget_stops_training_early(tmp_path, tiny_cfg):
    tr = _trainer(tmp_path, tiny_cfg, "train.time_budget_min=0.0", "train.epochs=3")
    summary = tr.run()
    assert summary["steps"] == 1 < tr.total_steps  # stops after the first step, still evaluates
    assert (tmp_path / "run" / "best").exists()


def test_pooler_and_head_parameters_are_all_optimised(tmp_path, tiny_cfg):
    tr = _trainer(tmp_path, tiny_cfg, "model.pooling=mean+cnn+bilstm", "model.pair_encoding={qqp: bi, sts: bi}",
                  "model.shared_pair_layer=8")
    in_optimizer = {id(p) for p in tr.trained_parameters().values()}
    missing = [n for n, p in tr.model.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    assert missing == []


def test_eval_every_on_an_epoch_boundary_evaluates_once(tmp_path, tiny_cfg):
    tr = _trainer(tmp_path, tiny_cfg, "data.limit=16", "train.schedule=interleaved", "train.epochs=2")
    per_epoch = len(tr.plans[0])
    tr.cfg.train.eval_every = per_epoch
    tr.run()
    steps = [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [per_epoch, 2 * per_epoch]


@pytest.mark.parametrize("override,message", [
    ("train.schedule_args={decay: 0.5}", "unknown options"),
    ("train.weighting_args={lr: 0.1}", "unknown options"),
    ("train.weighting_args={weights: {stss: 2}}", "unknown tasks"),
    ("data.tasks=[sts, sts_bins]", "variant"),
])
def test_bad_strategy_options_are_clear_errors(tmp_path, tiny_cfg, override, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, tiny_cfg, override)


def test_compiled_encoder_trains_like_eager(tmp_path, tiny_cfg):
    """train.compile traces the encoder with torch.compile in place: same parameter names in the
    checkpoint, and (the aot_eager backend runs the traced graphs without code generation) the
    same metrics as eager up to float noise. `inductor` is the backend that makes it faster."""
    eager = Trainer(tiny_cfg("train.max_steps=3"), tmp_path / "eager").run()
    tr = Trainer(tiny_cfg("train.max_steps=3", "train.compile=aot_eager"), tmp_path / "compiled")
    compiled = tr.run()
    assert compiled["best_dev"] == pytest.approx(eager["best_dev"], abs=1e-4)
    assert not any("_orig_mod" in k for k in tr.model.state_dict())
    with pytest.raises(ValueError, match="torch.compile backend"):
        Trainer(tiny_cfg("train.compile=nonsense"), tmp_path / "bad")
