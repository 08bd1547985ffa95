"""What this machine computes natively: the facts behind `device: auto` and `precision: auto`.

A precision is chosen only where the hardware runs it natively. bf16 on a CPU without AVX-512 BF16
or AMX is emulated by oneDNN and measured 39x slower than fp32 (RESULTS.md, hardware); bf16 on a
CUDA GPU below compute capability 8.0 is emulated too. `Capabilities` holds what decides this, read
once by `detect()`; tests build their own to cover hardware this machine does not have.

The CPU's own flags are not enough: the instruction-set caps that torch's libraries honour
(ATEN_CPU_CAPABILITY for ATen, ONEDNN_MAX_CPU_ISA for oneDNN's matmuls) make an AVX-512 machine
compute as an AVX2 one, so native bf16 also requires that neither cap rules it out. A capped run
then tells the truth about `auto` (torch.cpu._is_avx512_bf16_supported reads the CPUID and ignores them).
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) at or above the first with native bf16 (AVX512_CORE_BF16).
ONEDNN_BF16_ISAS = frozenset({
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT",
})
# The CPU flags worth reporting, as Linux names them in /proc/cpuinfo.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8")
CUDA_NATIVE_BF16 = (8, 0)  # Ampere and later compute bf16 in their tensor cores


@dataclass(frozen=True)
class CudaDevice:
    name: str
    capability: tuple[int, int]
    memory_gb: float = 0.0

    @property
    def native_bf16(self) -> bool:
        return tuple(self.capability) >= CUDA_NATIVE_BF16


@dataclass(frozen=True)
class Capabilities:
    """What decides `auto`: the CPU (model, flags, torch's instruction set and the caps in force),
    the CUDA devices and MPS."""
    cpu_model: str = "unknown"
    cpu_flags: frozenset = frozenset()
    aten_isa: str = "DEFAULT"                  # torch.backends.cpu.get_cpu_capability(), caps applied
    onednn_max_isa: str | None = None          # ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA), if set
    cores: int = 1
    quantized_engines: tuple = ()
    cuda: tuple = ()                           # CudaDevice per visible GPU
    mps: bool = False
    torch_version: str = torch.__version__
    torch_cuda: str | None = None              # the CUDA version torch was built for, None on a CPU build

    # ------------------------------------------------------------------ CPU
    @property
    def cpu_isa_class(self) -> str:
        """A short name for the CPU class that RESULTS.md tables use."""
        if self.cpu_native_bf16:
            return "AVX-512 BF16/AMX"
        if self.aten_isa.upper().startswith("AVX512"):
            return "AVX-512 (no BF16)"
        if self.aten_isa.upper() == "AVX2":
            return "AVX2"
        return self.aten_isa

    @property
    def cpu_native_bf16(self) -> bool:
        """bf16 matmuls run natively: the CPU has AVX-512 BF16 or AMX, and no instruction-set cap
        in force takes them away."""
        has = bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)
        aten_ok = self.aten_isa.upper().startswith("AVX512")
        onednn_ok = self.onednn_max_isa is None or self.onednn_max_isa.upper() in ONEDNN_BF16_ISAS
        return has and aten_ok and onednn_ok

    @property
    def cpu_int8(self) -> bool:
        return any(e != "none" for e in self.quantized_engines)

    def cpu_bf16_reason(self) -> str:
        if self.cpu_native_bf16:
            flags = [f for f in ("avx512_bf16", "amx_bf16") if f in self.cpu_flags]
            return f"the CPU computes bf16 natively ({', '.join(flags)})"
        if not {"avx512_bf16", "amx_bf16"} & self.cpu_flags:
            return "the CPU has neither AVX-512 BF16 nor AMX: bf16 would be emulated, far slower than fp32"
        cap = (f"torch's instruction set {self.aten_isa} (ATEN_CPU_CAPABILITY)"
               if not self.aten_isa.upper().startswith("AVX512") else f"ONEDNN_MAX_CPU_ISA={self.onednn_max_isa}")
        return f"the CPU has bf16 instructions, but {cap} leaves them out: bf16 would be emulated"

    # ------------------------------------------------------------------ CUDA
    def cuda_device(self, index: int | None = None) -> CudaDevice | None:
        i = index or 0
        return self.cuda[i] if i < len(self.cuda) else None


def _cpuinfo() -> tuple[str, frozenset]:
    """The CPU model and its flags: Linux's /proc/cpuinfo, else what torch's probes say."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if not flags:  # macOS, Windows: torch's CPUID probes (x86 only)
        probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                  "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
                  "avx512_vnni": "_is_vnni_supported"}
        for flag, probe in probes.items():
            try:
                if getattr(torch.cpu, probe)():
                    flags.add(flag)
            except (AttributeError, RuntimeError):
                pass
        if "amx_tile" in flags:
            flags.add("amx_bf16")  # every AMX CPU so far has the bf16 tiles
    return model or platform.processor() or platform.machine() or "unknown", frozenset(flags)


def _cuda_devices() -> tuple:
    if not torch.cuda.is_available():
        return ()
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(CudaDevice(props.name, (props.major, props.minor), round(props.total_memory / 2**30, 1)))
    return tuple(out)


def _mps() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@functools.lru_cache(maxsize=1)
def detect() -> Capabilities:
    """This machine's capabilities (read once per process)."""
    model, flags = _cpuinfo()
    return Capabilities(
        cpu_model=model, cpu_flags=flags, aten_isa=torch.backends.cpu.get_cpu_capability(),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        cores=os.cpu_count() or 1, quantized_engines=tuple(torch.backends.quantized.supported_engines),
        cuda=_cuda_devices(), mps=_mps(), torch_version=torch.__version__, torch_cuda=torch.version.cuda)
