"""`mtbert env`: what it reports on pretended machines (the `machine` fixture), and on this one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtbert.apps.cli import main
from mtbert.apps.env import environment, format_environment
from mtbert.core import hardware

AVX2 = {"avx2", "fma", "f16c"}
AVX512_BF16 = AVX2 | {"avx512f", "avx512_vnni", "avx512_bf16"}
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}
REPO = Path(__file__).resolve().parents[1]


def test_avx2_cpu_reports_bf16_emulated_and_trains_in_fp32(machine):
    env = environment(machine(cpu_flags=AVX2, aten_isa="AVX2"))
    assert env["cpu"]["flags"] == {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False, "vnni": False}
    assert env["cpu"]["native_bf16"] is False and env["cpu"]["isa_class"] == "AVX2"
    auto = env["auto"]
    assert (auto["device"], auto["training_precision"]) == ("cpu", "fp32")
    assert "neither AVX-512 BF16 nor AMX" in auto["training_reason"]
    # inference: int8 only where the run's own check passed
    assert (auto["inference_precision"], auto["inference_precision_int8_passed"]) == ("fp32", "int8")
    assert "int8 for runs whose int8 check passed, else fp32" in format_environment(env)


def test_amx_cpu_reports_native_bf16(machine):
    env = environment(machine(cpu_flags=AMX, aten_isa="AVX512"))
    assert env["cpu"]["flags"]["amx"] and env["cpu"]["flags"]["vnni"]
    assert env["cpu"]["native_bf16"] is True and env["cpu"]["isa_class"] == "AVX-512 BF16/AMX"
    auto = env["auto"]
    chosen = {auto["training_precision"], auto["inference_precision"], auto["inference_precision_int8_passed"]}
    assert chosen == {"bf16"}
    assert "natively" in auto["training_reason"]


def test_capped_cpu_reports_bf16_not_native(machine):
    """The CPU has AVX-512 BF16 but ATEN_CPU_CAPABILITY makes torch compute as on AVX2."""
    env = environment(machine(cpu_flags=AVX512_BF16, aten_isa="AVX2"))
    assert env["cpu"]["flags"]["avx512_bf16"] is True
    assert env["cpu"]["native_bf16"] is False
    assert env["auto"]["training_precision"] == "fp32"
    assert "leaves them out" in env["auto"]["training_reason"]


def test_isa_caps_come_from_the_environment(machine, monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    env = environment(machine(cpu_flags=AVX512_BF16, aten_isa="AVX512", onednn_max_isa="AVX2"))
    assert env["cpu"]["isa_caps"] == {"aten_cpu_capability": None, "onednn_max_cpu_isa": "AVX2",
                                      "mkl_enable_instructions": "AVX2"}
    assert env["cpu"]["native_bf16"] is False
    lines = format_environment(env).splitlines()
    assert any(line.startswith("- ATEN_CPU_CAPABILITY:") and line.endswith(" none") for line in lines)
    assert any(line.startswith("- MKL_ENABLE_INSTRUCTIONS:") and line.endswith(" AVX2") for line in lines)


@pytest.mark.parametrize("capability, precision", [((7, 5), "fp16"), ((8, 0), "bf16")])
def test_cuda_gpu_trains_in_its_native_precision(machine, capability, precision):
    env = environment(machine(cpu_flags=AVX2, aten_isa="AVX2", cuda_capability=capability))
    assert env["cuda"][0]["capability"] == ".".join(map(str, capability))
    assert env["auto"]["device"] == "cuda"
    assert env["auto"]["training_precision"] == env["auto"]["inference_precision"] == precision
    assert f"compute capability {'.'.join(map(str, capability))}" in env["auto"]["training_reason"]


def test_mps_is_the_auto_device_where_it_runs_our_layers(machine, monkeypatch):
    monkeypatch.setattr("mtbert.core.runtime.mps_missing_op", lambda: None)
    env = environment(machine(cpu_flags=AVX2, aten_isa="AVX2", mps=True))
    assert env["mps"] is True and env["auto"]["device"] == "mps"
    assert "- MPS available:" in format_environment(env)


def test_mps_that_lacks_a_layer_falls_back_to_cpu(machine, monkeypatch):
    monkeypatch.setattr("mtbert.core.runtime.mps_missing_op", lambda: "gelu")
    env = environment(machine(cpu_flags=AVX2, aten_isa="AVX2", mps=True))
    assert env["auto"]["device"] == "cpu" and "MPS is available but" in env["auto"]["device_reason"]


def test_cli_json_has_the_grouped_keys(machine, capsys):
    machine(cpu_flags=AMX, aten_isa="AVX512", cuda_capability=(8, 0))
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert set(env) == {"mtbert", "python", "platform", "torch", "cpu", "cuda", "mps", "auto"}
    assert {"device", "training_precision", "training_reason", "inference_precision",
            "inference_reason"} <= set(env["auto"])
    assert {"version", "build", "threads", "quantized_engines"} <= set(env["torch"])
    assert env["cuda"] == [{"name": "mocked GPU", "capability": "8.0", "memory_gb": 0.0, "native_bf16": True}]
    assert env["auto"]["device"] == "cuda" and env["auto"]["training_precision"] == "bf16"


def test_cli_text_has_a_line_per_cuda_device(machine, capsys):
    machine(cpu_flags=AVX2, aten_isa="AVX2", cuda_capability=(7, 5))
    assert main(["env"]) == 0
    gpu_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- CUDA device")]
    assert len(gpu_lines) == 1 and "compute capability 7.5" in gpu_lines[0]


def test_text_lists_every_cuda_device():
    caps = hardware.Capabilities(cuda=(hardware.CudaDevice("A100", (8, 0), 80.0),
                                       hardware.CudaDevice("T4", (7, 5), 15.0)))
    lines = format_environment(environment(caps)).splitlines()
    gpu_lines = [line for line in lines if line.startswith("- CUDA device")]
    assert len(gpu_lines) == 2
    assert "A100, compute capability 8.0, 80.0 GiB" in gpu_lines[0]
    assert "T4, compute capability 7.5, 15.0 GiB" in gpu_lines[1]
    assert not any(line.startswith("- CUDA devices:") for line in lines)


def test_text_is_aligned(machine):
    text = format_environment(environment(machine(cpu_flags=AVX2, aten_isa="AVX2")))
    value_columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in text.splitlines()}
    assert len(value_columns) == 1


def test_env_json_runs_on_this_machine():
    """Unmocked, in its own process: `python -m mtbert env --json` reports torch's real instruction set."""
    done = subprocess.run([sys.executable, "-m", "mtbert", "env", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    assert env["cpu"]["aten_isa"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch"]["version"] == torch.__version__
