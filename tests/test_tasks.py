import numpy as np
import pytest
import torch

from mtbert.core.tasks import TASKS, accuracy, get_task, overall_score, pearson


def test_accuracy_and_pearson():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    y = np.array([2.0, 1.0, 4.0, 3.0])
    expected = np.sum((x - x.mean()) * (y - y.mean())) / np.sqrt(np.sum((x - x.mean()) ** 2) * np.sum((y - y.mean()) ** 2))
    assert pearson(x, y) == pytest.approx(expected)
    assert pearson(np.ones(4), x) == 0.0
    with pytest.raises(ValueError):
        accuracy([], [])


def test_overall_score_formula():
    assert overall_score({"sst": 0.5, "qqp": 0.8, "sts": 0.8}) == pytest.approx((0.5 + 0.8 + 0.9) / 3)


def test_registry_and_labels():
    assert {"sst", "qqp", "sts", "cfimdb"} <= set(TASKS)
    assert get_task("sst").parse_label("4") == 4
    assert get_task("qqp").parse_label("1.0") == 1
    assert get_task("sts").parse_label("3.2") == pytest.approx(3.2)
    for task, bad in [("sst", "5"), ("sst", "2.5"), ("qqp", "-1"), ("sts", "5.5"), ("sts", "nan")]:
        with pytest.raises(ValueError):
            get_task(task).parse_label(bad)
    with pytest.raises(KeyError, match="unknown task"):
        get_task("mnli")


def test_losses_and_predictions_per_kind():
    sst, qqp, sts = get_task("sst"), get_task("qqp"), get_task("sts")
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0]])
    assert sst.kind.predict(logits).tolist() == [1]
    assert sst.kind.loss(logits, torch.tensor([1])).item() == pytest.approx(-torch.log_softmax(logits, -1)[0, 1].item())
    assert qqp.kind.predict(torch.tensor([[0.3], [-0.2]])).tolist() == [1, 0]
    assert sts.kind.loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0])).item() == pytest.approx(1.0)
