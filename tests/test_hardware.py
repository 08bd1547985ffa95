"""What `device: auto` and `precision: auto` pick on each class of hardware (the README's table
"What to expect on your hardware", one test per row), over mocked capabilities; and that the real
detection honours the instruction-set caps that torch's libraries honour."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mtbert.core import runtime
from mtbert.core.runtime import (
    auto_inference_precision,
    resolve_inference_precision,
    resolve_precision,
    select_device,
)
from mtbert.training.optimizer import Updater

pytestmark = pytest.mark.numerics

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AVX2 = {"avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512_vnni"}


def test_avx2_cpu_trains_and_infers_in_fp32_and_int8_only_after_a_passed_check(machine):
    machine(cpu_flags=AVX2, aten_isa="AVX2")
    assert select_device("auto") == CPU
    assert resolve_precision("auto", CPU) is None
    assert resolve_inference_precision("auto", CPU) == "fp32"
    assert resolve_inference_precision("auto", CPU, int8_passed=True) == "int8"
    with pytest.raises(ValueError) as e:  # emulated bf16: refused, naming what runs
        resolve_precision("bf16", CPU)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "neither AVX-512 BF16 nor AMX" in message
    assert message.endswith("use auto (picks fp32 here) or fp32")


@pytest.mark.parametrize("flags", [AVX512 | {"avx512_bf16"}, AVX512 | {"amx_tile", "amx_bf16"}])
def test_native_bf16_cpu_trains_and_infers_in_bf16(machine, flags):
    machine(cpu_flags=flags, aten_isa="AVX512")
    assert resolve_precision("auto", CPU) is torch.bfloat16
    assert resolve_inference_precision("auto", CPU) == "bf16"
    assert resolve_inference_precision("auto", CPU, int8_passed=True) == "bf16"  # bf16 is faster still
    assert resolve_precision("bf16", CPU) is torch.bfloat16


def test_avx512_cpu_without_bf16_is_fp32(machine):
    machine(cpu_flags=AVX512, aten_isa="AVX512")
    assert resolve_precision("auto", CPU) is None


@pytest.mark.parametrize("aten_isa, onednn, native", [
    ("AVX2", None, False),                  # ATEN_CPU_CAPABILITY=avx2
    ("AVX512", "AVX2", False),              # ONEDNN_MAX_CPU_ISA=AVX2
    ("AVX512", "avx512_core", False),       # AVX-512 without its bf16 instructions
    ("AVX512", "AVX512_CORE_BF16", True),
    ("AVX512", "AVX512_CORE_AMX", True),
])
def test_instruction_set_caps_decide_as_the_libraries_do(machine, aten_isa, onednn, native):
    caps = machine(cpu_flags=AVX512 | {"avx512_bf16", "amx_bf16"}, aten_isa=aten_isa, onednn_max_isa=onednn)
    assert caps.cpu_native_bf16 is native
    assert resolve_precision("auto", CPU) is (torch.bfloat16 if native else None)


def test_cuda_8_0_trains_in_bf16(machine):
    machine(cpu_flags=AVX2, aten_isa="AVX2", cuda_capability=(8, 0))
    assert select_device("auto") == CUDA
    assert resolve_precision("auto", CUDA) is torch.bfloat16
    assert resolve_inference_precision("auto", CUDA) == "bf16"


def test_cuda_below_8_0_trains_in_fp16_with_the_loss_scaler(machine, monkeypatch):
    machine(cpu_flags=AVX2, aten_isa="AVX2", cuda_capability=(7, 5))  # T4
    assert select_device("auto") == CUDA
    dtype = resolve_precision("auto", CUDA)
    assert dtype is torch.float16
    assert resolve_inference_precision("auto", CUDA) == "fp16"
    asked = []  # (torch disables a real GradScaler without CUDA: record what the Updater asks for)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda enabled: asked.append(enabled))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    Updater(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), dtype, None, lambda: [])
    assert asked == [True]
    with pytest.raises(ValueError, match=r"compute capability 7.5 < 8.0 only emulates bf16.*use auto \(picks fp16"):
        resolve_precision("bf16", CUDA)


def test_cuda_device_index_is_checked_against_the_devices_there_are(machine):
    machine(cuda_capability=(8, 6))
    assert resolve_precision("auto", torch.device("cuda:0")) is torch.bfloat16
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        select_device("cuda:1")


def test_mps_is_picked_after_cuda_and_trains_in_fp32(machine, monkeypatch):
    machine(cpu_flags=set(), aten_isa="DEFAULT", mps=True)
    monkeypatch.setattr(runtime, "mps_missing_op", lambda: None)
    assert select_device("auto") == torch.device("mps")
    assert resolve_precision("auto", torch.device("mps")) is None
    assert auto_inference_precision(torch.device("mps"))[0] == "fp32"
    machine(mps=True, cuda_capability=(9, 0))
    assert select_device("auto") == CUDA


def test_mps_that_cannot_run_a_layer_falls_back_to_cpu_with_one_line(machine, monkeypatch, caplog):
    machine(mps=True)
    monkeypatch.setattr(runtime, "mps_missing_op", lambda: "scaled_dot_product_attention")
    with caplog.at_level("WARNING", logger="mtbert"):
        assert select_device("auto") == CPU
    notices = [r.getMessage() for r in caplog.records]
    assert notices == ["MPS cannot run scaled_dot_product_attention (a layer mtbert uses): using the CPU instead"]


def test_a_device_this_machine_lacks_is_an_error(machine):
    machine()
    with pytest.raises(ValueError, match="no CUDA device is available: use auto or cpu"):
        select_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        select_device("mps")


def test_the_trainer_refuses_an_emulated_precision_before_touching_the_run(machine, tiny_cfg, tmp_path):
    machine(cpu_flags=AVX2, aten_isa="AVX2")
    from mtbert.training.trainer import Trainer
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")  # a finished run that --overwrite would replace
    with pytest.raises(ValueError, match="precision bf16 cannot run natively here"):
        Trainer(tiny_cfg("train.precision=bf16"), run, overwrite=True)
    assert (run / "summary.json").exists()


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="an AVX-512 CPU is needed to cap it to AVX2")
def test_real_detection_honours_the_avx2_caps():
    """torch.cpu._is_avx512_bf16_supported() reads the CPUID and ignores the caps; detect() must not."""
    probe = ("import json; from mtbert.core.hardware import detect; c = detect(); "
             "print(json.dumps([c.aten_isa, c.cpu_native_bf16]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    assert json.loads(out) == ["AVX2", False]
