"""`mtbert env`: what this machine is and what mtbert will do on it, for bug reports.

The answer to most "why is it slow / why did it pick fp32" reports lies in the CPU's instruction
sets, the caps in force on them, the torch build and what `device: auto` and `precision: auto`
resolve to here (core.hardware, core.runtime). `environment()` gathers these as a JSON-able dict
(`mtbert env --json`); `format_environment()` writes them as the aligned "- key: value" list that
`accelerate env` and `python -m torch.utils.collect_env` users know.
"""
from __future__ import annotations

import os
import platform

import torch

from mtbert import __version__
from mtbert.core import hardware
from mtbert.core.runtime import auto_inference_precision, auto_precision, select_device

# The CPU features that decide mtbert's speed: (JSON key, label, /proc/cpuinfo flags any one of which has it).
CPU_FEATURES = (
    ("avx2", "AVX2", {"avx2"}),
    ("avx512", "AVX-512", {"avx512f"}),
    ("avx512_bf16", "AVX-512 BF16", {"avx512_bf16"}),
    ("amx", "AMX", {"amx_tile", "amx_bf16"}),
    ("vnni", "VNNI", {"avx512_vnni", "avx_vnni"}),
)
# The environment variables that cap the instruction sets torch's libraries use: an AVX-512 machine
# with one of them set computes as an older one, which explains many a "bf16 is not native" report.
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def environment(caps: hardware.Capabilities | None = None) -> dict:
    """This machine (or `caps`, a pretended one) and what `auto` picks on it, as a JSON-able dict."""
    caps = caps or hardware.detect()  # (module attribute: tests' `machine` fixture replaces it)
    return {
        "mtbert": __version__,
        "python": platform.python_version(),
        "platform": {"os": platform.platform(), "machine": platform.machine()},
        "torch": _torch_facts(caps),
        "cpu": _cpu_facts(caps),
        "cuda": [_cuda_facts(gpu) for gpu in caps.cuda],
        "mps": caps.mps,
        "auto": _auto_choices(caps),
    }


def _torch_facts(caps: hardware.Capabilities) -> dict:
    return {"version": caps.torch_version, "build": _torch_build(caps), "threads": torch.get_num_threads(),
            "quantized_engines": [e for e in caps.quantized_engines if e != "none"]}  # "none" is no engine


def _torch_build(caps: hardware.Capabilities) -> str:
    if caps.torch_cuda:
        return f"CUDA {caps.torch_cuda}"
    hip = getattr(torch.version, "hip", None)  # a ROCm build reports its GPUs through torch.cuda too
    return f"ROCm {hip}" if hip else "CPU-only"


def _cpu_facts(caps: hardware.Capabilities) -> dict:
    return {
        "model": caps.cpu_model,
        "logical_cores": caps.cores,
        "flags": {key: bool(flags & caps.cpu_flags) for key, _, flags in CPU_FEATURES},
        "aten_isa": caps.aten_isa,
        "isa_caps": _isa_caps(caps),
        "isa_class": caps.cpu_isa_class,
        "native_bf16": caps.cpu_native_bf16,
    }


def _isa_caps(caps: hardware.Capabilities) -> dict:
    """Each cap variable's value (None: unset). oneDNN's is the one detect() read, so that it also
    names DNNL_MAX_CPU_ISA, its older spelling, and a pretended machine's cap."""
    values = {name.lower(): os.environ.get(name) or None for name in ISA_CAP_VARIABLES}
    values["onednn_max_cpu_isa"] = caps.onednn_max_isa
    return values


def _cuda_facts(gpu: hardware.CudaDevice) -> dict:
    return {"name": gpu.name, "capability": ".".join(map(str, gpu.capability)), "memory_gb": gpu.memory_gb,
            "native_bf16": gpu.native_bf16}


def _auto_choices(caps: hardware.Capabilities) -> dict:
    """What `device: auto` and `precision: auto` resolve to, and why. Inference's auto also depends
    on the run (int8 only where its own int8 check passed), so both answers are given."""
    device = select_device("auto", caps)
    training, training_reason = auto_precision(device, caps)
    inference, inference_reason = auto_inference_precision(device, int8_passed=False, caps=caps)
    checked, _ = auto_inference_precision(device, int8_passed=True, caps=caps)
    return {"device": str(device), "device_reason": _device_reason(device, caps),
            "training_precision": training, "training_reason": training_reason,
            "inference_precision": inference, "inference_precision_int8_passed": checked,
            "inference_reason": inference_reason}


def _device_reason(device: torch.device, caps: hardware.Capabilities) -> str:
    if device.type == "cuda":
        return f"a CUDA device is visible ({caps.cuda[0].name})"
    if device.type == "mps":
        return "no CUDA device; MPS runs every layer mtbert uses"
    if caps.mps:  # select_device logged which layer MPS lacks
        return "no CUDA device; MPS is available but cannot run a layer mtbert uses (see the warning)"
    return "no CUDA or MPS device"


# ---------------------------------------------------------------- text

def format_environment(env: dict) -> str:
    """`env` (environment()'s dict) as an aligned "- key: value" list."""
    rows = _general_rows(env) + _cpu_rows(env["cpu"]) + _accelerator_rows(env) + _auto_rows(env["auto"])
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"- {label + ':':<{width}} {value}" for label, value in rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _general_rows(env: dict) -> list[tuple[str, str]]:
    t = env["torch"]
    return [("mtbert version", env["mtbert"]), ("Python version", env["python"]),
            ("Platform", f"{env['platform']['os']} ({env['platform']['machine']})"),
            ("torch version", t["version"]), ("torch build", t["build"]), ("torch threads", str(t["threads"])),
            ("Quantized engines", ", ".join(t["quantized_engines"]) or "none")]


def _cpu_rows(cpu: dict) -> list[tuple[str, str]]:
    rows = [("CPU", cpu["model"]), ("CPU logical cores", str(cpu["logical_cores"]))]
    rows += [(label, _yes(cpu["flags"][key])) for key, label, _ in CPU_FEATURES]
    rows.append(("torch instruction set", cpu["aten_isa"]))
    rows += [(name, cpu["isa_caps"][name.lower()] or "none") for name in ISA_CAP_VARIABLES]
    return rows + [("CPU class", cpu["isa_class"]), ("CPU native bf16", _yes(cpu["native_bf16"]))]


def _accelerator_rows(env: dict) -> list[tuple[str, str]]:
    rows = [(f"CUDA device {i}", f"{gpu['name']}, compute capability {gpu['capability']}, {gpu['memory_gb']} GiB")
            for i, gpu in enumerate(env["cuda"])]
    return (rows or [("CUDA devices", "none")]) + [("MPS available", _yes(env["mps"]))]


def _auto_rows(auto: dict) -> list[tuple[str, str]]:
    inference = auto["inference_precision"]
    if auto["inference_precision_int8_passed"] != inference:
        inference = f"{auto['inference_precision_int8_passed']} for runs whose int8 check passed, else {inference}"
    return [("auto device", f"{auto['device']} ({auto['device_reason']})"),
            ("auto training precision", f"{auto['training_precision']} ({auto['training_reason']})"),
            ("auto inference precision", f"{inference} ({auto['inference_reason']})")]
