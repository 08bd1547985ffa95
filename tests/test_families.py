"""Encoder families (BERT, RoBERTa, MPNet): parity with transformers on random small models,
their tokenizers' pair formats, and the whole train -> checkpoint -> predict path on each."""
import json

import pytest
import torch

from mtbert.core.errors import CheckpointError
from mtbert.data.tokenizer import BertTokenizer
from mtbert.modeling.checkpoint import load_checkpoint
from mtbert.modeling.encoder import (
    BertConfig,
    BertModel,
    load_hf_encoder,
    relative_position_bucket,
)
from tests.hf_tiny import hf_model, sst_texts, tiny_tokenizer, write_hf_dir

transformers = pytest.importorskip("transformers")
FAMILIES = ["bert", "roberta", "mpnet"]


def _batch(pad_id: int, vocab: int = 400, B: int = 4, T: int = 70, seed: int = 0):
    """Random ids with right padding of three different lengths (T = 70 reaches MPNet's log-spaced
    distance buckets); the second half of each row is segment 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 50:] = 0
    mask[2, 9:] = 0
    mask[3, 1:] = 0
    ids[mask == 0] = pad_id
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    return ids, mask, types


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefixed", [False, True], ids=["base", "task-model-prefix"])
def test_parity_with_transformers(tmp_path, family, prefixed):
    """Hidden states (at every position, padding included), pooler output and the explicit
    attention-probabilities path match transformers' BertModel / RobertaModel / MPNetModel."""
    theirs = hf_model(family)
    theirs.save_pretrained(str(tmp_path))
    if prefixed:  # weights saved from a task model: "roberta.encoder.layer.0...."
        from safetensors.torch import load_file, save_file
        sd = load_file(str(tmp_path / "model.safetensors"))
        save_file({f"{family}.{k}": v for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    ours = load_hf_encoder(tmp_path).eval()
    assert ours.config.model_type == family
    ids, mask, types = _batch(theirs.config.pad_token_id)
    if family != "bert":
        types = torch.zeros_like(ids)  # one segment type in RoBERTa, none in MPNet
    kw = {} if family == "mpnet" else {"token_type_ids": types}
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, **kw)
        fast = ours(ids, mask, types)
        slow = ours(ids, mask, types, output_attentions=True)
    assert (fast["last_hidden_state"] - ref.last_hidden_state).abs().max() < 1e-4
    assert (fast["pooler_output"] - ref.pooler_output).abs().max() < 1e-4
    assert (slow["last_hidden_state"] - ref.last_hidden_state).abs().max() < 1e-4
    probs = slow["attentions"][0]
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-5)
    assert probs[2, :, :, 9:].abs().max() == 0  # padded keys get no attention


def test_family_specific_parts():
    """RoBERTa numbers positions from pad + 1; MPNet has no segment embedding but one relative
    bias table shared by all layers; BERT has neither change."""
    sizes = dict(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    bert = BertModel(BertConfig(**sizes))
    roberta = BertModel(BertConfig(**sizes, model_type="roberta", pad_token_id=1, type_vocab_size=1))
    mpnet = BertModel(BertConfig(**sizes, model_type="mpnet", pad_token_id=1))
    mask = torch.tensor([[1, 1, 1, 0]])
    assert bert.embeddings.positions(mask).tolist() == [[0, 1, 2, 3]]
    assert roberta.embeddings.positions(mask).tolist() == [[2, 3, 4, 1]]
    assert mpnet.embeddings.token_type is None and bert.relative_bias is None
    assert sum("relative_bias" in k for k in mpnet.state_dict()) == 1
    assert roberta.config.max_tokens == 510 and bert.config.max_tokens == 512
    # T5/MPNet buckets: exact up to 7 either side, keys after the query in the upper half, log-spaced after
    rel = torch.tensor([0, 1, -1, 7, -7, 8, 127, 500])
    assert relative_position_bucket(rel).tolist() == [0, 17, 1, 23, 7, 24, 31, 31]


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlnet", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match=r"config.json: unsupported model_type 'xlnet'; supported: bert, roberta, mpnet"):
        load_hf_encoder(tmp_path)


@pytest.mark.numerics
def test_mpnet_bias_under_bf16_autocast():
    """The additive bias is cast to the autocast dtype that SDPA requires."""
    enc = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, model_type="mpnet", pad_token_id=1)).eval()
    ids, mask, _ = _batch(1, vocab=50, T=12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(ids, mask)["last_hidden_state"].float()
    with torch.no_grad():
        full = enc(ids, mask)["last_hidden_state"]
    assert (low - full).abs().max() < 0.1


@pytest.mark.parametrize("family", ["roberta", "mpnet"])
def test_tokenizer_pairs_match_the_post_processor(family, data_dir):
    """<s> a </s></s> b </s> with token types all 0, as the tokenizer.json's own RoBERTa
    post-processor builds them; truncation keeps 4 special tokens in max_length."""
    raw = tiny_tokenizer(family, sst_texts(data_dir))
    ours = BertTokenizer(raw, max_length=64)
    assert ours.style == "roberta" and ours.pad_id == 1 and (ours.single_overhead, ours.pair_overhead) == (2, 4)
    a, b = ["A gripping, funny film ."] * 2, ["It is dull .", ""]
    for (ids, types), x, y in zip(ours.encode_pairs(a, b), a, b):
        ref = raw.encode(x, y)
        assert ids == ref.ids and types == ref.type_ids == [0] * len(ids)
        assert raw.id_to_token(ids[0]) == "<s>" and ids.count(2) == 3
    (ids, types), = ours.encode(["It is dull ."])
    assert ids == raw.encode("It is dull .").ids
    short = BertTokenizer(raw, max_length=10)
    (ids, _), = short.encode_pairs(["one two three four five six"], ["seven eight nine ten eleven"])
    assert len(ids) == 10 and ids[-1] == 2


def test_bert_tokenizer_format_unchanged():
    from mtbert.modeling.encoder import default_backbone_dir
    tok = BertTokenizer.from_dir(default_backbone_dir(), max_length=32)
    assert tok.style == "bert" and tok.pair_overhead == 3
    (ids, types), = tok.encode_pairs(["a cat"], ["a dog"])
    ref = tok.tok.encode("a cat", "a dog")
    assert ids == ref.ids and types == ref.type_ids and types[-1] == 1


@pytest.mark.parametrize("family", ["roberta", "mpnet"])
def test_train_checkpoint_predict_on_each_family(tmp_path, tiny_cfg, data_dir, family):
    """A non-BERT backbone trains with SMART and LLRD (word embeddings, positions from the mask,
    relative-bias depth), and its checkpoint restores the family, tokenizer style and outputs."""
    from mtbert.apps.report import attention_maps
    from mtbert.inference.loading import load_predictor
    from mtbert.training.trainer import Trainer
    hf = write_hf_dir(tmp_path / "hf", family, data_dir)
    cfg = tiny_cfg("model.tiny=null", f"model.backbone={hf}", "data.limit=16", "train.max_steps=2",
                   "techniques={smart: {}, llrd: {decay: 0.9}}", f"data.data_dir={data_dir}")
    Trainer(cfg, tmp_path / "run").run()
    spec = json.loads((tmp_path / "run/best/model.json").read_text())
    assert spec["encoder"]["model_type"] == family
    model, tok, _, _ = load_checkpoint(tmp_path / "run")
    assert model.encoder.config.model_type == family and tok.style == "roberta" and tok.pad_id == 1
    predictor = load_predictor(tmp_path / "run", device="cpu")
    from mtbert.data.readers import Example
    ex = [Example("1", ("How do I learn?", "What is the way to learn?"), 1)]
    out = predictor.predict("qqp", ex)
    assert out["pred"].shape == (1,)
    enc = tok.encode_pairs(["How do I learn?"], ["What is the way to learn?"])[0]
    inputs = {"input_ids": torch.tensor([enc[0]]), "attention_mask": torch.ones(1, len(enc[0]), dtype=torch.long),
              "token_type_ids": torch.tensor([enc[1]])}
    maps = attention_maps(model.encoder, inputs, [0, 1])
    assert maps[1].shape == (1, len(enc[0]), len(enc[0]))


def test_lora_on_mpnet(tmp_path, data_dir):
    """LoRA's target names exist in every family; at initialisation the output is unchanged."""
    from mtbert.core.tasks import get_task
    from mtbert.modeling.adapters import apply_lora
    from mtbert.modeling.model import MultitaskModel
    enc = load_hf_encoder(write_hf_dir(tmp_path, "mpnet", data_dir)).eval()
    model = MultitaskModel(enc, [get_task("sst")], {}).eval()
    ids, mask, types = _batch(1)
    inputs = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}]
    with torch.no_grad():
        before = model("sst", inputs)
        apply_lora(model, {"rank": 2, "alpha": 4.0, "dropout": 0.0, "modules": ["qkv", "out", "up", "down"],
                           "adapters": ["shared"], "routed": False})
        after = model("sst", inputs)
    assert torch.allclose(before, after, atol=1e-6)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 8


def test_old_checkpoint_without_model_type_loads_as_bert(tmp_path, tiny_cfg, data_dir):
    from mtbert.training.trainer import Trainer
    Trainer(tiny_cfg("data.limit=8", "train.max_steps=1", f"data.data_dir={data_dir}"), tmp_path / "run").run()
    spec_path = tmp_path / "run/best/model.json"
    spec = json.loads(spec_path.read_text())
    assert spec["encoder"].pop("model_type") == "bert"
    spec_path.write_text(json.dumps(spec))
    model, tok, _, _ = load_checkpoint(tmp_path / "run")
    assert model.encoder.family.name == "bert" and tok.style == "bert"
    spec["encoder"]["model_type"] = "electra"
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="model.json: unsupported model_type 'electra'"):
        load_checkpoint(tmp_path / "run")
