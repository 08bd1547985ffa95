"""Halving the learning rate on a plateau [paper 004]."""
from __future__ import annotations

from mtbert.core.errors import ConfigError
from mtbert.training.techniques.base import TECHNIQUES, Technique


@TECHNIQUES.register
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
            raise ConfigError("plateau.monitor must be 'dev' or 'train_loss'")
        self.factor, self.patience, self.min_delta, self.monitor = factor, patience, min_delta, monitor
        self.best, self.bad = float("-inf"), 0

    def on_eval(self, score, train_loss):
        value = score if self.monitor == "dev" else -train_loss
        if value > self.best + self.min_delta:
            self.best, self.bad = value, 0
            return 1.0
        self.bad += 1
        if self.bad >= self.patience:
            self.bad = 0
            return self.factor
        return 1.0

    def state_dict(self):  # the lowered learning rates themselves live in the scheduler's state
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state):
        self.best, self.bad = state["best"], state["bad"]
