"""Gradient accumulation (train.grad_accum): N micro-batches of b give the gradient of one batch of N·b,
per task, with and without PCGrad, in one process and under torchrun-style data parallelism."""
from unittest import mock

import pytest
import torch

from mtbert.core.config import load_config
from mtbert.core.distributed import Dist
from mtbert.training import streams
from mtbert.training.optimizer import Updater
from mtbert.training.trainer import Trainer
from tests.conftest import TINY_YAML

# No dropout, so one forward of 8 examples and two of 4 see the same network.
SETS = ["train.threads=1", "model.dropout=0", "model.tiny={hidden_size: 32, num_hidden_layers: 2, "
        "num_attention_heads: 2, intermediate_size: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]
# Index batches of each task: one big batch, or the same examples as uneven micro-batches (3 + 5).
BIG = {"sst": [list(range(8))], "qqp": [list(range(10, 18))], "sts": [list(range(20, 28))]}
MICRO = {t: [b[0][:3], b[0][3:]] for t, b in BIG.items()}


def _gradients(trainer: Trainer, batches: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    """Run one optimizer step on these index batches; the gradients it applied (before clipping)."""
    queued = {id(trainer.train_sets[t]): b for t, b in batches.items()}
    grads, step = {}, Updater.step

    def capture(updater):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.trained_parameters().items()
                      if p.grad is not None})
        return step(updater)

    def batches_of(ds, *shuffling):
        return list(reversed(queued[id(ds)]))  # (a stream pops from the end)
    with mock.patch.object(Updater, "step", capture), mock.patch.object(streams, "make_batches", batches_of):
        trainer.train_step(list(trainer.train_sets))
    return grads


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), (name, (a[name] - b[name]).abs().max())


VARIANTS = {"plain": [], "pcgrad-uncertainty": ["techniques={pcgrad: {}}", "train.weighting=uncertainty"]}


@pytest.mark.parametrize("extra", VARIANTS.values(), ids=VARIANTS.keys())
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, tiny_cfg, extra):
    big = Trainer(tiny_cfg(*SETS, *extra, "data.batch_size=8"), tmp_path / "big")
    acc = Trainer(tiny_cfg(*SETS, *extra, "data.batch_size=4", "train.grad_accum=2"), tmp_path / "acc")
    g_big, g_acc = _gradients(big, BIG), _gradients(acc, MICRO)
    _assert_same(g_big, g_acc)
    assert acc.examples_seen == big.examples_seen == 24
    # the check has teeth: a single micro-batch gives another gradient
    one = Trainer(tiny_cfg(*SETS, *extra, "data.batch_size=4"), tmp_path / "one")
    g_one = _gradients(one, {t: b[:1] for t, b in MICRO.items()})
    assert any(not torch.allclose(g_big[n], g_one[n], rtol=1e-3, atol=1e-5) for n in g_big)


def test_schedules_plan_in_accumulated_batches(tmp_path, tiny_cfg):
    """An epoch stays one pass over the data: steps are planned in batches of batch_size x grad_accum."""
    for schedule in ("sequential", "interleaved", "round_robin"):
        big = Trainer(tiny_cfg(f"train.schedule={schedule}", "data.batch_size=8"), tmp_path / f"b{schedule}")
        acc = Trainer(tiny_cfg(f"train.schedule={schedule}", "data.batch_size=4", "train.grad_accum=2"),
                      tmp_path / f"a{schedule}")
        assert acc.plans == big.plans and acc.total_steps == big.total_steps


def _ddp_worker(rank, world, init_file, out, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, extra in VARIANTS.items():
            cfg = load_config(TINY_YAML, [*SETS, *extra, "data.batch_size=4", "train.grad_accum=2"])
            grads = _gradients(Trainer(cfg, out / name, Dist(rank, world)), MICRO)
            if rank == 0:
                torch.save(grads, results / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def test_accumulation_under_data_parallelism_equals_one_big_batch(tmp_path, tiny_cfg):
    """Two gloo processes, each with its shard of every micro-batch (3 -> 2 + 1, 5 -> 3 + 2), accumulate
    two micro-batches: the averaged gradient is the one-process gradient of the 8-example batch."""
    (tmp_path / "results").mkdir()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, tmp_path / "pg", tmp_path, tmp_path / "results"),
                                nprocs=2, join=True)
    for name, extra in VARIANTS.items():
        big = Trainer(tiny_cfg(*SETS, *extra, "data.batch_size=8"), tmp_path / f"big-{name}")
        _assert_same(_gradients(big, BIG), torch.load(tmp_path / "results" / f"{name}.pt"))


def test_grad_accum_must_be_positive(tiny_cfg):
    from mtbert.core.errors import ConfigError
    with pytest.raises(ConfigError, match="grad_accum"):
        tiny_cfg("train.grad_accum=0")
