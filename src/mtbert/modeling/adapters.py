"""Low-rank adapters (LoRA, Hu et al., 2021) as a structural change of the encoder, and the
registry of structural extensions a checkpoint can record.

A chosen Linear layer W0 of the encoder becomes y = W0 x + b + (α/r) · B A dropout(x), with A
(r × in) random and B (out × r) zero, so at initialisation the model is exactly the pre-trained
one. Routed adapters (paper 001's mixture of low-rank experts) hold one set per task; a forward of
task t uses only t's. The training technique that adds them is training.techniques.lora.

EXTENSIONS maps the name a model records in `model.extensions` to a function `(model, spec)` that
re-applies the change before a checkpoint's weights are loaded.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert.core.errors import ConfigError
from mtbert.core.registry import Registry

# Our names for the encoder's Linear layers -> their path inside each encoder layer.
TARGETS = {"qkv": "attention.qkv", "out": "attention.out", "up": "ffn.up", "down": "ffn.down"}
SHARED = "shared"  # the adapter name of plain `lora`


class LoRALinear(nn.Linear):
    """An nn.Linear plus low-rank adapters, one (A, B) pair per adapter name.

    Subclasses nn.Linear and keeps the base's `weight` / `bias` parameters under their own names,
    so state-dict keys and name-based rules (no weight decay, llrd depths) do not change.
    """

    def __init__(self, base: nn.Linear, adapters: list[str], rank: int, alpha: float, dropout: float,
                 routed: bool):
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse the base's parameters, allocate none
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scaling, self.routed = rank, alpha / rank, routed
        self.active: str | None = None  # set around MultitaskModel.forward when routed (see _route)
        self.lora_dropout = nn.Dropout(dropout)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in adapters:
            a = torch.empty(rank, self.in_features, **kw)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT (and nn.Linear's own default init)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, **kw))

    def forward(self, x):
        name = self.active if self.routed else SHARED
        if name is None:
            raise RuntimeError("lora_experts: the encoder ran outside MultitaskModel.forward(task, ...), "
                               "so no task's adapters are selected")
        if name not in self.lora_A:
            raise KeyError(f"no LoRA adapters for task {name!r}; have {list(self.lora_A)}")
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A[name]), self.lora_B[name])
        return F.linear(x, self.weight, self.bias) + self.scaling * delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}, adapters={list(self.lora_A)}"


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


# Routing: module-level functions that act on the model torch passes in, so the hooks hold no
# references and survive deepcopy (bregman's teacher) and pickling unchanged.
def _route(model, args, kwargs):
    task = args[0] if args else kwargs["task"]
    for m in lora_layers(model.encoder):
        m.active = task


def _unroute(model, args, output):
    # Clear the task afterwards so a direct encoder call can never reuse a stale one.
    for m in lora_layers(model.encoder):
        m.active = None


LORA_SPEC = {"rank": int, "alpha": (int, float), "dropout": (int, float), "modules": list, "adapters": list,
             "routed": bool}


def check_lora_spec(spec) -> None:
    """A LoRA spec (as a checkpoint's model.json records it) of the right keys, types and ranges."""
    if not isinstance(spec, dict) or set(spec) != set(LORA_SPEC):
        raise ConfigError(f"a LoRA spec has exactly the keys {sorted(LORA_SPEC)}")
    for key, kind in LORA_SPEC.items():
        if not isinstance(spec[key], kind) or (kind is not bool and isinstance(spec[key], bool)):
            raise ConfigError(f"LoRA {key} must be {getattr(kind, '__name__', 'a number')}, got {spec[key]!r}")
    if not 1 <= spec["rank"] <= 4096 or not (math.isfinite(spec["alpha"]) and 0 < spec["alpha"] <= 1e6) \
            or not 0 <= spec["dropout"] < 1:
        raise ConfigError(f"LoRA rank must be in [1, 4096], alpha in (0, 1e6] and dropout in [0, 1): {spec}")
    if not spec["adapters"] or not all(isinstance(x, str) for x in spec["modules"] + spec["adapters"]):
        raise ConfigError("LoRA modules and adapters must be lists of names (adapters: at least one)")


def apply_lora(model, spec: dict) -> None:
    """Replace the encoder's target Linear layers by LoRALinear with `spec`'s adapters."""
    check_lora_spec(spec)
    unknown = sorted(set(spec["modules"]) - set(TARGETS))
    if unknown:
        raise ConfigError(f"lora.modules: unknown {unknown}; choose from {sorted(TARGETS)}")
    if lora_layers(model.encoder):
        raise ConfigError("the encoder already has LoRA adapters: enable only one of lora / lora_experts")
    for layer in model.encoder.layers:
        for key in spec["modules"]:
            parent_path, attr = TARGETS[key].rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), spec["adapters"], spec["rank"],
                                             spec["alpha"], spec["dropout"], spec["routed"]))
    if spec["routed"]:
        model.register_forward_pre_hook(_route, with_kwargs=True)
        model.register_forward_hook(_unroute, always_call=True)


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold shared adapters into plain Linear layers, W = W0 + (α/r) B A, e.g. to reuse a `lora`
    checkpoint's encoder as an ordinary backbone. Per-task experts have no single merged weight."""
    for path, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            if m.routed:
                raise ConfigError("lora_experts holds one encoder per task: it cannot be merged into one")
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                              device=m.weight.device, dtype=m.weight.dtype)
            plain.weight.copy_(m.weight + m.scaling * m.lora_B[SHARED] @ m.lora_A[SHARED])
            if m.bias is not None:
                plain.bias.copy_(m.bias)
            plain.requires_grad_(m.weight.requires_grad)
            parent_path, _, attr = path.rpartition(".")
            setattr(module.get_submodule(parent_path), attr, plain)
    return module



EXTENSIONS: Registry = Registry("checkpoint extension")
EXTENSIONS.register(apply_lora, name="lora")
EXTENSIONS.register(apply_lora, name="lora_experts")
