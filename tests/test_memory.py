"""Training memory: activation checkpointing above a token budget (same gradients, fewer saved
activations), the allocator release, and the resident memory the trainer records."""
from __future__ import annotations

import json

import pytest
import torch

from mtbert.core.hardware import detect
from mtbert.core.runtime import (
    KERNEL_CACHE_LIMITS,
    allocator_memory_mb,
    release_free_memory,
    resident_memory_mb,
)
from mtbert.modeling.encoder import BertConfig, BertModel
from mtbert.training.trainer import Trainer
from tests.conftest import TINY


def _loss_and_saved_bytes(budget: int | None, input_ids, mask):
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).train()  # dropout on: the recomputation must replay its masks
    model.checkpoint_above_tokens = budget
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids, mask)["last_hidden_state"].pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


def test_checkpointing_above_the_budget_keeps_gradients_and_saves_less():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (4, 24), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, 15:] = 0
    plain_loss, plain_grads, plain_bytes = _loss_and_saved_bytes(None, input_ids, mask)
    ckpt_loss, ckpt_grads, ckpt_bytes = _loss_and_saved_bytes(50, input_ids, mask)  # 96 tokens > 50
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], rtol=1e-5, atol=1e-7), name
    assert ckpt_bytes < plain_bytes / 2
    # under the budget nothing changes: the same tensors are saved
    _, _, under_bytes = _loss_and_saved_bytes(1000, input_ids, mask)
    assert under_bytes == plain_bytes


def test_resident_memory_and_release():
    mem = resident_memory_mb()
    assert mem["rss_mb"] > 10 and mem["peak_rss_mb"] >= mem["rss_mb"] - 1
    assert release_free_memory() is True  # glibc (the machines this project supports)
    before = allocator_memory_mb()["live_mb"]
    block = torch.ones(16 * 2**20, dtype=torch.uint8)  # 16 MB, in use
    assert allocator_memory_mb()["live_mb"] - before >= 15
    del block
    assert allocator_memory_mb()["live_mb"] - before < 1


def test_every_metrics_row_records_memory(tmp_path, tiny_cfg):
    Trainer(tiny_cfg("train.max_steps=2", "train.eval_every=1", "train.progress=false",
                     "train.checkpoint_above_tokens=8"), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["memory"]["peak_rss_mb"] >= r["memory"]["rss_mb"] > 10 for r in rows)


def test_routed_lora_experts_train_with_a_checkpointing_budget(tmp_path, tiny_cfg):
    """lora_experts routes its adapters from hooks around the model's forward: recomputing a layer
    in backward would run outside them, so the trainer turns recomputation off for it."""
    trainer = Trainer(tiny_cfg("train.max_steps=2", "train.checkpoint_above_tokens=8",
                               "techniques={lora_experts: {rank: 2}}"), tmp_path / "run")
    assert trainer.model.encoder.checkpoint_above_tokens is None
    assert trainer.run()["steps"] == 2


def test_recomputation_is_off_for_a_non_recomputable_technique_of_the_run_or_of_the_checkpoint():
    from types import SimpleNamespace

    from mtbert.training.techniques import TECHNIQUES
    from mtbert.training.trainer import not_recomputable
    lora, experts = TECHNIQUES.get("lora")(), TECHNIQUES.get("lora_experts")()
    assert lora.recomputable and not experts.recomputable
    plain, routed = SimpleNamespace(extensions={"lora": {}}), SimpleNamespace(extensions={"lora_experts": {}})
    assert not_recomputable([lora], plain) == [] and not_recomputable([experts], plain) == ["lora_experts"]
    assert not_recomputable([], routed) == ["lora_experts"]  # brought along by a loaded checkpoint


_SHAPES_PROBE = """
import os
{preamble}
import torch
from mtbert.core.runtime import allocator_memory_mb
def live_mb():
    return allocator_memory_mb()["live_mb"]
torch.set_num_threads(1)
layer = torch.nn.Linear(64, 256)
for length in range(1, 4):  # (warm-up: torch's and oneDNN's own one-off allocations)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(torch.randn(length, 64, requires_grad=True))
    y.float().sum().backward()
before = live_mb()
for length in range(8, 8 + {n_shapes}):  # a bf16 training pass over ever-new shapes, as length buckets give
    x = torch.randn(4 * length, 64, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
print(live_mb() - before, os.environ.get("LRU_CACHE_CAPACITY"), os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
"""


def _live_growth_over_new_shapes(preamble: str, n_shapes: int) -> tuple[float, str, str]:
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_LIMITS}  # (the shell's own settings aside)
    out = subprocess.run([sys.executable, "-c", _SHAPES_PROBE.format(preamble=preamble, n_shapes=n_shapes)],
                         capture_output=True, text=True, check=True, env=env).stdout.split()
    return float(out[0]), out[1], out[2]


@pytest.mark.skipif(not detect().cpu_native_bf16 or not allocator_memory_mb(),
                    reason="oneDNN's bf16 kernels are where these caches live; glibc's mallinfo2 counts them")
def test_bound_kernel_caches_stops_the_growth_of_live_memory_over_new_shapes():
    """Each new input shape of a bf16 matmul leaves a compiled kernel in oneDNN's cache and an object
    in ideep's, 1,024 of each by default: live memory that grows with every new batch length. After
    bound_kernel_caches the growth stops at the smaller cap."""
    n = 300  # shapes; x3 kernels each (forward, input gradient, weight gradient)
    bounding = "from mtbert.core.runtime import bound_kernel_caches\nbound_kernel_caches()"
    bounded, lru, primitives = _live_growth_over_new_shapes(bounding, n)
    assert (lru, primitives) == (KERNEL_CACHE_LIMITS["LRU_CACHE_CAPACITY"],
                                 KERNEL_CACHE_LIMITS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
    library_defaults = "os.environ.update(LRU_CACHE_CAPACITY='1024', ONEDNN_PRIMITIVE_CACHE_CAPACITY='1024')\n"
    unbounded, lru, _ = _live_growth_over_new_shapes(library_defaults + bounding, n)
    assert lru == "1024"  # a value the user set wins
    assert bounded < 0.5 * unbounded, (bounded, unbounded)


def test_the_trainer_bounds_the_kernel_caches(tmp_path, tiny_cfg, monkeypatch):
    import os
    for name in KERNEL_CACHE_LIMITS:
        monkeypatch.setenv(name, "x")  # (so that monkeypatch restores the variable's absence)
        monkeypatch.delenv(name)
    Trainer(tiny_cfg("train.max_steps=1", "train.progress=false"), tmp_path / "run")
    assert {name: os.environ[name] for name in KERNEL_CACHE_LIMITS} == KERNEL_CACHE_LIMITS


def test_release_memory_every_n_steps_and_around_each_evaluation(tmp_path, tiny_cfg, monkeypatch):
    from mtbert.core.config import ConfigError
    from mtbert.training import trainer as trainer_module
    calls = []
    monkeypatch.setattr(trainer_module, "release_free_memory", lambda: calls.append(1) or True)

    def releases(every: str) -> int:
        calls.clear()
        Trainer(tiny_cfg("train.max_steps=4", "train.progress=false", f"train.release_memory_every={every}"),
                tmp_path / every).run()
        return len(calls)

    assert releases("null") == 2  # the final evaluation: before it and after it
    assert releases("2") == 2 + 2  # and after steps 2 and 4
    with pytest.raises(ConfigError, match="train.release_memory_every"):
        tiny_cfg("train.release_memory_every=0")


def test_evaluation_releases_free_memory_every_n_batches_with_the_same_outputs(tiny_cfg, data_dir, monkeypatch):
    import numpy as np

    from mtbert.inference import predictor as predictor_module
    from mtbert.inference.predictor import encode_split, predict_dataset
    from mtbert.modeling.checkpoint import build_model
    torch.manual_seed(0)
    model, tok = build_model(tiny_cfg())
    ds = encode_split(model.eval(), tok, data_dir, "dev", limit=20)["sst"]
    calls = []
    monkeypatch.setattr(predictor_module, "release_free_memory", lambda: calls.append(1) or True)
    plain = predict_dataset(model, ds, batch_size=2)  # 20 examples: 10 batches
    assert calls == []
    released = predict_dataset(model, ds, batch_size=2, release_every=3)
    assert len(calls) == 3  # before batches 3, 6 and 9
    assert np.array_equal(plain["logits"], released["logits"])
