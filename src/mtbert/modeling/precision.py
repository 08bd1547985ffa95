"""Low-precision copies of a model for CPU inference: bf16 encoder weights, int8 linear layers.

bf16 (CPUs with AVX-512 BF16 or AMX): the encoder's weights are cast to bf16 once, so its matmuls
run on the bf16 units without the per-call weight and activation casts of autocast (1.5x faster
than autocast on MiniLM, SST dev, see bench/inference.py). Its output is cast back to fp32, so the
pooler and the task heads run in fp32 as trained: regression scores and decision thresholds keep
full resolution. LayerNorm, softmax and GELU take bf16 inputs and accumulate in fp32 inside torch's
CPU kernels.

Prepacked bf16 linear layers (PrepackedLinear): torch's eager nn.Linear hands oneDNN a plain
row-major weight on every call, which oneDNN reorders into its blocked (AMX / AVX-512 BF16) layout
each time; for the small passes of a server that reorder is a large part of the call. The bf16 copy
therefore reorders each encoder linear layer's weight once, at load, and calls oneDNN's linear on
the packed weight (torch.ops.mkldnn._linear_pointwise: what torch.compile's CPU freezing pass
emits). Same products, same fp32 accumulation: the outputs match nn.Linear's. Where this torch
build has no such kernel, the layers stay nn.Linear.

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


class PrepackedLinear(nn.Module):
    """An inference-only bf16 nn.Linear whose weight oneDNN reordered once into its own layout.
    Input [..., in_features] -> output [..., out_features], as nn.Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [N, in]: the kernel takes 2-D input
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 prepacked"


def can_prepack_bf16() -> bool:
    """Whether this torch build runs oneDNN's bf16 linear on prepacked weights here (it is private
    API: checked by running it once on a tiny layer against nn.Linear)."""
    global _CAN_PREPACK
    if _CAN_PREPACK is None:
        try:
            with torch.inference_mode():
                layer = nn.Linear(8, 4).to(torch.bfloat16)
                x = torch.randn(3, 8, dtype=torch.bfloat16)
                _CAN_PREPACK = bool(torch.backends.mkldnn.is_available() and torch.allclose(
                    PrepackedLinear(layer)(x).float(), layer(x).float(), atol=1e-2))
        except (AttributeError, RuntimeError):  # no such op in this build, or no bf16 kernel on this CPU
            _CAN_PREPACK = False
    return _CAN_PREPACK


_CAN_PREPACK: bool | None = None


def prepack_linear_layers(module: nn.Module) -> int:
    """Replace, in place, every plain nn.Linear inside `module` (bf16 weights) by a PrepackedLinear.
    Returns how many were replaced (0 where the kernel is missing)."""
    if not can_prepack_bf16():
        return 0
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]  # (exactly nn.Linear: a LoRA or quantised layer keeps its own)
    for parent, name, child in targets:
        setattr(parent, name, PrepackedLinear(child))
    return len(targets)


def encoder_to_bf16(model: nn.Module, prepack: bool = True) -> nn.Module:
    """Cast, in place, `model.encoder` to bf16 with its outputs returned as fp32, and with `prepack`
    its linear layers prepacked for oneDNN where this torch build can (inference only). Returns
    the model."""
    model.encoder.to(torch.bfloat16)
    if prepack:
        prepack_linear_layers(model.encoder)
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
