"""The int8 check (inference/int8_check.py): the trainer scores best/ in int8 and fp32 at the end
and stores it; inference's `auto` on a CPU without native bf16 picks int8 only for a model whose
own, current check passed (every member's, for an ensemble)."""
from __future__ import annotations

import json

import pytest

from mtbert.core.runtime import INT8_TOLERANCE
from mtbert.inference import int8_check
from mtbert.inference.ensemble import build_ensemble
from mtbert.inference.loading import load_predictor
from tests.conftest import train_tiny_run

AVX2 = {"avx2", "fma", "f16c"}


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory, synthetic_data_dir):
    return train_tiny_run(tmp_path_factory.mktemp("int8") / "run", synthetic_data_dir, "train.max_steps=3")


def _set_passed(checkpoint, passed: bool) -> None:
    path = checkpoint / int8_check.CHECK_FILE
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "passed": passed}))


def test_training_ends_with_a_consistent_check_beside_the_weights(checked_run):
    record = json.loads((checked_run / "best" / int8_check.CHECK_FILE).read_text())
    meta = json.loads((checked_run / "best" / "meta.json").read_text())
    summary = json.loads((checked_run / "summary.json").read_text())
    assert record["step"] == meta["step"] and record["tolerance"] == INT8_TOLERANCE
    assert record["delta"] == pytest.approx(record["int8_score"] - record["fp32_score"])
    assert record["passed"] is (record["int8_score"] >= record["fp32_score"] - INT8_TOLERANCE)
    # trained in fp32 on CPU (tests/tiny.yaml): the fp32 score is the one training logged for best/
    assert record["fp32_score"] == pytest.approx(meta["dev"]["overall"])
    assert summary["int8_check"]["passed"] is record["passed"]


def test_auto_is_int8_on_an_avx2_cpu_only_where_the_check_passed(checked_run, machine, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(checked_run, run)
    machine(cpu_flags=AVX2, aten_isa="AVX2")
    _set_passed(run / "best", True)
    assert load_predictor(run, device="cpu").precision == "int8"
    _set_passed(run / "best", False)
    assert load_predictor(run, device="cpu").precision == "fp32"
    _set_passed(run / "best", True)
    meta = json.loads((run / "best" / "meta.json").read_text())
    (run / "best" / "meta.json").write_text(json.dumps({**meta, "step": meta["step"] + 1}))  # a stale check
    assert load_predictor(run, device="cpu").precision == "fp32"
    (run / "best" / "meta.json").write_text(json.dumps(meta))
    (run / "best" / int8_check.CHECK_FILE).unlink()  # a run trained before the check existed
    assert load_predictor(run, device="cpu").precision == "fp32"
    machine(cpu_flags=AVX2 | {"avx512f", "amx_bf16"}, aten_isa="AVX512")
    assert load_predictor(run, device="cpu").precision == "bf16"  # native bf16 stays first


def test_an_ensemble_is_int8_only_if_every_member_passed(checked_run, machine, tmp_path, synthetic_data_dir):
    import shutil
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(checked_run, a)
    shutil.copytree(checked_run, b)
    _set_passed(a / "best", True)
    _set_passed(b / "best", True)
    machine(cpu_flags=AVX2, aten_isa="AVX2")
    build_ensemble([a, b], tmp_path / "ens", synthetic_data_dir, device="cpu", precision="fp32")
    assert load_predictor(tmp_path / "ens", device="cpu").precision == "int8"
    _set_passed(b / "best", False)
    assert load_predictor(tmp_path / "ens", device="cpu").precision == "fp32"
