"""Opening a run directory, checkpoint or ensemble directory as a predictor."""
from __future__ import annotations

from pathlib import Path

import torch

from mtbert.core.errors import CheckpointError, ConfigError
from mtbert.core.runtime import resolve_inference_precision, select_device
from mtbert.core.tasks import overall_scorer
from mtbert.inference import int8_check
from mtbert.inference.ensemble import is_ensemble_dir, load_ensemble, member_checkpoints
from mtbert.inference.predictor import BasePredictor, Predictor, for_precision
from mtbert.modeling.checkpoint import find_checkpoint, load_checkpoint


def load_predictor(path: str | Path, device="auto", precision: str = "auto", batch_size: int = 128) -> BasePredictor:
    """A Predictor for a run directory or checkpoint, an EnsemblePredictor for an ensemble directory.
    `precision`: auto | fp32 | bf16 | fp16 | int8, resolved for this device by
    core.runtime.resolve_inference_precision (a precision the hardware cannot run is a ValueError);
    auto is int8 only where the model's own int8 check passed (every member's, for an ensemble)."""
    if not isinstance(batch_size, int) or batch_size < 1:  # 0 would score nothing; negatives slice wrongly
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    device = select_device(device) if isinstance(device, str) else torch.device(device)
    precision = resolve_inference_precision(precision, device, int8_passed=int8_check_passed(path))
    if is_ensemble_dir(path):
        ensemble = load_ensemble(path, device, precision, batch_size)
        ensemble.precision = precision
        return ensemble
    model, tok, cfg, meta = load_checkpoint(path, device=str(device))
    if not model.tasks:  # nothing to predict: a contrastive pre-training stage
        raise CheckpointError(f"{path} has no task heads (a pre-training stage?): fine-tune it with "
                              f"model.backbone={path}, then predict with that run")
    model, amp = for_precision(model, precision, device)
    predictor = Predictor(model, tok, device, amp, batch_size, name=str(find_checkpoint(path)),
                          data_dir=cfg.data.data_dir, meta=meta)
    predictor.precision = precision
    predictor.scorer = overall_scorer(cfg.data.overall, cfg.data.overall_weights)
    return predictor


def int8_check_passed(path: str | Path) -> bool:
    """Whether the int8 check of the checkpoint at `path` passed, or of every member of an ensemble."""
    if is_ensemble_dir(path):
        members = member_checkpoints(path)
        return bool(members) and all(int8_check.passed(m) for m in members)
    checkpoint = find_checkpoint(path, required=False)
    return checkpoint is not None and int8_check.passed(checkpoint)
