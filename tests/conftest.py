from pathlib import Path

import pytest
import torch

from mtbert.core.config import load_config, resolve_data_dir
from mtbert.modeling.encoder import BertConfig, BertModel

TINY_YAML = Path(__file__).parent / "tiny.yaml"
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture
def tiny_cfg():
    return lambda *overrides: load_config(TINY_YAML, list(overrides))


@pytest.fixture
def tiny_encoder():
    torch.manual_seed(0)
    return BertModel(BertConfig(**TINY)).eval()


@pytest.fixture(scope="session")
def data_dir():
    d = resolve_data_dir(None)
    if not (d / "ids-sst-train.csv").exists():
        pytest.fail(f"shared data not found at {d}; set MTBERT_DATA")
    return d
