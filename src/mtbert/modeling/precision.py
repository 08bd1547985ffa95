"""Low-precision copies of a model for CPU inference: bf16 encoder weights, int8 linear layers.

bf16 (CPUs with AVX-512 BF16 or AMX): the encoder's weights are cast to bf16 once, so its matmuls
run on the bf16 units without the per-call weight and activation casts of autocast (1.5x faster
than autocast on MiniLM, SST dev, see bench/inference.py). Its output is cast back to fp32, so the
pooler and the task heads run in fp32 as trained: regression scores and decision thresholds keep
full resolution. LayerNorm, softmax and GELU take bf16 inputs and accumulate in fp32 inside torch's
CPU kernels.

int8: dynamic quantisation of the encoder's linear layers. Weights are stored as int8 with one
scale per output channel (per-tensor scales moved MiniLM's QQP logits about 1.4x more for the same
speed); each call quantises its activations on the fly (one scale per batch), multiplies in int8
with int32 accumulation (fbgemm / oneDNN VNNI kernels) and returns fp32. Only the encoder's plain
nn.Linear layers (Q/K/V, attention output, feed-forward, pooler) are converted: they hold nearly all
the FLOPs; the task heads, embeddings, LayerNorm, softmax and GELU stay fp32. ONNX Runtime's
`quantize_dynamic` does the same with per-tensor weight scales (bench/inference.py compares the
two). Source: PyTorch's eager dynamic quantisation, torch.ao.quantization.quantize_dynamic
(https://pytorch.org/docs/stable/quantization.html).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

# torch.ao.quantization announces its move to torchao (a DeprecationWarning); its eager API still
# ships with torch 2.x, and torchao is not a dependency.
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic


def _outputs_to_fp32(module, args, out: dict) -> dict:
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}


def encoder_to_bf16(model: nn.Module) -> nn.Module:
    """Cast, in place, `model.encoder` to bf16 with its outputs returned as fp32 (inference only).
    Returns the model."""
    model.encoder.to(torch.bfloat16)
    model.encoder.register_forward_hook(_outputs_to_fp32)
    return model.eval()


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.Linear inside `model.encoder` by its dynamically quantised int8
    version (inference only: the result has no gradients). Returns the model."""
    with warnings.catch_warnings():  # the deprecation notices of torch.ao and of quantised tensors
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        model.encoder = quantize_dynamic(model.encoder.eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                         dtype=torch.qint8)
    return model.eval()
