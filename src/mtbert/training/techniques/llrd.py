"""Layer-wise learning-rate decay [papers 002, 004; Howard & Ruder 2018]."""
from __future__ import annotations

import re

from mtbert.core.errors import ConfigError
from mtbert.training.techniques.base import TECHNIQUES, Technique


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings (and MPNet's relative-position bias, an input to every layer), i + 1 for
    transformer layer i, num_layers + 1 for the pooler."""
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return 0 if name.startswith(("embeddings.", "relative_bias.")) else num_layers + 1


@TECHNIQUES.register
class LayerwiseLRDecay(Technique):
    name = "llrd"
    summary = "layer-wise learning-rate decay: lr · decay^(distance from the top layer)"
    paper = "002, 004; Howard & Ruder 2018"

    def __init__(self, decay: float = 0.9):
        super().__init__()
        if not 0 < decay <= 1:
            raise ConfigError("llrd.decay must be in (0, 1]")
        self.decay = decay

    def param_groups(self, model, groups):
        n = model.encoder.config.num_hidden_layers
        encoder_ids = {id(p) for p in model.encoder.parameters()}
        out = []
        for g in groups:
            if not g["params"] or id(g["params"][0]) not in encoder_ids:
                out.append(g)
                continue
            by_depth: dict[int, dict] = {}
            for name, p in zip(g["names"], g["params"]):
                d = layer_depth(name, n)
                sub = by_depth.setdefault(d, {**g, "params": [], "names": [],
                                              "lr": g["lr"] * self.decay ** (n + 1 - d)})
                sub["params"].append(p)
                sub["names"].append(name)
            out.extend(by_depth[d] for d in sorted(by_depth))
        return out


