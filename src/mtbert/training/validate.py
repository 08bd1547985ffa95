"""validate_run(cfg): the one place that checks a run before anything is built or written.

Pure: it reads the task files' headers and nothing else, builds no model and touches no
directory. train, pretrain, tune (every value of its search space), ablate (every variant, before
any trains) and `data check --config` call it, so a bad value, a name no registry holds, an
option an entry does not take, a missing file or column fails the same way everywhere, with one
line, before any work starts. (core.config has already checked the config's own keys and types.)
"""
from __future__ import annotations

import torch

from mtbert.core.config import Config, resolve_data_dir
from mtbert.core.errors import ConfigError
from mtbert.core.runtime import resolve_precision, select_device
from mtbert.core.tasks import get_task
from mtbert.data.readers import check_task_columns
from mtbert.training.early_stopping import EarlyStopping
from mtbert.training.schedules import build_schedule
from mtbert.training.techniques import build_techniques
from mtbert.training.tracking import check_trackers
from mtbert.training.weightings import build_weighting

FINETUNE = ("full", "frozen")


def validate_run(cfg: Config, check_data: bool = True, check_hardware: bool = True) -> None:
    """Raise the MtbertError that training `cfg` would meet first; `check_data`: also the task
    files (they exist, with the declared columns) under the configured data directory;
    `check_hardware`: also that this machine has the device and runs the precision natively."""
    tasks = [get_task(t) for t in cfg.data.tasks]
    variants = [t.name for t in tasks if t.variant_of in cfg.data.tasks]
    if variants or len(set(cfg.data.tasks)) != len(cfg.data.tasks):
        raise ConfigError(f"data.tasks lists a task twice (or with its variant {variants}): {cfg.data.tasks}")
    tc = cfg.train
    if check_hardware:
        resolve_precision(tc.precision, select_device(tc.device))  # an emulated precision, an absent device
    if cfg.model.finetune not in FINETUNE:
        raise ConfigError(f"model.finetune must be one of {FINETUNE}, got {cfg.model.finetune!r}")
    if tc.compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if tc.compile not in backends:
            raise ConfigError(f"train.compile must be a torch.compile backend ({', '.join(backends)}), "
                              f"got {tc.compile!r}")
    build_techniques(cfg.techniques)  # (names, options, and at most one gradient combiner)
    build_schedule(tc.schedule, **tc.schedule_args)
    build_weighting(tc.weighting, tasks, **tc.weighting_args)
    EarlyStopping.from_config(tc.early_stopping, cfg.data.tasks)
    check_trackers(tc.report_to)
    if check_data:
        data_dir = resolve_data_dir(cfg.data.data_dir)
        for task in tasks:
            check_task_columns(task, data_dir, ("train", "dev"))
