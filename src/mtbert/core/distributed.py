"""Multi-process data-parallel training (`torchrun --nproc_per_node=N -m mtbert.cli train ...`).

No DistributedDataParallel wrapper: every rank runs the ordinary training step on its shard of the
global batch, and the gradients are averaged after backward. Because all ranks draw the same task
schedule and start from the same weights, every schedule, weighting and technique works unchanged.
With one process (no torchrun) every method here is a no-op and nothing is initialised.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

from mtbert.core.runtime import select_device


class Dist:
    """This process's place in the group; world == 1 means a plain single-process run."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self) -> bool:
        """Only the main rank writes files (checkpoints, metrics, summary) and evaluates."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.world > 1 and device.type == "cuda" else device

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place mean over ranks (gloo has no AVG op: sum, then divide)."""
        if self.world > 1:
            dist.all_reduce(tensor)
            tensor /= self.world
        return tensor

    def average_grads(self, params) -> None:
        """Average .grad over ranks, one flat all-reduce per dtype. Parameters without a gradient
        are skipped: every rank trains the same tasks each step, so they are the same everywhere."""
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                buckets.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in buckets.values():
            flat = self.average_(torch.cat([g.reshape(-1) for g in grads]))
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    def average_floats(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        t = self.average_(torch.tensor([values[k] for k in values], dtype=torch.float64, device=self._comm_device))
        return dict(zip(values, t.tolist()))

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (decisions such as stopping must agree)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj):
        """The main rank's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Start every rank from the main rank's weights (seeding already makes them equal; this
        makes it certain)."""
        if self.world > 1:
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def process_group(device_name: str = "auto"):
    """Join the torchrun process group if there is one (RANK / WORLD_SIZE / LOCAL_RANK in the
    environment): gloo on CPU, nccl on CUDA with device cuda:LOCAL_RANK. Yields a Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = select_device(device_name).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    if rank != 0:  # one copy of the log
        logging.getLogger("mtbert").setLevel(logging.WARNING)
    try:
        yield Dist(rank, world, local_rank)
        dist.barrier()  # destroying the group while a peer is still in a collective can abort (gloo)
    finally:
        dist.destroy_process_group()
