"""Learning-rate techniques: layer-wise decay [papers 002, 004] and halving on plateau [004]."""
from __future__ import annotations

import re

from . import Technique, register


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for transformer layer i, num_layers + 1 for the pooler."""
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return 0 if name.startswith("embeddings.") else num_layers + 1


@register
class LayerwiseLRDecay(Technique):
    name = "llrd"
    summary = "layer-wise learning-rate decay: lr · decay^(distance from the top layer)"
    paper = "002, 004; Howard & Ruder 2018"

    def __init__(self, decay: float = 0.9):
        super().__init__()
        if not 0 < decay <= 1:
            raise ValueError("llrd.decay must be in (0, 1]")
        self.decay = decay

    def param_groups(self, trainer, groups):
        n = trainer.model.encoder.config.num_hidden_layers
        encoder_ids = {id(p) for p in trainer.model.encoder.parameters()}
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


@register
class PlateauHalving(Technique):
    """Multiply the learning rate by `factor` after `patience` evaluations without improvement of
    the monitored value: `dev` (dev selection score, higher is better) or `train_loss` (the summed
    mean task losses since the last evaluation, lower is better; paper 004 uses it, patience 3)."""
    name = "plateau"
    summary = "halve the learning rate when the dev score (or training loss) stops improving"
    paper = "004"

    def __init__(self, factor: float = 0.5, patience: int = 1, min_delta: float = 0.0, monitor: str = "dev"):
        super().__init__()
        if monitor not in ("dev", "train_loss"):
            raise ValueError("plateau.monitor must be 'dev' or 'train_loss'")
        self.factor, self.patience, self.min_delta, self.monitor = factor, patience, min_delta, monitor
        self.best, self.bad = float("-inf"), 0

    def on_eval(self, trainer, metrics):
        from ..train import selection_score
        score = selection_score(metrics) if self.monitor == "dev" else -trainer.last_train_loss
        if score > self.best + self.min_delta:
            self.best, self.bad = score, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            # LambdaLR multiplies base_lrs by the warm-up/decay factor, so scaling them scales the lr.
            trainer.scheduler.base_lrs = [lr * self.factor for lr in trainer.scheduler.base_lrs]
            self.bad = 0

    def state_dict(self):  # the lowered learning rates themselves live in the scheduler's state
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state):
        self.best, self.bad = state["best"], state["bad"]
