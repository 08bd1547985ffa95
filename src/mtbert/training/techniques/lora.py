"""LoRA [001; Hu et al., 2021] and paper 001's mixture of low-rank experts, as techniques.

The whole encoder (embeddings, LayerNorms and pooler included) is frozen; only the adapters
(modeling.adapters) and the task heads train. `lora` has one adapter set shared by every task;
`lora_experts` [001] has one set per task on the same frozen base.
"""
from __future__ import annotations

from mtbert.core.errors import ConfigError
from mtbert.modeling.adapters import SHARED, apply_lora
from mtbert.training.techniques.base import TECHNIQUES, Technique


@TECHNIQUES.register
class LoRA(Technique):
    name = "lora"
    summary = "LoRA: frozen encoder, trainable low-rank adapters W0 + (alpha/r) B A on its Linear layers"
    paper = "001; Hu et al. 2021"
    routed = False
    default_modules = ("qkv", "out", "up", "down")

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, modules: list | None = None):
        super().__init__()
        if int(rank) != rank or rank < 1:
            raise ConfigError(f"{self.name}.rank must be a positive integer")
        if alpha <= 0 or not 0 <= dropout < 1:
            raise ConfigError(f"{self.name}: alpha must be > 0 and dropout in [0, 1)")
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.modules = list(modules if modules is not None else self.default_modules)
        if not self.modules:
            raise ConfigError(f"{self.name}.modules is empty")

    def adapters(self, model) -> list[str]:
        return [SHARED]

    def prepare_model(self, model, finetune):
        if finetune != "full":
            # the trainer freezes the whole encoder for `frozen` after this hook: adapters included
            raise ConfigError(f"{self.name} freezes the base itself and trains adapters: "
                             f"leave model.finetune=full")
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        spec = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "modules": self.modules,
                "adapters": self.adapters(model), "routed": self.routed}
        apply_lora(model, spec)
        model.extensions[self.name] = spec  # re-applied on load by modeling.adapters.EXTENSIONS


@TECHNIQUES.register
class LoRAExperts(LoRA):
    name = "lora_experts"
    recomputable = False  # its adapters learn the task from hooks around the model's forward
    exports = ("onnx",)
    export_note = "a different encoder per task: only per-task graphs hold it"
    summary = "mixture of low-rank experts: one LoRA adapter set per task on a shared frozen encoder"
    paper = "001"
    routed = True
    default_modules = ("out", "up", "down")  # paper 001's attention_dense, interm_dense, out_dense

    def adapters(self, model) -> list[str]:
        return list(model.tasks)
