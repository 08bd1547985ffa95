import random

import pytest
import torch

from mtbert.core.kinds import BINARY, CLASSIFICATION, REGRESSION
from mtbert.training.optimizer import (
    Updater,
    adamw,
    parameter_groups,
    warmup_linear_decay,
)
from mtbert.training.techniques import TECHNIQUES, build_techniques
from mtbert.training.techniques.bregman import ema_update
from mtbert.training.techniques.llrd import layer_depth
from mtbert.training.techniques.pcgrad import project_conflicting
from mtbert.training.techniques.smart import Smart, project_to_ball
from mtbert.training.trainer import Trainer
from tests.conftest import step_context

# ---------------------------------------------------------------- PCGrad

def test_pcgrad_matches_hand_computation():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])   # g1·g2 = -1 < 0
    p1, p2 = project_conflicting([g1, g2], random.Random(0))
    # g1 - (g1·g2/|g2|²) g2 = [1,0] + 0.5[-1,1] = [0.5, 0.5];  g2 - (g2·g1/|g1|²) g1 = [0, 1]
    assert torch.allclose(p1, torch.tensor([0.5, 0.5]))
    assert torch.allclose(p2, torch.tensor([0.0, 1.0]))


def test_pcgrad_two_tasks_become_orthogonal_or_stay_untouched():
    torch.manual_seed(0)
    for trial in range(20):
        g = [torch.randn(50), torch.randn(50)]
        p = project_conflicting(g, random.Random(trial))
        if torch.dot(g[0], g[1]) < 0:
            assert abs(torch.dot(p[0], g[1])) < 1e-4 and abs(torch.dot(p[1], g[0])) < 1e-4
            assert torch.dot(p[0], p[1]) >= -1e-4
        else:
            assert torch.equal(p[0], g[0]) and torch.equal(p[1], g[1])


def test_pcgrad_projected_pairs_of_conflicting_tasks_stop_conflicting():
    grads = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0]), torch.tensor([0.0, -1.0, 1.0])]
    projected = project_conflicting(grads, random.Random(3))
    for i in range(3):
        for j in range(3):
            if i != j and torch.dot(grads[i], grads[j]) < 0:
                assert torch.dot(projected[i], grads[j]) >= -1e-6


# ---------------------------------------------------------------- SMART

@pytest.mark.parametrize("norm", ["inf", "2"])
def test_smart_perturbation_stays_in_epsilon_ball(norm):
    torch.manual_seed(0)
    smart = Smart(epsilon=1e-2, step_size=0.5, steps=3, noise_std=1.0, norm=norm)
    lin = torch.nn.Linear(8, 5)
    embeds = [torch.randn(4, 6, 8)]
    clean = lin(embeds[0]).mean(1)
    deltas = smart.perturbation(lambda e: lin(e[0]).mean(1), embeds, clean, CLASSIFICATION.divergence)
    d = deltas[0]
    if norm == "inf":
        assert d.abs().max() <= 1e-2 + 1e-7
    else:
        assert (d.reshape(4, -1).norm(dim=1) <= 1e-2 + 1e-6).all()
    assert d.abs().max() > 0


def test_projection_to_ball():
    d = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(project_to_ball(d, 1.0, "2"), torch.tensor([[0.6, 0.8]]))
    assert torch.allclose(project_to_ball(d, 1.0, "inf"), torch.tensor([[1.0, 1.0]]))


def test_symmetric_kl_matches_formula():
    p_logits, q_logits = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 1.0, 1.0]])
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    expected = (p * (p / q).log()).sum() + (q * (q / p).log()).sum()
    assert CLASSIFICATION.divergence(p_logits, q_logits).item() == pytest.approx(expected.item(), rel=1e-5)
    a, b = torch.tensor([0.3]), torch.tensor([-1.0])
    pa, pb = torch.sigmoid(a), torch.sigmoid(b)
    bern = (pa * (pa / pb).log() + (1 - pa) * ((1 - pa) / (1 - pb)).log()
            + pb * (pb / pa).log() + (1 - pb) * ((1 - pb) / (1 - pa)).log())
    assert BINARY.divergence(a, b).item() == pytest.approx(bern.item(), rel=1e-5)
    assert REGRESSION.divergence(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])).item() == 0.5
    assert CLASSIFICATION.divergence(p_logits, p_logits).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- Bregman

def test_ema_update_formula():
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    s0, t0 = student.weight.detach().clone(), teacher.weight.detach().clone()
    ema_update(teacher, student, beta=0.75)
    assert torch.allclose(teacher.weight, 0.25 * s0 + 0.75 * t0)


def test_bregman_penalty_is_mu_times_divergence_to_teacher(tmp_path, tiny_cfg):
    tr = Trainer(tiny_cfg("techniques={bregman: {mu: 2.0, beta: 0.5}}"), tmp_path / "r")
    breg = tr.active_techniques["bregman"]
    batch = tr.next_batches(["sst"])["sst"]
    tr.model.eval()
    logits = tr.model("sst", batch["inputs"]) + 0.3  # differ from the (identical) teacher
    loss = breg.task_loss(step_context(tr), "sst", batch, logits, torch.tensor(1.0))
    target = breg.teacher("sst", batch["inputs"])
    assert loss.item() == pytest.approx(1.0 + 2.0 * CLASSIFICATION.divergence(logits, target).item(), rel=1e-5)
    assert breg.beta(5, 10) == 0.5


# ---------------------------------------------------------------- learning rates

def test_layerwise_decay_lrs(tmp_path, tiny_cfg):
    tr = Trainer(tiny_cfg("techniques={llrd: {decay: 0.5}}", "train.lr=1.0", "train.warmup_ratio=0"), tmp_path / "r")
    lr_of = tr.learning_rates()
    # 2 layers: pooler depth 3 -> 1.0, layer 1 -> 0.5, layer 0 -> 0.25, embeddings -> 0.125
    assert lr_of["encoder.pooler.weight"] == pytest.approx(1.0)
    assert lr_of["encoder.layers.1.ffn.up.weight"] == pytest.approx(0.5)
    assert lr_of["encoder.layers.0.attention.qkv.bias"] == pytest.approx(0.25)
    assert lr_of["encoder.embeddings.word.weight"] == pytest.approx(0.125)
    assert lr_of["heads.sst.proj.weight"] == pytest.approx(1.0)  # heads keep the full rate
    assert layer_depth("layers.11.ffn.up.weight", 12) == 12


def test_plateau_halves_lr(tiny_encoder):
    plateau = build_techniques({"plateau": {"patience": 2}})[0]
    # what the trainer does with each evaluation's factor (Updater.scale_lr), on groups as it builds them
    model = torch.nn.ModuleDict({"encoder": tiny_encoder, "head": torch.nn.Linear(32, 2)})
    optimizer = adamw(parameter_groups(model, 1e-3, 2e-3), 1e-3, 0.01)
    updater = Updater(optimizer, warmup_linear_decay(optimizer, 0, 10), None, None, model.parameters)
    base = list(updater.scheduler.base_lrs)
    factors = [plateau.on_eval(score, 0.0) for score in (0.5, 0.4, 0.45)]
    assert factors == [1.0, 1.0, 0.5]  # the second evaluation without improvement halves
    for f in factors:
        updater.scale_lr(f)
    assert updater.scheduler.base_lrs == [b * 0.5 for b in base]
    by_loss = build_techniques({"plateau": {"monitor": "train_loss", "patience": 1}})[0]
    assert [by_loss.on_eval(0.0, loss) for loss in (1.0, 0.8, 0.9)] == [1.0, 1.0, 0.5]


# ---------------------------------------------------------------- registry and smoke runs

def test_unknown_technique_and_option():
    with pytest.raises(ValueError, match="unknown technique"):
        build_techniques({"dropconnect": {}})
    with pytest.raises(ValueError, match="unknown options"):
        build_techniques({"smart": {"lambda": 1}})
    assert build_techniques({"smart": {"enabled": False}}) == []


@pytest.mark.parametrize("spec", [
    "{pcgrad: {}}",
    "{smart: {weight: 1.0, steps: 1}}",
    "{bregman: {mu: 1.0, beta: 0.75}}",
    "{llrd: {decay: 0.9}, plateau: {}}",
    "{smart: {weight: 1.0}, pcgrad: {}, bregman: {}}",
])
def test_technique_smoke_runs(tmp_path, tiny_cfg, spec):
    summary = Trainer(tiny_cfg(f"techniques={spec}", "train.max_steps=3"), tmp_path / "r").run()
    assert summary["steps"] == 3 and "overall" in summary["best_dev"]


def test_pcgrad_single_task_step_equals_plain_training(tmp_path, tiny_cfg):
    a = Trainer(tiny_cfg("train.max_steps=1", "data.tasks=[sst]", "techniques={pcgrad: {}}"), tmp_path / "a")
    a.run()
    b = Trainer(tiny_cfg("train.max_steps=1", "data.tasks=[sst]"), tmp_path / "b")
    b.run()
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_pcgrad_backward_sets_projected_sum_on_shared_parameters(tmp_path, tiny_cfg):
    tr = Trainer(tiny_cfg("techniques={pcgrad: {seed: 5}}", "model.dropout=0",
                          "model.tiny={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
                          "intermediate_size: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"),
                 tmp_path / "r")
    batches = tr.next_batches(["sst", "sts"])
    shared = [p for p in tr.model.encoder.parameters()]
    flat = []
    for t, b in batches.items():
        tr.model.zero_grad()
        tr.step_loss({t: b})[t].backward()
        flat.append(torch.cat([p.grad.reshape(-1) for p in shared]))
    expected = sum(project_conflicting(flat, random.Random(5)))
    tr.step_gradients(batches)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, expected, atol=1e-6)
    assert tr.model.heads["sst"].proj.weight.grad is not None


def test_all_issue_techniques_registered():
    assert {"pcgrad", "smart", "bregman", "llrd", "plateau"} <= set(TECHNIQUES)



def test_techniques_command_lists_everything(capsys):
    from mtbert.apps.cli import main
    assert main(["techniques"]) == 0
    out = capsys.readouterr().out
    for name in ["pcgrad", "smart", "bregman", "llrd", "plateau", "biased", "annealed", "uncertainty", "awl",
                 "cross+cos", "bi_head=attention", "bilstm", "shared_pair_layer"]:
        assert name in out


# ---------------------------------------------------------------- each technique's own mathematics

def test_smart_adds_weight_times_divergence_at_a_fixed_perturbation(tmp_path, tiny_cfg, monkeypatch):
    """With the ascent replaced by a fixed δ, SMART's loss is L + λ · D(f(x + δ), f(x)), the
    perturbed pass without dropout (dropout_off)."""
    tr = Trainer(tiny_cfg("techniques={smart: {weight: 2.5}}", "data.tasks=[sst]"), tmp_path / "r")
    smart = tr.active_techniques["smart"]
    batch = tr.next_batches(["sst"])["sst"]
    gen = torch.Generator().manual_seed(0)
    embeds = [tr.model.encoder.embeddings.word(x["input_ids"]).detach() for x in batch["inputs"]]
    deltas = [torch.randn(e.shape, generator=gen) * 0.05 for e in embeds]
    monkeypatch.setattr(Smart, "perturbation", lambda self, *args, **kwargs: deltas)
    tr.model.train()
    logits = tr.model("sst", batch["inputs"])
    loss = smart.task_loss(step_context(tr), "sst", batch, logits, torch.tensor(1.0))
    assert tr.model.training  # dropout back on after the perturbed passes
    tr.model.eval()
    adv = tr.model("sst", batch["inputs"], inputs_embeds=[e + d for e, d in zip(embeds, deltas)])
    expected = 1.0 + 2.5 * CLASSIFICATION.divergence(adv, logits).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5) and loss.item() > 1.0 + 1e-6


def test_bregman_with_mu_zero_trains_exactly_as_plain_training(tmp_path, tiny_cfg):
    a = Trainer(tiny_cfg("train.max_steps=2", "techniques={bregman: {mu: 0.0}}"), tmp_path / "a")
    a.run()
    b = Trainer(tiny_cfg("train.max_steps=2"), tmp_path / "b")
    b.run()
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n
