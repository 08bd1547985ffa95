import json

import pytest
import torch
from safetensors.torch import save_file

from mtbert.modeling.encoder import (
    BertConfig,
    BertModel,
    CheckpointError,
    default_backbone_dir,
    load_hf_encoder,
)
from tests.conftest import TINY


def _inputs(vocab=30522, B=3, T=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab - 1, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B >= 3:
        mask[1, 10:] = 0
        mask[2, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    return ids, mask, types


def _compare(ours, theirs, ids, mask, types):
    with torch.no_grad():
        a = ours(ids, mask, types)
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (a["last_hidden_state"] - b.last_hidden_state)[real].abs().max() < 1e-4
    assert (a["pooler_output"] - b.pooler_output).abs().max() < 1e-4


@pytest.mark.numerics
def test_minilm_parity_with_transformers():
    transformers = pytest.importorskip("transformers")
    d = default_backbone_dir()
    ours = load_hf_encoder(d).eval()
    theirs = transformers.BertModel.from_pretrained(str(d)).eval()
    _compare(ours, theirs, *_inputs())


@pytest.mark.numerics
def test_tiny_random_parity_and_bin_format(tmp_path):
    """A random HF BERT saved as pytorch_model.bin with a 'bert.' prefix loads identically."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf_cfg = transformers.BertConfig(**TINY)
    theirs = transformers.BertModel(hf_cfg).eval()
    sd = {f"bert.{k}": v for k, v in theirs.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf_cfg.to_json_string())
    ours = load_hf_encoder(tmp_path).eval()
    _compare(ours, theirs, *_inputs())


def _write_tiny_checkpoint(path, sd):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY))
    save_file(sd, str(path / "model.safetensors"))


def _hf_like_state(model: BertModel):
    """Produce HF key names from our model (inverse of the loader's mapping)."""
    from transformers import BertConfig as HFConfig
    from transformers import BertModel as HFModel
    return {k: v.contiguous() for k, v in HFModel(HFConfig(**TINY)).state_dict().items()}


def test_missing_keys_are_named(tmp_path):
    pytest.importorskip("transformers")
    sd = _hf_like_state(None)
    del sd["encoder.layer.1.attention.self.key.weight"]
    _write_tiny_checkpoint(tmp_path, sd)
    with pytest.raises(CheckpointError, match="encoder.layer.1.attention.self.key.weight"):
        load_hf_encoder(tmp_path)


def test_misshaped_keys_are_named(tmp_path):
    pytest.importorskip("transformers")
    sd = _hf_like_state(None)
    sd["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
    _write_tiny_checkpoint(tmp_path, sd)
    with pytest.raises(CheckpointError, match="ffn.up.weight"):
        load_hf_encoder(tmp_path)


def test_corrupt_and_absent_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_encoder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_hf_encoder(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_encoder(tmp_path / "nowhere")


def test_padding_does_not_change_real_tokens(tiny_encoder):
    ids, mask, types = _inputs(B=1, T=6)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], 1)
    ptypes = torch.cat([types, torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        a = tiny_encoder(ids, mask, types)["last_hidden_state"]
        b = tiny_encoder(padded, pmask, ptypes)["last_hidden_state"][:, :6]
    assert torch.allclose(a, b, atol=1e-5)


def test_attention_probabilities_path_matches_sdpa(tiny_encoder):
    ids, mask, types = _inputs()
    with torch.no_grad():
        fast = tiny_encoder(ids, mask, types)
        slow = tiny_encoder(ids, mask, types, output_attentions=True)
    assert torch.allclose(fast["last_hidden_state"], slow["last_hidden_state"], atol=1e-5)
    probs = slow["attentions"][0]
    assert probs.shape == (3, 2, 17, 17)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 17), atol=1e-5)
    assert probs[1, :, :, 10:].abs().max() == 0  # padded keys get no attention


def test_config_ignores_unknown_hf_fields():
    cfg = BertConfig.from_dict({**TINY, "model_type": "bert", "architectures": ["BertModel"]})
    assert cfg.hidden_size == 32
