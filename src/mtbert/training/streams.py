"""Endless, shuffled, length-bucketed batches of one task, sharded across torchrun ranks."""
from __future__ import annotations

import math

from mtbert.data.readers import collate, make_batches


class TaskStream:
    """Endless batches of one task: a new shuffled (length-bucketed) pass whenever one runs out.

    Under torchrun every rank holds the same stream of global batches (same data, same generator)
    and keeps every world-th example of each. A rank's mean loss is weighted by its share of the
    global batch (`share` = n_rank · world / n_global), so the mean of the ranks' gradients is
    the gradient of the global batch's mean loss even when the batch does not split evenly; a rank
    left without an example trains on a stand-in with share 0."""

    def __init__(self, ds, batch_size, bucket, rng, pad_id, rank=0, world=1):
        self.ds, self.batch_size, self.bucket, self.rng, self.pad_id = ds, batch_size, bucket, rng, pad_id
        self.rank, self.world = rank, world
        self.queue: list[list[int]] = []

    def __next__(self):
        if not self.queue:
            self.queue = make_batches(self.ds, self.batch_size, True, self.bucket, self.rng)
        batch = self.queue.pop()
        if self.world == 1:
            return collate(self.ds, batch, self.pad_id)
        mine = batch[self.rank:: self.world]
        return {**collate(self.ds, mine or batch[:1], self.pad_id),
                "share": len(mine) * self.world / len(batch), "global_size": len(batch)}

    def state_dict(self) -> dict:  # the generator is the trainer's, saved once
        return {"queue": self.queue}

    def load_state_dict(self, state: dict) -> None:
        self.queue = state["queue"]

    @property
    def batches_per_pass(self) -> int:
        return math.ceil(len(self.ds) / self.batch_size)
