import copy
import json

import numpy as np
import pytest
import torch

from mtbert.inference.predictor import encode_split, predict_dataset
from mtbert.modeling.adapters import SHARED, LoRALinear, lora_layers, merge_lora
from mtbert.modeling.checkpoint import build_model, load_checkpoint, save_checkpoint
from mtbert.training.techniques import TECHNIQUES, build_techniques
from mtbert.training.trainer import Trainer

NO_DROPOUT = ("model.dropout=0", "model.tiny={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
              "intermediate_size: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}")


def _lora_model(tiny_cfg, spec: str, *overrides):
    """The tiny model with a technique's prepare_model applied, as the Trainer would."""
    cfg = tiny_cfg(f"techniques={spec}", *NO_DROPOUT, *overrides)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    for tech in build_techniques(cfg.techniques):
        tech.prepare_model(model, cfg.model.finetune)
    return cfg, model.eval(), tok


def _batch(model, tok, sentences=("a fine film", "dull and far too long")):
    enc = [ids for ids, _ in tok.encode(list(sentences))]
    width = max(len(e) for e in enc)
    ids = torch.tensor([e + [tok.pad_id] * (width - len(e)) for e in enc])
    return {"input_ids": ids, "attention_mask": (ids != tok.pad_id).long(), "token_type_ids": torch.zeros_like(ids)}


def _randomise_B(model, adapter=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            for name, b in m.lora_B.items():
                if adapter in (None, name):
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- the layer

def test_lora_layer_at_init_equals_frozen_layer_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    x = torch.randn(3, 5, 16)
    expected = base(x)
    layer = LoRALinear(base, [SHARED], rank=4, alpha=16, dropout=0.0, routed=False)
    assert layer.weight is base.weight and layer.bias is base.bias  # base parameters reused, not copied
    assert layer.lora_A[SHARED].abs().sum() > 0 and torch.equal(layer.lora_B[SHARED], torch.zeros(24, 4))
    assert torch.equal(layer(x), expected)


def test_lora_scaling_matches_hand_computation():
    base = torch.nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(base, [SHARED], rank=1, alpha=3.0, dropout=0.0, routed=False)  # scaling 3
    with torch.no_grad():
        layer.lora_A[SHARED].copy_(torch.tensor([[1.0, 2.0]]))     # A x = 1·1 + 2·3 = 7 for x = [1, 3]
        layer.lora_B[SHARED].copy_(torch.tensor([[0.1], [-1.0]]))  # B A x = [0.7, -7]
    y = layer(torch.tensor([[1.0, 3.0]]))
    # W0 x + b = [1.5, 2.5];  + 3 · [0.7, -7] = [3.6, -18.5]
    assert torch.allclose(y, torch.tensor([[3.6, -18.5]]))
    layer2 = LoRALinear(torch.nn.Linear(2, 2), [SHARED], rank=4, alpha=2.0, dropout=0.0, routed=False)
    assert layer2.scaling == 0.5


# ---------------------------------------------------------------- the model

def test_lora_model_at_init_equals_base_model(tiny_cfg):
    cfg, plain, tok = _lora_model(tiny_cfg, "{}")
    _, lora, _ = _lora_model(tiny_cfg, "{lora: {rank: 4}}")
    x = _batch(plain, tok)
    with torch.no_grad():
        for task in ("sst", "qqp", "sts"):
            assert torch.equal(plain(task, [x]), lora(task, [x])), task
    # default modules: all four Linear layers of every encoder layer, pooler untouched
    assert len(lora_layers(lora)) == 4 * 2 and not isinstance(lora.encoder.pooler, LoRALinear)
    assert lora.extensions["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.0,
                                       "modules": ["qkv", "out", "up", "down"], "adapters": [SHARED],
                                       "routed": False}


def test_only_adapters_and_heads_get_gradients(tiny_cfg):
    _, model, tok = _lora_model(tiny_cfg, "{lora: {rank: 4, modules: [qkv, down]}}")
    model.train()
    model("sst", [_batch(model, tok)]).sum().backward()
    for n, p in model.named_parameters():
        adapter = ".lora_" in n
        assert p.requires_grad == (adapter or n.startswith("heads.")), n
        if adapter or n.startswith("heads.sst"):
            assert p.grad is not None, n
        else:
            assert p.grad is None, n  # base encoder (embeddings, LayerNorms, pooler too) and other heads
    # B starts at zero, so only B (not A) receives a non-zero gradient on the first step
    layer = model.encoder.layers[0].attention.qkv
    assert layer.lora_B[SHARED].grad.abs().sum() > 0
    assert not isinstance(model.encoder.layers[0].attention.out, LoRALinear)


def test_experts_route_each_task_to_its_own_adapters(tiny_cfg):
    _, base, tok = _lora_model(tiny_cfg, "{}")
    _, model, _ = _lora_model(tiny_cfg, "{lora_experts: {rank: 4}}")
    assert model.extensions["lora_experts"]["adapters"] == ["sst", "qqp", "sts"]
    assert model.extensions["lora_experts"]["modules"] == ["out", "up", "down"]  # paper 001's matrices
    x = _batch(model, tok)
    with torch.no_grad():
        before = {t: model(t, [x]) for t in ("sst", "sts")}
        _randomise_B(model, adapter="sst")
        after = {t: model(t, [x]) for t in ("sst", "sts")}
        assert not torch.allclose(before["sst"], after["sst"])
        assert torch.equal(before["sts"], after["sts"])
        assert torch.equal(after["sts"], base("sts", [x]))  # sts's B is still zero: the frozen model
    # the routing is cleared after each forward: a bare encoder call cannot reuse a stale task
    with pytest.raises(RuntimeError, match="outside MultitaskModel.forward"):
        model.embed(x)


def test_experts_gradients_reach_only_the_running_tasks_adapters(tiny_cfg):
    _, model, tok = _lora_model(tiny_cfg, "{lora_experts: {rank: 4}}")
    _randomise_B(model)  # so that A gets gradients too
    model.train()
    model("qqp", [_batch(model, tok)]).sum().backward()
    for m in lora_layers(model):
        for name in ("sst", "qqp", "sts"):
            got = m.lora_A[name].grad is not None and m.lora_B[name].grad is not None
            assert got == (name == "qqp"), name


def test_experts_survive_deepcopy(tiny_cfg):
    # bregman's teacher is a deepcopy: its hooks must route its own layers, not the student's
    _, model, tok = _lora_model(tiny_cfg, "{lora_experts: {rank: 4}}")
    teacher = copy.deepcopy(model)
    _randomise_B(model, adapter="sst")
    x = _batch(model, tok)
    with torch.no_grad():
        assert not torch.allclose(teacher("sst", [x]), model("sst", [x]))
        assert torch.equal(teacher("sst", [x]), teacher("sst", [x]))


def test_bad_options_and_combinations(tiny_cfg):
    with pytest.raises(ValueError, match="unknown"):
        _lora_model(tiny_cfg, "{lora: {modules: [query]}}")
    with pytest.raises(ValueError, match="rank"):
        build_techniques({"lora": {"rank": 0}})
    with pytest.raises(ValueError, match="only one"):
        _lora_model(tiny_cfg, "{lora: {}, lora_experts: {}}")
    with pytest.raises(ValueError, match="finetune=full"):
        _lora_model(tiny_cfg, "{lora: {}}", "model.finetune=frozen")


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("spec", ["{lora: {rank: 4, alpha: 8}}", "{lora_experts: {rank: 2}}"])
def test_checkpoint_round_trip_reproduces_predictions_exactly(tmp_path, tiny_cfg, data_dir, spec):
    cfg, model, tok = _lora_model(tiny_cfg, spec)
    _randomise_B(model)  # non-zero adapters, so losing them on load would change predictions
    name = next(iter(cfg.techniques))
    save_checkpoint(tmp_path / "best", model, tok, cfg, {"step": 1})
    assert json.loads((tmp_path / "best" / "model.json").read_text())["extensions"] == model.extensions
    loaded, tok2, _, _ = load_checkpoint(tmp_path)
    assert loaded.extensions == model.extensions and len(lora_layers(loaded)) == len(lora_layers(model))
    _, plain, _ = _lora_model(tiny_cfg, "{}")
    a_sets = encode_split(model, tok, data_dir, "dev", limit=20)
    b_sets = encode_split(loaded, tok2, data_dir, "dev", limit=20)
    for task in a_sets:
        a, b = predict_dataset(model, a_sets[task]), predict_dataset(loaded, b_sets[task])
        assert np.array_equal(a["logits"], b["logits"]), (name, task)
        assert not np.allclose(a["logits"], predict_dataset(plain, a_sets[task])["logits"]), (name, task)
    assert name in TECHNIQUES


def test_merge_folds_adapters_into_plain_linear_layers(tiny_cfg):
    _, model, tok = _lora_model(tiny_cfg, "{lora: {rank: 4}}")
    _randomise_B(model)
    x = _batch(model, tok)
    with torch.no_grad():
        before = model("sst", [x])
        merge_lora(model.encoder)
        assert not lora_layers(model) and type(model.encoder.layers[0].attention.qkv) is torch.nn.Linear
        assert torch.allclose(model("sst", [x]), before, atol=1e-5)
    _, experts, _ = _lora_model(tiny_cfg, "{lora_experts: {}}")
    with pytest.raises(ValueError, match="one encoder per task"):
        merge_lora(experts.encoder)


# ---------------------------------------------------------------- training

def test_lora_training_run_trains_only_adapters_and_counts_them(tmp_path, tiny_cfg):
    tr = Trainer(tiny_cfg("techniques={lora: {rank: 4}}", "train.max_steps=3"), tmp_path / "r")
    base0 = {n: p.detach().clone() for n, p in tr.model.encoder.named_parameters() if ".lora_" not in n}
    summary = tr.run()
    assert summary["steps"] == 3 and "overall" in summary["best_dev"]
    # per layer r·(in+out): qkv 4·(32+96) + out 4·(32+32) + up 4·(32+64) + down 4·(64+32) = 1536
    adapters, heads = 2 * 1536, sum(p.numel() for p in tr.model.heads.parameters())
    base = sum(p.numel() for p in base0.values())
    assert summary["trainable_params"] == adapters + heads
    assert summary["total_params"] == base + adapters + heads
    for n, p in tr.model.encoder.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base0[n]), n
    assert tr.model.encoder.layers[1].ffn.down.lora_B[SHARED].abs().sum() > 0  # adapters did train
    loaded, _, _, _ = load_checkpoint(tmp_path / "r")
    assert loaded.extensions["lora"]["rank"] == 4


def test_lora_experts_training_run_with_bregman_and_pcgrad(tmp_path, tiny_cfg):
    tr = Trainer(tiny_cfg("techniques={lora_experts: {rank: 2}, bregman: {}, pcgrad: {}}", "train.max_steps=2"),
                 tmp_path / "r")
    summary = tr.run()
    per_task = 2 * 2 * ((32 + 32) + (32 + 64) + (64 + 32))  # 2 layers, rank 2, modules out, up, down
    assert summary["trainable_params"] == 3 * per_task + sum(p.numel() for p in tr.model.heads.parameters())
    # interleaved: every task ran every step, so every expert moved
    for task in ("sst", "qqp", "sts"):
        assert tr.model.encoder.layers[0].ffn.up.lora_B[task].abs().sum() > 0, task


def test_lora_checkpoint_as_backbone_starts_from_merged_weights(tmp_path, tiny_cfg):
    from mtbert.modeling.checkpoint import build_model, load_checkpoint
    from mtbert.training.trainer import Trainer
    Trainer(tiny_cfg("techniques={lora: {rank: 4}}", "train.max_steps=3", "train.lr=0.01"), tmp_path / "r").run()
    lora_model, _, _, _ = load_checkpoint(tmp_path / "r")
    model, _ = build_model(tiny_cfg("model.tiny=null", f"model.backbone={tmp_path / 'r'}"))
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = lora_model.encoder.eval()(ids, mask)["last_hidden_state"]
        got = model.encoder.eval()(ids, mask)["last_hidden_state"]
    assert torch.allclose(want, got, atol=1e-5)
    assert all(p.requires_grad for p in model.encoder.parameters())
