"""Each technique changes what it claims to change, compared with plain training from the same
weights on the same batches; each preset switches on what its name says; same seed, same run."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mtbert.core.config import load_config
from mtbert.training.schedules import Biased, Interleaved, build_schedule
from mtbert.training.techniques import GradientCombiner
from mtbert.training.techniques.pcgrad import project_conflicting
from mtbert.training.trainer import Trainer
from mtbert.training.weightings import Sum
from tests.conftest import TINY, step_context

NO_DROPOUT = ["model.dropout=0",
              "model.tiny={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
              "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]


def _pair(tmp_path, tiny_cfg, spec: str, *overrides):
    """A plain trainer and one with `spec`, same config otherwise (same weights, same batches)."""
    plain = Trainer(tiny_cfg(*NO_DROPOUT, *overrides), tmp_path / "plain")
    tech = Trainer(tiny_cfg(*NO_DROPOUT, f"techniques={spec}", *overrides), tmp_path / "tech")
    return plain, tech


def _loss_and_grads(tr: Trainer, batches: dict) -> tuple[float, torch.Tensor]:
    """The weighted loss of one step and the encoder gradient it gives (no update)."""
    tr.model.train()
    total = tr.step_gradients(batches)
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for n, p in tr.model.encoder.named_parameters() if "lora_" not in n])
    return float(total), grad


@pytest.mark.parametrize("spec, tasks", [
    ("{smart: {weight: 1.0, epsilon: 1.0e-2, step_size: 1.0e-2}}", ["sst"]),
    ("{bregman: {mu: 1.0, beta: 0.5}}", ["sst"]),
    ("{uda: {weight: 1.0, beta: 0.0, tsa: null}}", ["sst"]),
    ("{uda: {weight: 0, tsa: exp}}", ["sst"]),  # early on, exp TSA drops the confident examples
    ("{pcgrad: {}}", ["sst", "qqp", "sts"]),
    ("{lora: {rank: 4}}", ["sst"]),
])
def test_technique_changes_the_loss_or_the_gradients(tmp_path, tiny_cfg, spec, tasks):
    plain, tech = _pair(tmp_path, tiny_cfg, spec)
    tech_params = dict(tech.model.named_parameters())
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, tech_params[name]), name  # same start (adapters aside)
    # one ordinary step first, so that state-carrying techniques (Bregman's teacher) have state
    plain.train_step(tasks)
    tech.train_step(tasks)
    batches = plain.next_batches(tasks)
    assert all(torch.equal(batches[t]["indices"], b["indices"]) for t, b in tech.next_batches(tasks).items())
    # from plain's weights, so only the technique differs
    tech.model.load_state_dict(plain.model.state_dict(), strict=False)
    loss_p, grad_p = _loss_and_grads(plain, batches)
    loss_t, grad_t = _loss_and_grads(tech, batches)
    changed_loss = abs(loss_p - loss_t) > 1e-6
    changed_grad = (grad_p - grad_t).abs().max().item() > 1e-6
    assert changed_loss or changed_grad, f"{spec} changed neither the loss nor the gradients"


def test_llrd_changes_the_update_not_the_gradient(tmp_path, tiny_cfg):
    plain, tech = _pair(tmp_path, tiny_cfg, "{llrd: {decay: 0.5}}", "train.warmup_ratio=0")
    lrs = tech.learning_rates()
    assert lrs["encoder.embeddings.word.weight"] < lrs["encoder.layers.1.ffn.up.weight"] < lrs["encoder.pooler.weight"]
    before = plain.model.encoder.embeddings.word.weight.detach().clone()
    plain.train_step(["sst"])
    tech.train_step(["sst"])
    moved_p = (plain.model.encoder.embeddings.word.weight - before).abs().max()
    moved_t = (tech.model.encoder.embeddings.word.weight - before).abs().max()
    assert 0 < moved_t < moved_p  # the bottom layer moves less


def test_pcgrad_projects_two_conflicting_task_gradients(tmp_path, tiny_cfg, monkeypatch):
    """Real projection: the per-task gradients on the shared encoder conflict (negative inner
    product), and the applied gradient is the projected sum, not the plain sum."""
    # STS's weight -1 (no valid config gives it: weights are at least 0) turns its gradient against SST's
    monkeypatch.setattr(Sum, "forward", lambda self, losses: sum(-l if t == "sts" else l for t, l in losses.items()))
    tr = Trainer(tiny_cfg(*NO_DROPOUT, "techniques={pcgrad: {seed: 3}}", "data.tasks=[sst, sts]"), tmp_path / "r")
    batches = tr.next_batches(["sst", "sts"])
    shared = tr.model.shared_parameters()
    per_task = []
    for t, b in batches.items():
        tr.model.zero_grad()
        tr.weighted_loss(tr.step_loss({t: b})).backward()
        per_task.append(torch.cat([p.grad.reshape(-1) for p in shared]))
    assert torch.dot(per_task[0], per_task[1]) < 0, "the two tasks must conflict for this test"
    tr.step_gradients(batches)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    projected = project_conflicting(per_task, random.Random(3))
    assert torch.allclose(got, projected[0] + projected[1], atol=1e-6)
    assert not torch.allclose(got, per_task[0] + per_task[1], atol=1e-4)  # surgery happened
    for g in projected:  # after projection, neither conflicts with the other task's raw gradient
        assert all(torch.dot(g, h) >= -1e-6 for h in per_task)


def test_same_seed_same_run_and_training_changes_the_weights(tmp_path, tiny_cfg):
    cfg = tiny_cfg("train.max_steps=4")
    a = Trainer(cfg, tmp_path / "a")  # built and run one after the other: each seeds the global generators
    start = {k: v.detach().clone() for k, v in a.model.state_dict().items()}
    ra = a.run()
    b = Trainer(cfg, tmp_path / "b")
    rb = b.run()
    assert ra["best_dev"] == rb["best_dev"]
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k
    moved = [k for k, v in a.model.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("encoder.layers.") for k in moved) and any(k.startswith("heads.") for k in moved)


# What each preset in configs/techniques/ must switch on; a new preset needs an entry here.
PRESET_EFFECTS = {
    "bi_attention": lambda tr: tr.model.bi_head == "attention" and tr.model.shared_pair is not None
    and set(tr.model.pair_encoding.values()) >= {"bi"},
    "biased": lambda tr: isinstance(_schedule(tr), Biased) and _schedule(tr).weights["qqp"] == 1.7,
    "bregman": lambda tr: _names(tr) == ["bregman"],
    "llrd": lambda tr: _names(tr) == ["llrd"] and len(set(tr.learning_rates().values())) > 2,
    "lora": lambda tr: _names(tr) == ["lora"] and "lora" in tr.model.extensions,
    "lora_experts": lambda tr: _names(tr) == ["lora_experts"] and "lora_experts" in tr.model.extensions,
    "pcgrad": lambda tr: _combiner(tr) == "pcgrad" and isinstance(_schedule(tr), Interleaved),
    "pcgrad_simcse": lambda tr: _combiner(tr) is not None and tr.cfg.pretrain.enabled
    and tr.cfg.pretrain.objectives == ["simcse_sup"] and (tr.out / "pretrain" / "best").exists(),
    "plateau": lambda tr: _names(tr) == ["plateau"],
    "sbert_cnn_bilstm": lambda tr: [type(p).__name__ for p in tr.model.pooler.parts] == ["MeanPool", "CNNPool", "BiLSTMPool"]
    and set(tr.model.pair_encoding.values()) >= {"cross+cos"},
    "simcse": lambda tr: tr.cfg.pretrain.objectives == ["simcse_unsup", "simcse_sup", "mnrl"]
    and (tr.out / "pretrain" / "best").exists(),
    "smart": lambda tr: _names(tr) == ["smart"],
    "smart_combo": lambda tr: _names(tr) == ["smart"] and isinstance(_schedule(tr), Interleaved),
    "tsa": lambda tr: _names(tr) == ["uda"] and tr.active_techniques["uda"].weight == 0
    and tr.active_techniques["uda"].tsa == "linear",
    "uda": lambda tr: _names(tr) == ["uda"] and tr.active_techniques["uda"].weight > 0 and "sts_bins" in tr.model.tasks,
}


def _names(tr) -> list[str]:
    return list(tr.active_techniques)


def _combiner(tr) -> str | None:
    """The name of the run's gradient combiner (at most one), or None."""
    return next((name for name, t in tr.active_techniques.items() if isinstance(t, GradientCombiner)), None)


def _schedule(tr):
    """The task schedule the run's config builds (the trainer builds it so)."""
    return build_schedule(tr.cfg.train.schedule, **tr.cfg.train.schedule_args)


PRESETS = sorted(p.stem for p in Path("configs/techniques").glob("*.yaml"))


def test_every_preset_has_an_expected_effect():
    assert sorted(PRESET_EFFECTS) == PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_switches_on_what_it_names_and_runs(tmp_path, preset):
    cfg = load_config(f"configs/techniques/{preset}.yaml",
                      [f"model.tiny={TINY}", "data.limit=24", "train.max_steps=2", "train.progress=false",
                       "train.eval_every=null", "data.batch_size=8", "pretrain.max_steps=2"])
    tr = Trainer(cfg, tmp_path / "r")
    assert PRESET_EFFECTS[preset](tr), f"preset {preset} does not switch on what it names"
    assert tr.run()["steps"] == 2


# task_loss hooks add their terms to the loss they are given: so their order in the YAML does not
# matter. One spec per technique that overrides task_loss (the registry-wide check below fails
# for a new one that is missing here).
ADDITIVE_SPECS = {
    "smart": "{smart: {weight: 1.0, epsilon: 1.0e-2, step_size: 1.0e-2}}",
    "bregman": "{bregman: {mu: 1.0, beta: 0.5}}",
    "uda": "{uda: {weight: 1.0, beta: 0.0, tsa: exp}}",
}


def test_every_loss_hook_is_listed_for_the_order_check():
    from mtbert.training.techniques import TECHNIQUES, Technique
    overriding = {name for name, cls in TECHNIQUES.items()
                  if isinstance(cls, type) and cls.task_loss is not Technique.task_loss}
    assert overriding - {"distill"} <= set(ADDITIVE_SPECS), overriding  # (distill: its own test, it needs a teacher)


@pytest.mark.parametrize("name", sorted(ADDITIVE_SPECS))
def test_a_loss_hook_adds_to_the_loss_it_is_given(tmp_path, tiny_cfg, name):
    """hook(L + c) == hook(L) + c: what earlier techniques added passes through unchanged, so any
    YAML order of techniques gives the same total loss (the order contract of Technique.task_loss)."""
    tr = Trainer(tiny_cfg(*NO_DROPOUT, f"techniques={ADDITIVE_SPECS[name]}"), tmp_path / "r")
    tech, ctx = tr.active_techniques[name], step_context(tr)
    batch = tr.next_batches(["sst"])["sst"]
    tr.model.eval()
    logits = tr.model("sst", batch["inputs"])
    base = tr.model.tasks["sst"].kind.loss(logits, batch["labels"])
    torch.manual_seed(0)
    a = tech.task_loss(ctx, "sst", batch, logits, base)
    torch.manual_seed(0)
    b = tech.task_loss(ctx, "sst", batch, logits, base + 5.0)
    assert float(b - a) == pytest.approx(5.0, abs=1e-5)
