import math

import pytest
import torch

from mtbert.core.tasks import get_task
from mtbert.training.weightings import WEIGHTINGS, build_weighting

TASKS = [get_task("sst"), get_task("qqp"), get_task("sts")]
L = {"sst": torch.tensor(1.2), "qqp": torch.tensor(0.5), "sts": torch.tensor(2.0)}


def test_sum_with_fixed_weights():
    w = build_weighting("sum", TASKS, weights={"sts": 0.5})
    assert w(L).item() == pytest.approx(1.2 + 0.5 + 1.0)


def test_learnable_weights_are_positive_and_sum_to_task_count():
    w = build_weighting("learnable", TASKS)
    with torch.no_grad():
        w.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    soft = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0) * 3
    assert w(L).item() == pytest.approx(float(soft[0] * 1.2 + soft[1] * 0.5 + soft[2] * 2.0), rel=1e-6)
    assert sum(w.weights().values()) == pytest.approx(3.0)


def test_uncertainty_matches_kendall_formula():
    w = build_weighting("uncertainty", TASKS)
    s = torch.tensor([0.3, -0.2, 0.7])  # log sigma^2
    with torch.no_grad():
        w.log_var.copy_(s)
    sigma2 = s.exp()
    expected = (1 / sigma2[0] * 1.2 + torch.log(sigma2[0].sqrt())       # classification: L/σ² + log σ
                + 1 / sigma2[1] * 0.5 + torch.log(sigma2[1].sqrt())
                + 1 / (2 * sigma2[2]) * 2.0 + torch.log(sigma2[2].sqrt()))  # regression: L/(2σ²) + log σ
    assert w(L).item() == pytest.approx(expected.item(), rel=1e-6)


def test_uncertainty_optimum_is_at_sigma2_equal_loss():
    """d/ds [exp(-s) L + s/2] = 0  =>  exp(s) = 2L for classification."""
    w = build_weighting("uncertainty", TASKS)
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([math.log(2 * 1.2), 0.0, 0.0]))
    w({"sst": torch.tensor(1.2)}).backward()
    assert abs(w.log_var.grad[0].item()) < 1e-6


def test_awl_matches_formula_and_has_own_lr():
    w = build_weighting("awl", TASKS, lr=1e-4)
    c = torch.tensor([0.5, 1.0, 2.0])
    with torch.no_grad():
        w.c.copy_(c)
    expected = sum(0.5 / c[i] ** 2 * L[t] + torch.log(1 + c[i] ** 2) for i, t in enumerate(L))
    assert w(L).item() == pytest.approx(expected.item(), rel=1e-6)
    assert w.lr == 1e-4


def test_registry():
    assert {"sum", "learnable", "uncertainty", "awl"} <= set(WEIGHTINGS)
    with pytest.raises(ValueError, match="choose from"):
        build_weighting("nash", TASKS)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS.names()))
def test_every_weighting_is_additive_across_tasks_and_affine_in_each_loss(name):
    """The Weighting contract: w({a, b}) == w({a}) + w({b}), and each w({t: x}) = α_t x + β_t,
    at parameters away from their initial values (a weighting's own parameters may train)."""
    w = build_weighting(name, TASKS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in w.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    def value(losses) -> float:
        return float(torch.as_tensor(w(losses)).detach())

    both = value({"sst": L["sst"], "sts": L["sts"]})
    assert both == pytest.approx(value({"sst": L["sst"]}) + value({"sts": L["sts"]}), rel=1e-6)
    for task in L:
        f = [value({task: torch.tensor(x)}) for x in (0.0, 1.0, 3.0)]
        assert f[2] - f[1] == pytest.approx(2 * (f[1] - f[0]), rel=1e-5, abs=1e-6), (task, f)
