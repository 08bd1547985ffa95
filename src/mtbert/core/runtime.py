"""Device, precision, threads, seeding and random-generator state."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random

import numpy as np
import torch


def select_device(name: str = "auto") -> torch.device:
    """auto (CUDA if there is one, else CPU), cpu, cuda, cuda:N or mps; a ValueError for any other
    name or a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name} requested but MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """None = full fp32. 'auto' uses bf16 (or fp16 where bf16 is unsupported) on CUDA, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"precision must be auto|fp32|bf16|fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast is for CUDA; use bf16 on CPU")
    return table[precision]


# ---------------------------------------------------------------- inference precision
# Training keeps resolve_precision above (its `auto` is fp32 on CPU: tests and golden numbers rely
# on it). Inference resolves separately: `auto` is the fastest precision this hardware runs natively,
# and a precision it cannot run is an error, never a silent fallback to something slower.

INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}  # int8: quantised weights


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX tiles), as torch detects it.
    Without either, oneDNN emulates bf16 matmuls and they are slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def cpu_has_int8() -> bool:
    """Whether torch has a quantised engine (x86/fbgemm, onednn or qnnpack) for int8 linear layers."""
    return any(e != "none" for e in torch.backends.quantized.supported_engines)


def inference_precisions(device: torch.device) -> list[str]:
    """The precisions that `device` runs natively, fastest-preferred last."""
    if device.type == "cuda":
        return ["fp32", "fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    if device.type == "cpu":
        return ["fp32"] + (["int8"] if cpu_has_int8() else []) + (["bf16"] if cpu_has_native_bf16() else [])
    return ["fp32", "bf16"]  # mps: autocast as in training


def _why_not(precision: str, device: torch.device) -> str:
    if precision == "fp16":
        return "fp16 autocast needs a CUDA device"
    if precision == "int8":
        return ("int8 (dynamic quantisation of the linear layers) runs on CPU only" if device.type != "cpu"
                else "this torch has no quantised CPU engine for int8")
    if precision == "bf16" and device.type == "cpu":
        return "bf16 needs a CPU with AVX-512 BF16 or AMX (this one has neither, so it would be slower than fp32)"
    return f"{precision} is not supported on {device.type}"


def resolve_inference_precision(precision: str, device: torch.device) -> str:
    """The concrete precision (fp32, bf16, fp16 or int8) that inference on `device` runs.

    auto: bf16 on a CPU with native bf16 (AVX-512 BF16 or AMX) and on CUDA (fp16 where CUDA lacks
    bf16), fp32 elsewhere. int8 stays opt-in: it changes the numbers more than bf16 does. A
    precision the hardware cannot run raises a ValueError naming those it can."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    here = inference_precisions(device)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if "bf16" in here else "fp16"
        return "bf16" if device.type == "cpu" and "bf16" in here else "fp32"
    if precision not in here:
        raise ValueError(f"precision {precision} cannot run here: {_why_not(precision, device)}; "
                         f"use {', '.join(['auto'] + here)} on {device.type}")
    return precision


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resident_memory_mb() -> dict[str, float]:
    """This process's resident memory now (rss_mb) and its peak so far (peak_rss_mb), in MB, from
    Linux's /proc/self/status; empty elsewhere."""
    keys = {"VmRSS:": "rss_mb", "VmHWM:": "peak_rss_mb"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in keys:  # "VmRSS:   123456 kB"
                    out[keys[parts[0]]] = round(int(parts[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return {}
    return out


# torch's CPU kernels for bf16 matmuls (oneDNN, behind torch's ideep layer) keep one compiled kernel
# per input shape in two caches of 1,024 entries each, about 0.4 MB an entry. Length-bucketed
# training batches bring ever-new shapes, so the caches filled through make train's first epoch:
# about 500 MB of live memory that looked like a leak (RESULTS.md, training memory;
# pytorch/pytorch#27971). ideep's cache only saves rebuilding a descriptor, so training switches it
# off; oneDNN's saves recompiling a kernel (without it a step took twice as long), so it stays,
# smaller. Inference keeps both: ideep's cache saves about a millisecond on a server's small call.
KERNEL_CACHE_LIMITS = {"LRU_CACHE_CAPACITY": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}


def bound_kernel_caches() -> None:
    """Cap torch's per-shape CPU kernel caches (KERNEL_CACHE_LIMITS) unless the environment already
    sets them. Both libraries read the variables when they first run a kernel, so this must come
    before the process's first matmul: the Trainer calls it first."""
    for name, value in KERNEL_CACHE_LIMITS.items():
        os.environ.setdefault(name, value)


def _libc():
    try:
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def release_free_memory() -> bool:
    """Give the C allocator's free pages back to the system (glibc's malloc_trim; False where
    there is none). Tensors of ever-changing shapes (length-bucketed batches) leave freed blocks
    scattered through glibc's heaps, which it otherwise keeps: resident memory then grows with
    every new mix of shapes although nothing is alive in it (RESULTS.md, training memory)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def allocator_memory_mb() -> dict[str, float]:
    """What the C allocator holds, in MB, from glibc's mallinfo2 (glibc >= 2.33; empty elsewhere):
    live_mb, the blocks in use (heap and mmapped: tensors, kernel caches, Python objects), and
    heap_free_mb, freed heap blocks it keeps (resident or not). Tells live memory from
    fragmentation, which the resident set alone cannot."""
    mallinfo2 = getattr(_LIBC, "mallinfo2", None)
    if mallinfo2 is None:
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"live_mb": round((info.uordblks + info.hblkhd) / 2**20, 1),
            "heap_free_mb": round(info.fordblks / 2**20, 1)}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def rng_state() -> dict:
    """Every global random generator's state (Python, NumPy, torch CPU and CUDA), in types that
    torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
