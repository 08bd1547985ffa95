"""int8 inference: dynamic quantisation of the encoder's linear layers (CPU).

Weights are stored as int8 with one scale per output channel (per-tensor scales moved MiniLM's
logits about 1.4x more on QQP dev for the same speed); each call quantises its activations on the fly
(one scale per batch), multiplies in int8 with int32 accumulation (fbgemm / oneDNN VNNI kernels)
and returns fp32. Only the encoder's plain nn.Linear layers (Q/K/V, attention output, feed-forward,
pooler) are converted: they hold nearly all the FLOPs, while the small task heads keep fp32 so the
regression scores and decision thresholds move as little as possible. Embeddings, LayerNorm,
softmax and GELU stay fp32. The same scheme as ONNX Runtime's `quantize_dynamic` (bench/inference.py
compares the two). Source: PyTorch's eager dynamic quantisation, torch.ao.quantization.quantize_dynamic
(https://pytorch.org/docs/stable/quantization.html).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.Linear inside `model.encoder` by its dynamically quantised int8
    version (inference only: the result has no gradients). Returns the model."""
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the eager API still ships with torch 2.x
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        model.encoder = quantize_dynamic(model.encoder.eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                         dtype=torch.qint8)
    return model.eval()
