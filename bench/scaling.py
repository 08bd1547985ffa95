"""How throughput scales with batch size and sequence length (training and inference), and what a
full default run costs as the training data grows.

    python bench/scaling.py [--config configs/default.yaml] [--plot results/scaling.png] [--steps 3]

Throughput: the config's model (all-MiniLM-L6-v2 by default) on synthetic batches of one
single-sentence task (random token ids, no padding); training is a full step (forward, backward,
fused AdamW) at the config's precision and recomputation budget, inference a forward pass under
torch.inference_mode at the precision `mtbert predict` picks here (--precision auto).
One warm-up step, then the mean of `--steps` timed ones, for batch sizes 8..128 at 32 tokens and
for lengths 16..256 at batch 32.

Cost of a default run at 0.25x, 0.5x and 1x of the training sets (data.train_fraction): the number
of optimizer steps is the schedule's own plan for that fraction (exact); the time is those steps x
the mean time of `--sample-steps` real training steps of the recipe (drawn from its own task
streams), plus one dev evaluation per epoch (timed once). A model, not a run: `make train` (1x)
checks it (RESULTS.md).

The last line reads `train_tokens_per_s_at_b32_t32=.. infer_tokens_per_s_at_b32_t32=..`.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from mtbert.core.config import load_config
from mtbert.core.runtime import autocast, resolve_inference_precision, resolve_precision
from mtbert.inference.predictor import for_precision
from mtbert.modeling.checkpoint import build_model
from mtbert.training.optimizer import adamw, parameter_groups
from mtbert.training.trainer import Trainer

BATCHES = (8, 16, 32, 64, 128)
LENGTHS = (16, 32, 64, 128, 256)


def synthetic_batch(batch: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, length), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}]


def time_steps(fn, steps: int) -> float:
    fn()  # warm-up (first-call allocations, oneDNN kernel choice)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def throughput(model, task, amp, batch: int, length: int, steps: int, train: bool) -> float:
    """Tokens per second."""
    device = torch.device("cpu")
    inputs = synthetic_batch(batch, length, model.encoder.config.vocab_size)
    labels = torch.randint(0, 5, (batch,))
    kind = model.tasks[task].kind
    if train:
        model.train()
        opt = adamw(parameter_groups(model, 1e-5), 1e-5, 0.01)

        def step():
            with autocast(device, amp):
                logits = model(task, inputs)
            kind.loss(logits, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast(device, amp):
                model(task, inputs)
    return batch * length / time_steps(step, steps)


def run_cost(cfg_path: str, fractions, sample_steps: int) -> list[dict]:
    rows, per_step, eval_s = [], None, None
    for fraction in fractions:
        cfg = load_config(cfg_path, [f"data.train_fraction={fraction}", "train.progress=false"])
        trainer = Trainer(cfg, Path(tempfile.gettempdir()) / f"mtbert-scaling-{fraction}", overwrite=True)
        steps = trainer.total_steps
        if per_step is None:  # the per-step cost and an evaluation do not depend on the fraction
            trainer.t0 = time.time()
            plan = [t for p in trainer.plans for t in p][:sample_steps + 2]
            for tasks in plan[:2]:
                trainer.train_step(tasks)
            t0 = time.perf_counter()
            for tasks in plan[2:]:
                trainer.train_step(tasks)
            per_step = (time.perf_counter() - t0) / len(plan[2:])
            t0 = time.perf_counter()
            trainer.evaluate()
            eval_s = time.perf_counter() - t0
        examples = sum(len(ds) for ds in trainer.train_sets.values())
        minutes = (steps * per_step + cfg.train.epochs * eval_s) / 60
        rows.append({"fraction": fraction, "train_examples": examples, "steps": steps, "minutes": minutes})
    print(f"\nper step {per_step:.3f} s (mean of {sample_steps}), one dev evaluation {eval_s:.1f} s")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--plot", default="results/scaling.png")
    ap.add_argument("--skip-cost", action="store_true", help="only the throughput curves")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, [])
    model, _ = build_model(cfg)
    model.encoder.checkpoint_above_tokens = cfg.train.checkpoint_above_tokens  # as the recipe trains
    task = next(t for t in model.tasks if len(model.tasks[t].text_columns) == 1)
    cpu = torch.device("cpu")
    amp = resolve_precision(cfg.train.precision, cpu)
    served = resolve_inference_precision("auto", cpu)  # as evaluate / predict / serve run it
    inference_model, inference_amp = for_precision(copy.deepcopy(model), served, cpu)
    curves = {}
    for train in (True, False):
        mode = "training" if train else "inference"
        m, a = (model, amp) if train else (inference_model, inference_amp)
        curves[mode, "batch"] = [throughput(m, task, a, b, 32, args.steps, train) for b in BATCHES]
        curves[mode, "length"] = [throughput(m, task, a, 32, n, args.steps, train) for n in LENGTHS]
    print(f"{cfg.model.backbone}, task {task}, training precision {cfg.train.precision} (recompute above "
          f"{cfg.train.checkpoint_above_tokens} tokens), inference precision {served}, "
          f"{torch.get_num_threads()} threads; tokens/s (examples/s)")
    for (mode, axis), values in curves.items():
        xs = BATCHES if axis == "batch" else LENGTHS
        per_example = [v / (32 if axis == "batch" else x) for v, x in zip(values, xs)]
        print(f"  {mode:9} by {axis:6}: " + "  ".join(
            f"{x}: {v:,.0f} ({e:.1f})" for x, v, e in zip(xs, values, per_example)))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, axis, xs, label in ((axes[0], "batch", BATCHES, "batch size (32 tokens)"),
                                    (axes[1], "length", LENGTHS, "sequence length (batch 32)")):
            for mode in ("training", "inference"):
                ax.plot(xs, curves[mode, axis], marker="o", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel(label)
            ax.set_ylabel("tokens / s")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{cfg.model.backbone} ({cfg.train.precision}), {torch.get_num_threads()} CPU threads")
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    if not args.skip_cost:
        print("\n| training data | train examples | steps | estimated minutes |\n|---|---|---|---|")
        for row in run_cost(args.config, (0.25, 0.5, 1.0), args.sample_steps):
            print(f"| {row['fraction']:g}x | {row['train_examples']:,} | {row['steps']:,} | {row['minutes']:.1f} |")
    print(f"train_tokens_per_s_at_b32_t32={curves['training', 'batch'][2]:.0f} "
          f"infer_tokens_per_s_at_b32_t32={curves['inference', 'batch'][2]:.0f}")


if __name__ == "__main__":
    main()
