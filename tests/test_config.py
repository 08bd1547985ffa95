import pytest

from mtbert.config import ConfigError, load_config


def test_defaults_file_and_overrides(tmp_path):
    cfg = load_config("configs/quick.yaml", ["train.epochs=2", "train.lr=3e-5", "model.pair_encoding={qqp: bi}"])
    assert cfg.train.epochs == 2 and cfg.train.lr == 3e-5
    assert cfg.model.pair_encoding == {"qqp": "bi"}
    assert cfg.data.limit == 1000  # from quick.yaml
    assert cfg.data.tasks == ["sst", "qqp", "sts"]  # inherited from default.yaml via base


@pytest.mark.parametrize("override,message", [
    ("train.epoch=2", "unknown config key"),
    ("train.lr=fast", "must be a float"),
    ("train.epochs=1.5", "must be a int"),
    ("model.max_length=null", "may not be null"),
    ("trainlr", "key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quick.yaml", [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
