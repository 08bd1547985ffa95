from pathlib import Path

import pytest

from mtbert.core.config import ConfigError, load_config


def test_defaults_file_and_overrides(tmp_path):
    cfg = load_config("configs/quick.yaml", ["train.epochs=2", "train.lr=3e-5", "model.pair_encoding={qqp: bi}"])
    assert cfg.train.epochs == 2 and cfg.train.lr == 3e-5
    assert cfg.model.pair_encoding == {"qqp": "bi"}
    assert cfg.data.limit == 1000  # from quick.yaml
    assert cfg.data.tasks == ["sst", "qqp", "sts"]  # inherited from default.yaml via base


@pytest.mark.parametrize("override,message", [
    ("train.epoch=2", "unknown config key"),
    ("train.lr=fast", "must be a float"),
    ("train.epochs=1.5", "must be a whole number"),
    ("model.max_length=null", "may not be null"),
    ("trainlr", "key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quick.yaml", [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_strategy_args_follow_their_strategy():
    # default.yaml: schedule annealed with {decay: 0.8}; choosing another schedule drops those args
    assert load_config("configs/default.yaml").train.schedule_args == {"decay": 0.8}
    assert load_config("configs/default.yaml", ["train.schedule=interleaved"]).train.schedule_args == {}
    assert load_config("configs/techniques/biased.yaml").train.schedule_args == {
        "weights": {"sst": 1.0, "qqp": 1.7, "sts": 1.0}}
    kept = load_config("configs/default.yaml", ["train.schedule=annealed"]).train.schedule_args
    assert kept == {"decay": 0.8}  # same strategy: its args stay


@pytest.mark.parametrize("override", ["data.batch_size=0", "model.max_length=2", "train.max_steps=0"])
def test_sizes_must_be_positive(override):
    with pytest.raises(ConfigError, match="at least"):
        load_config("configs/quick.yaml", [override])


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").rglob("*.yaml")
                                        if p.parent.name not in ("ablations", "tune")))
def test_every_shipped_config_loads(path):
    """(Ablation and search-space files are specs of their own, checked in their tests.)"""
    assert load_config(path).data.tasks
