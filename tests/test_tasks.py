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


def test_an_output_kind_parses_its_own_label_block(monkeypatch):
    """Adding a kind is one class that reads its `label:` block (core/kinds.py), registered by name:
    task definitions use it without an edit of core/tasks.py."""
    from mtbert.core.errors import ConfigError
    from mtbert.core.kinds import OUTPUT_KINDS, Classification
    from mtbert.core.tasks import task_from_definition

    class Ordinal(Classification):
        name = "ordinal"
        label_keys = Classification.label_keys | {"levels"}

        @classmethod
        def from_label(cls, label, names, rng, fail):
            if not label.get("levels"):
                fail("an ordinal label needs `levels`")
            return cls(), int(label["levels"])

    monkeypatch.setitem(OUTPUT_KINDS, "ordinal", Ordinal)
    base = {"files": {"dev": "x.csv"}, "text": "t"}
    spec = task_from_definition("o", {**base, "label": {"column": "y", "kind": "ordinal", "levels": 4}})
    assert isinstance(spec.kind, Ordinal) and spec.num_labels == 4
    with pytest.raises(ConfigError, match="an ordinal label needs `levels`"):
        task_from_definition("o", {**base, "label": {"column": "y", "kind": "ordinal"}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['levels'\] for a binary label"):
        task_from_definition("o", {**base, "label": {"column": "y", "kind": "binary", "levels": 4}})
    with pytest.raises(ConfigError, match="label.kind must be one of"):
        task_from_definition("o", {**base, "label": {"column": "y", "kind": "nope"}})
    spec = task_from_definition("o", {**base, "label": {"column": "y", "kind": "binned", "range": [0, 5],
                                                        "bins": 11}})
    assert spec.num_labels == 11 and spec.kind.step == 0.5
    with pytest.raises(ConfigError, match="needs `range"):
        task_from_definition("o", {**base, "label": {"column": "y", "kind": "binned", "bins": 3}})
