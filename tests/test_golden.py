"""Results are unchanged by refactoring: tiny runs with several schedules, weightings, pair
encodings and techniques reproduce, to the last digit, the dev metrics that the code before the
layered redesign gave (tests/golden/pre_redesign_tiny.json says how they were made). They use
torch's per-tensor AdamW, as that code did: the fused kernel (the default since) rounds differently,
and test_optimizer checks that the two agree."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtbert.core.config import load_config
from mtbert.training.trainer import Trainer

pytestmark = pytest.mark.real_data  # the pre-redesign numbers were made on the real data

GOLDEN = json.loads((Path(__file__).parent / "golden" / "pre_redesign_tiny.json").read_text())["runs"]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_tiny_run_reproduces_the_pre_redesign_metrics(tmp_path, name, data_dir):
    run = GOLDEN[name]
    cfg = load_config(Path(__file__).parent / "tiny.yaml", run["overrides"] + ["train.progress=false", "train.fused_optimizer=false"])
    got = Trainer(cfg, tmp_path / name).run()["best_dev"]
    assert got.keys() == run["best_dev"].keys()
    for task, value in run["best_dev"].items():
        assert got[task] == pytest.approx(value, abs=1e-12), task
