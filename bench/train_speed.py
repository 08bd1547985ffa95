"""Training speed of a config over a few optimizer steps, without evaluating: examples/s and the
projected time of one epoch (a quick check before a long run).

    python bench/train_speed.py --config configs/base.yaml [--steps 20] [--warmup 3] [--set KEY=VALUE ...]

It builds the run's Trainer (full training sets, the config's schedule, precision and batching),
takes --warmup untimed steps, then times --steps steps. The last line reads
`examples_per_s=.. s_per_step=.. epoch_steps=.. epoch_min=..`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from mtbert.core.config import load_config
from mtbert.training.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg = load_config(args.config, ["train.progress=false", *args.set])
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        trainer = Trainer(cfg, out)
        print(f"built in {time.time() - t0:.0f}s: {trainer.parameter_counts()['total_params'] / 1e6:.0f}M "
              f"parameters, {sum(len(d) for d in trainer.train_sets.values())} training examples, "
              f"threads={trainer.cfg.train.threads or os.cpu_count()}")
        plan = [tasks for p in trainer.plans for tasks in p]
        for tasks in plan[: args.warmup]:
            trainer.train_step(tasks)
        seen, t0 = trainer.examples_seen, time.time()
        timed = plan[args.warmup: args.warmup + args.steps]
        for tasks in timed:
            trainer.train_step(tasks)
        dt = time.time() - t0
        n = trainer.examples_seen - seen
        epoch_steps = len(trainer.plans[0])
        print(f"examples_per_s={n / dt:.2f} s_per_step={dt / len(timed):.2f} epoch_steps={epoch_steps} "
              f"epoch_min={epoch_steps * dt / len(timed) / 60:.0f}")


if __name__ == "__main__":
    main()
