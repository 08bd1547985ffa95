"""Device, precision, threads, seeding and random-generator state."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

from mtbert.core.errors import ConfigError
from mtbert.core.hardware import Capabilities, detect

log = logging.getLogger("mtbert")


MPS_FALLBACK_NOTICE = "MPS cannot run {op} (a layer mtbert uses): using the CPU instead"


def select_device(name: str = "auto", caps: Capabilities | None = None) -> torch.device:
    """auto (CUDA if there is one, else Apple's MPS where it runs our layers, else CPU), cpu, cuda,
    cuda:N or mps; a ValueError for any other name or a device this machine does not have."""
    caps = caps or detect()
    if name == "auto":
        if caps.cuda:
            return torch.device("cuda")
        if caps.mps:
            missing = mps_missing_op()
            if missing is None:
                return torch.device("mps")
            log.warning(MPS_FALLBACK_NOTICE.format(op=missing))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not caps.cuda:
            raise ConfigError(f"device {name} requested but no CUDA device is available: use auto or cpu")
        if device.index is not None and device.index >= len(caps.cuda):
            raise ConfigError(f"device {name} requested but this machine has {len(caps.cuda)} CUDA device(s)")
    elif device.type == "mps" and not caps.mps:
        raise ConfigError(f"device {name} requested but MPS is not available: use auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


@functools.lru_cache(maxsize=1)
def mps_missing_op() -> str | None:
    """The first operation of our encoder that MPS cannot run (None if it runs them all): a tiny
    attention, layer norm, GELU, embedding and log-softmax on the device, as one forward and backward."""
    try:
        x = torch.randn(2, 3, 8, device="mps", requires_grad=True)
        steps = {"scaled_dot_product_attention": lambda t: F.scaled_dot_product_attention(t, t, t),
                 "layer_norm": lambda t: F.layer_norm(t, (8,)), "gelu": F.gelu,
                 "embedding": lambda t: t + F.embedding(torch.zeros(2, 3, dtype=torch.long, device="mps"),
                                                        torch.ones(4, 8, device="mps")),
                 "log_softmax": lambda t: F.log_softmax(t, dim=-1)}
        for op, f in steps.items():
            try:
                f(x).sum().backward()
            except (RuntimeError, NotImplementedError):
                return op
    except (RuntimeError, NotImplementedError):
        return "tensors"
    return None


# ---------------------------------------------------------------- precision
# A precision is used only where the hardware computes it natively (core.hardware): emulated bf16
# is slower than fp32 (39x on an AVX2 CPU), so `auto` never picks it and an explicit request for it
# is refused with the alternatives, never run slowly in silence.

TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}  # int8: quantised weights
INT8_TOLERANCE = 0.005  # int8 inference is `auto` only where the run's check kept its score within this of fp32


def native_precisions(device: torch.device, caps: Capabilities | None = None, inference: bool = False) -> list[str]:
    """The precisions `device` computes natively (int8 only for inference, on CPU)."""
    caps = caps or detect()
    if device.type == "cuda":
        gpu = caps.cuda_device(device.index)
        return ["fp32", "fp16"] + (["bf16"] if gpu is not None and gpu.native_bf16 else [])
    if device.type == "cpu":
        return (["fp32"] + (["int8"] if inference and caps.cpu_int8 else [])
                + (["bf16"] if caps.cpu_native_bf16 else []))
    return ["fp32", "bf16"]  # mps: autocast (expected, not measured; fp16 training would need CUDA's loss scaler)


def auto_precision(device: torch.device, caps: Capabilities | None = None) -> tuple[str, str]:
    """(precision, why) that training's `auto` picks on `device`: bf16 where computed natively,
    fp16 with loss scaling on a CUDA GPU without native bf16, fp32 elsewhere."""
    caps = caps or detect()
    if device.type == "cuda":
        gpu = caps.cuda_device(device.index)
        cc = ".".join(map(str, gpu.capability)) if gpu else "?"
        if gpu is not None and gpu.native_bf16:
            return "bf16", f"CUDA compute capability {cc} >= 8.0 computes bf16 natively"
        return "fp16", f"CUDA compute capability {cc} < 8.0 only emulates bf16: fp16 with loss scaling"
    if device.type == "cpu":
        return ("bf16" if caps.cpu_native_bf16 else "fp32"), caps.cpu_bf16_reason()
    return "fp32", f"{device.type}: fp32 (low precision there is not measured)"


def _why_not(precision: str, device: torch.device, caps: Capabilities) -> str:
    if precision == "fp16":
        return "fp16 autocast (with its loss scaler) needs a CUDA device"
    if precision == "int8":
        return ("int8 (dynamic quantisation of the linear layers) runs on CPU only" if device.type != "cpu"
                else "this torch has no quantised CPU engine for int8")
    if precision == "bf16" and device.type == "cpu":
        return caps.cpu_bf16_reason()
    if precision == "bf16" and device.type == "cuda":
        return auto_precision(device, caps)[1]
    return f"{precision} is not supported on {device.type}"


def resolve_precision(precision: str, device: torch.device, caps: Capabilities | None = None) -> torch.dtype | None:
    """Training's autocast dtype (None = fp32) for `precision` on `device`: `auto` is
    auto_precision's choice; a precision the hardware only emulates is a ValueError naming auto and
    fp32."""
    if precision not in TRAINING_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(TRAINING_PRECISIONS)}, got {precision!r}")
    caps = caps or detect()
    if precision == "auto":
        return AMP_DTYPES[auto_precision(device, caps)[0]]
    if precision not in native_precisions(device, caps):
        raise ConfigError(f"precision {precision} cannot run natively here: {_why_not(precision, device, caps)}; "
                         f"use auto (picks {auto_precision(device, caps)[0]} here) or fp32")
    return AMP_DTYPES[precision]


def auto_inference_precision(device: torch.device, int8_passed: bool = False,
                             caps: Capabilities | None = None) -> tuple[str, str]:
    """(precision, why) that inference's `auto` picks: the fastest accuracy-preserving path. bf16
    where native (training's rule); else on CPU int8 where the run's own check (int8_passed) kept its
    dev score within INT8_TOLERANCE of fp32; else training's choice (fp32 on CPU)."""
    caps = caps or detect()
    choice, why = auto_precision(device, caps)
    if device.type == "cpu" and choice == "fp32" and caps.cpu_int8:
        if int8_passed:
            return "int8", f"{why}; the run's int8 check kept dev within {INT8_TOLERANCE} of fp32"
        return "fp32", f"{why}; int8 only for runs whose int8 check passed"
    return choice, why


def resolve_inference_precision(precision: str, device: torch.device, int8_passed: bool = False,
                                caps: Capabilities | None = None) -> str:
    """The concrete precision (fp32, bf16, fp16 or int8) that inference on `device` runs
    (auto: auto_inference_precision). A precision the hardware cannot run raises a ValueError
    naming those it can."""
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    caps = caps or detect()
    if precision == "auto":
        return auto_inference_precision(device, int8_passed, caps)[0]
    here = native_precisions(device, caps, inference=True)
    if precision not in here:
        raise ConfigError(f"precision {precision} cannot run here: {_why_not(precision, device, caps)}; "
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
