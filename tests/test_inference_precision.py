"""Inference precision: `auto` by hardware, the int8 and bf16 paths, the error for a precision the
hardware cannot run, and one resolution behind every entry point."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import mtbert
from mtbert.apps.cli import main
from mtbert.core.runtime import resolve_inference_precision, resolve_precision
from mtbert.inference.loading import load_predictor
from mtbert.inference.predictor import Predictor, for_precision, load_examples
from mtbert.modeling import precision as precision_module
from mtbert.modeling.checkpoint import build_model
from tests.conftest import TINY_YAML

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def bf16_cpu(machine):
    """Pretend this CPU has (True) or lacks (False) native bf16 (tests/conftest.py: machine)."""
    def set_native(avx512_bf16: bool, amx: bool = False, cuda_capability=None):
        flags = {"avx2", "avx512f"} | ({"avx512_bf16"} if avx512_bf16 else set()) | ({"amx_bf16"} if amx else set())
        machine(cpu_flags=flags, aten_isa="AVX512", cuda_capability=cuda_capability)
    return set_native


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_data_dir):
    out = tmp_path_factory.mktemp("precision") / "run"
    assert main(["train", "--config", str(TINY_YAML), "--out", str(out), "--data-dir", str(synthetic_data_dir),
                 "--set", "train.max_steps=2"]) == 0
    return out


# ---------------------------------------------------------------- resolution

@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(bf16_cpu, avx512_bf16, amx, expected):
    bf16_cpu(avx512_bf16, amx)
    assert resolve_inference_precision("auto", CPU) == expected
    assert resolve_inference_precision("fp32", CPU) == "fp32"
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if expected == "bf16" else None)  # training's rule


def test_auto_on_cuda_is_bf16_or_fp16(bf16_cpu):
    bf16_cpu(False, cuda_capability=(8, 0))
    assert resolve_inference_precision("auto", CUDA) == "bf16"
    bf16_cpu(False, cuda_capability=(7, 5))
    assert resolve_inference_precision("auto", CUDA) == "fp16"
    assert resolve_inference_precision("fp16", CUDA) == "fp16"


@pytest.mark.parametrize("precision, device, reason, alternatives", [
    ("bf16", CPU, "neither AVX-512 BF16 nor AMX", "use auto, fp32, int8 on cpu"),
    ("fp16", CPU, "needs a CUDA device", "use auto, fp32, int8 on cpu"),
    ("int8", CUDA, "CPU only", "use auto, fp32, fp16 on cuda"),
    ("bf16", CUDA, "compute capability 7.5 < 8.0 only emulates bf16", "use auto, fp32, fp16 on cuda"),
])
def test_a_precision_the_hardware_cannot_run_is_an_error_naming_the_alternatives(
        bf16_cpu, precision, device, reason, alternatives):
    bf16_cpu(False, cuda_capability=(7, 5))
    with pytest.raises(ValueError) as e:
        resolve_inference_precision(precision, device)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and f"precision {precision} cannot run here" in message
    assert reason in message and message.endswith(alternatives)


def test_an_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, int8, got 'fp8'"):
        resolve_inference_precision("fp8", CPU)


# ---------------------------------------------------------------- the low-precision paths

def tiny_predictions(tiny_cfg, data_dir, precision):
    torch.manual_seed(0)
    model, tok = build_model(tiny_cfg())
    model = copy.deepcopy(model).eval()
    model, amp = for_precision(model, precision, CPU)
    predictor = Predictor(model, tok, CPU, amp, batch_size=16)
    examples = load_examples(["sst", "sts"], data_dir, "dev", 48)
    return model, {t: predictor.predict(t, ex) for t, ex in examples.items()}


def test_int8_quantises_the_encoder_linears_and_stays_close_to_fp32(tiny_cfg, data_dir):
    _, ref = tiny_predictions(tiny_cfg, data_dir, "fp32")
    model, got = tiny_predictions(tiny_cfg, data_dir, "int8")
    quantised = [m for m in model.encoder.modules() if "quantized.dynamic" in type(m).__module__]
    assert quantised and not any(type(m) is torch.nn.Linear for m in model.encoder.modules())
    for t in ref:
        scale = np.abs(ref[t]["logits"]).max()
        diff = np.abs(got[t]["logits"] - ref[t]["logits"]).max()
        assert 0 < diff < 0.05 * scale, (t, diff, scale)  # changed (it is int8), but only a little
    assert (got["sst"]["pred"] == ref["sst"]["pred"]).mean() >= 0.9


def test_bf16_on_cpu_holds_bf16_encoder_weights_and_returns_fp32(tiny_cfg, data_dir):
    _, ref = tiny_predictions(tiny_cfg, data_dir, "fp32")
    model, got = tiny_predictions(tiny_cfg, data_dir, "bf16")
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.heads.parameters()} == {torch.float32}
    for t in ref:
        assert got[t]["logits"].dtype == np.float32
        np.testing.assert_allclose(got[t]["logits"], ref[t]["logits"], atol=0.05 * np.abs(ref[t]["logits"]).max())


needs_prepack = pytest.mark.skipif(not precision_module.can_prepack_bf16(),
                                   reason="this torch build or CPU has no oneDNN bf16 linear on prepacked weights")


@needs_prepack
@pytest.mark.parametrize("bias", [True, False])
def test_a_prepacked_linear_computes_what_the_bf16_linear_does(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias).to(torch.bfloat16)
    packed = precision_module.PrepackedLinear(layer)
    with torch.inference_mode():
        for shape in [(5, 48), (3, 7, 48), (1, 1, 48)]:
            x = torch.randn(*shape, dtype=torch.bfloat16)
            got, want = packed(x), layer(x)
            assert got.shape == want.shape and got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert "packed_weight" not in packed.state_dict()  # (an inference copy: never saved)


@needs_prepack
def test_bf16_prepacks_every_plain_encoder_linear_and_predicts_as_without(tiny_cfg, data_dir, monkeypatch):
    model, got = tiny_predictions(tiny_cfg, data_dir, "bf16")
    packed = [m for m in model.encoder.modules() if isinstance(m, precision_module.PrepackedLinear)]
    assert packed and not any(type(m) is torch.nn.Linear for m in model.encoder.modules())
    monkeypatch.setattr(precision_module, "_CAN_PREPACK", False)  # as where the kernel is missing
    plain_model, plain = tiny_predictions(tiny_cfg, data_dir, "bf16")
    assert not any(isinstance(m, precision_module.PrepackedLinear) for m in plain_model.encoder.modules())
    for t in plain:
        np.testing.assert_allclose(got[t]["logits"], plain[t]["logits"], atol=1e-2 * np.abs(plain[t]["logits"]).max())


# ---------------------------------------------------------------- every entry point

def test_mtbert_load_resolves_auto_by_the_cpu(run, bf16_cpu):
    bf16_cpu(True)
    model = mtbert.load(run, device="cpu")
    assert model.predictor.precision == "bf16"
    assert next(model.predictor.model.encoder.parameters()).dtype == torch.bfloat16
    bf16_cpu(False)
    assert load_predictor(run, device="cpu").precision == "fp32"
    with pytest.raises(ValueError, match="precision bf16 cannot run here"):
        mtbert.load(run, device="cpu", precision="bf16")


@pytest.mark.parametrize("command", [
    ["evaluate", "{run}"],
    ["predict", "{run}", "--out", "{tmp}/out"],
    ["report", "{run}", "--out", "{tmp}/report"],
    ["serve", "{run}", "--port", "0"],
    ["ensemble", "{run}", "--out", "{tmp}/ensemble"],
])
def test_every_entry_point_refuses_what_the_cpu_cannot_run(run, bf16_cpu, tmp_path, capsys, command):
    bf16_cpu(False)
    argv = [a.format(run=run, tmp=tmp_path) for a in command] + ["--device", "cpu", "--precision", "bf16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    error = err.splitlines()[-1]  # report logs its progress on stderr before it
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert "precision bf16 cannot run here" in error and error.endswith("use auto, fp32, int8 on cpu"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "report" / "index.html").exists()
