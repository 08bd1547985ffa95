"""Which moment of a training run sets its resident-memory peak, and how much of it is live.

    python bench/phase_memory.py [--config configs/default.yaml] [--steps N] [--set KEY=VALUE ...]
                                 [--log FILE]

Runs the recipe's Trainer in this process (to the end, or --steps optimizer steps) and brackets
every training step, evaluation and state save: before each, Linux's peak counter (VmHWM) is reset
to the current resident set (/proc/self/clear_refs), so after it VmHWM is that phase's own peak.
glibc's mallinfo2 adds what the C allocator holds: `live` (blocks in use: tensors, kernel caches,
Python objects) and `heap_free` (freed blocks it keeps in its heaps, resident or not).

Prints every evaluation and save, each step whose peak was over 300 MB above the resident set
before it, and every 100th step; then the 10 highest peaks, and last
`max_phase_peak_mb=.. worst=PHASE@STEP live_mb=.. s_per_step=..` (the highest peak of any phase,
which is the run's peak but for its set-up, before the first step). --log writes every phase as
JSON Lines. The bracketing adds about a millisecond to a step.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from mtbert.core.config import load_config
from mtbert.core.runtime import allocator_memory_mb, resident_memory_mb
from mtbert.training import state, streams
from mtbert.training import trainer as trainer_module
from mtbert.training.trainer import Trainer


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")


class StopRun(Exception):
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, help="stop after this many optimizer steps (default: the whole run)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--log", help="write every phase as a JSON line here")
    args = ap.parse_args()
    try:
        reset_peak()
    except OSError as e:
        sys.exit(f"needs Linux's /proc/self/clear_refs: {e}")
    if not allocator_memory_mb():
        sys.exit("needs glibc's mallinfo2 (glibc >= 2.33)")
    out_dir = tempfile.TemporaryDirectory(prefix="mtbert-phasemem-")
    trainer = Trainer(load_config(args.config, ["train.progress=false"] + args.set), out_dir.name)
    shapes: list = []
    draw = streams.TaskStream.__next__

    def recording_draw(self):  # (the sequence shapes of every batch a step draws)
        batch = draw(self)
        shapes.append([tuple(x["input_ids"].shape) for x in batch["inputs"]])
        return batch

    streams.TaskStream.__next__ = recording_draw
    phases: list[dict] = []

    def bracket(owner, name: str, label: str):
        inner = getattr(owner, name)

        def measured(*a, **kw):
            shapes.clear()
            before = resident_memory_mb()["rss_mb"]
            reset_peak()
            start = time.perf_counter()
            result = inner(*a, **kw)
            now = resident_memory_mb()
            row = {"phase": label, "step": trainer.step, "rss_before_mb": before, "peak_mb": now["peak_rss_mb"],
                   "rss_after_mb": now["rss_mb"], "s": round(time.perf_counter() - start, 3),
                   "shapes": list(shapes), **allocator_memory_mb()}
            phases.append(row)
            if label != "step" or row["peak_mb"] - before > 300 or trainer.step % 100 == 0:
                print(json.dumps(row), flush=True)
            if label == "step" and args.steps and trainer.step >= args.steps:
                raise StopRun
            return result

        setattr(owner, name, measured)

    bracket(trainer, "train_step", "step")
    bracket(trainer, "evaluate", "evaluate")
    bracket(state, "save", "save")
    bracket(trainer_module, "save_checkpoint", "save_best")
    start = time.time()
    try:
        summary = trainer.run()
        print("summary", json.dumps(summary))
    except StopRun:
        pass
    if args.log:
        with open(args.log, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in phases)
    print(f"{len(phases)} phases in {time.time() - start:.0f} s; the 10 highest peaks:")
    for row in sorted(phases, key=lambda r: -r["peak_mb"])[:10]:
        print(json.dumps(row))
    out_dir.cleanup()
    worst = max(phases, key=lambda r: r["peak_mb"])
    steps = [r["s"] for r in phases if r["phase"] == "step"]
    print(f"max_phase_peak_mb={worst['peak_mb']} worst={worst['phase']}@{worst['step']} "
          f"live_mb={worst['live_mb']} s_per_step={sum(steps) / len(steps):.3f}")


if __name__ == "__main__":
    main()
