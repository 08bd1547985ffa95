"""The one optimizer module used by training and pre-training: parameter groups, warm-up and
decay, and the update step (clipping, and no LR step after an fp16 overflow)."""
from __future__ import annotations

import pytest
import torch

from mtbert.training.optimizer import (
    Updater,
    adamw,
    non_empty,
    parameter_groups,
    warmup_linear_decay,
)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.dense = torch.nn.Linear(3, 3)
        self.encoder.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 1)


def test_groups_split_encoder_heads_and_decay():
    groups = non_empty(parameter_groups(Tiny(), lr=1.0, head_lr=5.0))
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["dense.weight"]["lr"] == 1.0 and "weight_decay" not in by_name["dense.weight"]
    assert by_name["dense.bias"]["weight_decay"] == 0.0 and by_name["norm.weight"]["weight_decay"] == 0.0
    assert by_name["head.weight"]["lr"] == 5.0 and by_name["head.bias"]["weight_decay"] == 0.0


def test_fused_adamw_is_fused_and_matches_the_per_tensor_loop():
    torch.manual_seed(0)
    models = [Tiny(), Tiny()]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0].encoder.dense.weight.detach().clone()
    opts = [adamw(parameter_groups(m, lr=1e-2), 1e-2, 0.01, fused=f) for m, f in zip(models, (True, False))]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    x = torch.randn(8, 3)
    for _ in range(5):
        for m, opt in zip(models, opts):
            m.head(m.encoder.norm(m.encoder.dense(x))).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert (models[0].encoder.dense.weight - start).abs().max() > 1e-3  # (it did train)


def test_warmup_then_linear_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_linear_decay(opt, warmup_steps=2, total_steps=6)
    assert [round(f(s), 6) for f in sched.lr_lambdas for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]


class OverflowingScaler:
    """Stands in for GradScaler under fp16: every step overflows, so the scale is lowered."""
    def __init__(self):
        self.scale = 1024.0

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer):
        pass  # skipped: inf in the gradients

    def update(self):
        self.scale /= 2


def _updater(clip=None):
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=1.0)
    return p, Updater(opt, warmup_linear_decay(opt, 0, 10), None, clip, lambda: [p])


def test_lr_schedule_advances_only_on_steps_taken():
    p, up = _updater()
    p.grad = torch.ones(4)
    assert up.step() is True and up.scheduler.last_epoch == 1
    up.scaler = OverflowingScaler()
    p.grad = torch.ones(4)
    assert up.step() is False and up.scheduler.last_epoch == 1  # the overflow step left the schedule
    assert p.grad is None  # gradients are cleared either way


def test_clipping_and_lr_scaling():
    p, up = _updater(clip=1.0)
    p.grad = torch.full((4,), 10.0)
    before = p.detach().clone()
    up.step()
    assert (before - p).norm().item() == pytest.approx(1.0, rel=1e-5)  # clipped to norm 1, lr 1
    up.scale_lr(0.5)
    assert up.scheduler.base_lrs == [0.5]


def test_a_state_saved_by_the_per_tensor_loop_resumes_fused():
    model = Tiny()
    saved_by = adamw(parameter_groups(model, lr=1e-2), 1e-2, 0.01, fused=False)
    model.head(model.encoder.dense(torch.randn(4, 3))).sum().backward()
    saved_by.step()
    fused = adamw(parameter_groups(model, lr=1e-2), 1e-2, 0.01, fused=True)
    resumed = Updater(fused, torch.optim.lr_scheduler.LambdaLR(fused, lambda s: 1.0), None, None, model.parameters)
    resumed.load_state_dict({"optimizer": saved_by.state_dict(), "scheduler": resumed.scheduler.state_dict(),
                             "scaler": {}})
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    assert resumed.optimizer.state_dict()["state"].keys() == saved_by.state_dict()["state"].keys()
    resumed.optimizer.step()  # (the fused kernel runs on the restored moments)
