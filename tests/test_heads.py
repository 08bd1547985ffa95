import pytest
import torch
import torch.nn.functional as F

from mtbert.inference.predictor import encode_split, predict_dataset
from mtbert.modeling.checkpoint import build_model, load_checkpoint, save_checkpoint
from mtbert.modeling.heads import AttentionPairHead
from mtbert.modeling.model import CrossPlusCosineHead, Rep, build_pooler
from mtbert.modeling.poolers import BiLSTMPool, CNNPool
from mtbert.training.trainer import Trainer


def _states(B=3, T=7, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return x, mask


@pytest.mark.parametrize("pool_cls,dim", [(CNNPool, 4 * 128), (BiLSTMPool, 256)])
def test_cnn_and_bilstm_pooling_shapes_and_padding_is_ignored(pool_cls, dim):
    torch.manual_seed(0)
    pool = pool_cls(16).eval()
    x, mask = _states()
    out = pool({"last_hidden_state": x}, mask)
    assert out.shape == (3, dim) and pool.dim == dim
    garbage = x.clone()
    garbage[mask == 0] = 1e3  # whatever sits in padded positions must not matter
    assert torch.allclose(out, pool({"last_hidden_state": garbage}, mask), atol=1e-5)
    # a padded example equals the same example run alone without padding
    alone = pool({"last_hidden_state": x[1:2, :4]}, mask[1:2, :4])
    assert torch.allclose(out[1], alone[0], atol=1e-5)


def test_concatenated_pooler():
    pool = build_pooler("mean+cnn+bilstm", 16)
    x, mask = _states()
    out = pool({"last_hidden_state": x, "pooler_output": x[:, 0]}, mask)
    assert out.shape == (3, 16 + 512 + 256)
    assert torch.allclose(out[:, :16], (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="unknown pooling"):
        build_pooler("mean+gru", 16)


def test_attention_pair_head_ignores_padding():
    torch.manual_seed(0)
    head = AttentionPairHead(16, 1, dropout=0.0).eval()
    xa, ma = _states(seed=1)
    xb, mb = _states(seed=2)
    a, b = Rep(xa[:, 0], xa, ma), Rep(xb[:, 0], xb, mb)
    out = head(a, b)
    xa2, xb2 = xa.clone(), xb.clone()
    xa2[ma == 0], xb2[mb == 0] = 50.0, -50.0
    assert torch.allclose(out, head(Rep(xa2[:, 0], xa2, ma), Rep(xb2[:, 0], xb2, mb)), atol=1e-5)


def test_cross_plus_cosine_formula():
    head = CrossPlusCosineHead(8, 1, dropout=0.0, regression=True).eval()
    pair, u, v = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    out = head(Rep(pair, None, None), Rep(u, None, None), Rep(v, None, None))
    expected = head.cross.proj(pair) + 5.0 * F.cosine_similarity(u, v, dim=-1).unsqueeze(-1)
    assert torch.allclose(out, expected)


def test_shared_first_layer_is_one_module(tiny_cfg):
    model, _ = build_model(tiny_cfg("model.pair_encoding={qqp: bi, sts: bi}", "model.shared_pair_layer=16"))
    assert model.heads["qqp"].shared is model.heads["sts"].shared is model.shared_pair
    n_shared = sum(p.numel() for p in model.shared_pair.parameters())
    assert n_shared == (4 * 32) * 16 + 16


@pytest.mark.parametrize("overrides", [
    ("model.pooling=mean+cnn+bilstm", "model.pair_encoding={qqp: cross+cos, sts: cross+cos}"),
    ("model.pair_encoding={qqp: bi, sts: bi}", "model.bi_head=attention", "model.shared_pair_layer=16"),
    ("model.pair_encoding={qqp: bi, sts: bi}", "model.bi_head=diffprod", "model.pooling=cnn"),
])
def test_head_variants_train_and_round_trip(tmp_path, tiny_cfg, data_dir, overrides):
    tr = Trainer(tiny_cfg(*overrides, "train.max_steps=2"), tmp_path / "run")
    tr.run()
    model = tr.model.eval()
    loaded, tok, _, _ = load_checkpoint(tmp_path / "run")
    save_checkpoint(tmp_path / "again", model, tr.tokenizer, tr.cfg, {})
    reloaded, _, _, _ = load_checkpoint(tmp_path / "again")
    a = encode_split(model, tr.tokenizer, data_dir, "dev", limit=10)
    b = encode_split(reloaded, tok, data_dir, "dev", limit=10)
    for name in a:
        assert torch.equal(torch.tensor(predict_dataset(model, a[name])["logits"]),
                           torch.tensor(predict_dataset(reloaded, b[name])["logits"]))
