import errno
import os

import numpy as np
import pytest
import torch

from mtbert.inference.predictor import encode_split, predict_dataset
from mtbert.modeling.checkpoint import (
    build_model,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mtbert.modeling.encoder import CheckpointError


def _model(tiny_cfg, *overrides):
    cfg = tiny_cfg(*overrides)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    return cfg, model.eval(), tok


@pytest.mark.parametrize("pairs", ["cross", "bi"])
def test_round_trip_reproduces_predictions_exactly(tmp_path, tiny_cfg, data_dir, pairs):
    cfg, model, tok = _model(tiny_cfg, f"model.pair_encoding={{qqp: {pairs}, sts: {pairs}}}",
                             "model.bi_head=cosine", "model.pooling=mean")
    save_checkpoint(tmp_path / "best", model, tok, cfg, {"step": 3})
    loaded, tok2, cfg2, meta = load_checkpoint(tmp_path)
    assert meta == {"step": 3} and loaded.pair_encoding == model.pair_encoding and loaded.pooling == "mean"
    a_sets = encode_split(model, tok, data_dir, "dev", limit=20)
    b_sets = encode_split(loaded, tok2, data_dir, "dev", limit=20)
    for name in a_sets:
        a, b = predict_dataset(model, a_sets[name]), predict_dataset(loaded, b_sets[name])
        assert np.array_equal(a["logits"], b["logits"]), name


def test_crash_during_save_keeps_previous_best(tmp_path, tiny_cfg, monkeypatch):
    cfg, model, tok = _model(tiny_cfg)
    save_checkpoint(tmp_path / "best", model, tok, cfg, {"step": 1})
    import mtbert.modeling.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "best", model, tok, cfg, {"step": 2})
    _, _, _, meta = load_checkpoint(tmp_path)
    assert meta == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # temp dir cleaned up


def test_full_disk_mid_save_is_a_clear_error(tmp_path, tiny_cfg, monkeypatch):
    cfg, model, tok = _model(tiny_cfg)
    save_checkpoint(tmp_path / "best", model, tok, cfg, {"step": 1})
    import mtbert.modeling.checkpoint as ck

    def full(path, obj):  # the weights are written; the disk fills up on the next file
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck, "_write_json", full)
    with pytest.raises(OSError, match="could not save checkpoint .*best.*No space left.*previous best/ is kept") as e:
        save_checkpoint(tmp_path / "best", model, tok, cfg, {"step": 2})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)[3] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_interrupted_swap_falls_back_to_old(tmp_path, tiny_cfg):
    cfg, model, tok = _model(tiny_cfg)
    save_checkpoint(tmp_path / "best", model, tok, cfg, {"step": 1})
    os.replace(tmp_path / "best", tmp_path / "best.old")  # crash between the two renames
    assert find_checkpoint(tmp_path) == tmp_path / "best.old"


def test_broken_checkpoints_give_clear_errors(tmp_path, tiny_cfg):
    with pytest.raises(CheckpointError, match="no mtbert checkpoint"):
        load_checkpoint(tmp_path)
    cfg, model, tok = _model(tiny_cfg)
    save_checkpoint(tmp_path / "best", model, tok, cfg, {})
    (tmp_path / "best" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)
