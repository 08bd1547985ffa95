"""Resident memory step by step: which training steps raise the peak, and how much stays behind.

    python bench/step_memory.py [--config configs/default.yaml] [--steps 60] [--set KEY=VALUE ...]

Builds the recipe's Trainer (data.limit=1500 unless set, so it starts fast), runs its first
`--steps` planned steps and prints, for each step that raised the peak by over 20 MB (and every 10th),
the task, the batch's sequence shapes, the resident memory and the peak; then one evaluation.
Compare `--set train.checkpoint_above_tokens=null` (no recomputation) with the recipe's value, and
`--release-every 0` (the allocator keeps its free pages, as before) with the default 10, and
`MALLOC_MMAP_THRESHOLD_=65536 python bench/step_memory.py ...` (glibc returns every block over
64 KiB at once: what is left is live memory, not fragmentation). The last line reads
`rss_mb=.. peak_rss_mb=.. s_per_step=..` after the steps (before the evaluation).
"""
from __future__ import annotations

import argparse
import tempfile
import time

from mtbert.core.config import load_config
from mtbert.core.runtime import release_free_memory, resident_memory_mb
from mtbert.training import streams
from mtbert.training.trainer import Trainer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--release-every", type=int, default=None,
                    help="steps between returning free pages to the system (0: never, as before); "
                         "the same as --set train.release_memory_every=N (default: the recipe's)")
    args = ap.parse_args()
    release = [] if args.release_every is None else [f"train.release_memory_every={args.release_every or 'null'}"]
    overrides = ["data.limit=1500", "train.progress=false", "train.save_every=null"] + release + args.set
    trainer = Trainer(load_config(args.config, overrides), tempfile.mkdtemp(prefix="mtbert-stepmem-"))
    print("after set-up", resident_memory_mb())
    shapes = {}
    draw = streams.TaskStream.__next__

    def recording_draw(self):  # (records the shapes of the batch each stream hands out)
        batch = draw(self)
        shapes["last"] = [tuple(x["input_ids"].shape) for x in batch["inputs"]]
        return batch

    streams.TaskStream.__next__ = recording_draw
    trainer.t0 = time.time()
    plan = [tasks for p in trainer.plans for tasks in p][: args.steps]
    peak, start = resident_memory_mb()["peak_rss_mb"], time.perf_counter()
    for i, tasks in enumerate(plan):
        trainer.train_step(tasks)
        mem = resident_memory_mb()
        if mem["peak_rss_mb"] > peak + 20 or i % 10 == 0:
            print(f"step {i:3d} {','.join(tasks):8} {shapes['last']}  {mem}")
        peak = mem["peak_rss_mb"]
    per_step = (time.perf_counter() - start) / len(plan)
    after = resident_memory_mb()
    release_free_memory()  # (as the trainer does before it evaluates)
    trainer.evaluate()
    print("after one evaluation", resident_memory_mb())
    print(f"rss_mb={after['rss_mb']:.0f} peak_rss_mb={after['peak_rss_mb']:.0f} s_per_step={per_step:.3f}")


if __name__ == "__main__":
    main()
