"""Time per training step of each technique relative to plain training (MiniLM backbone, quick data).

    python bench/technique_cost.py [--steps 8] [--only pcgrad smart ...]

Each variant builds a Trainer from configs/quick.yaml with the technique switched on, runs two
warm-up steps, then times `--steps` optimizer steps (interleaved schedule: one batch of each of the
three tasks per step, batch 32, fp32). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mtbert.core.config import load_config
from mtbert.training.trainer import Trainer

VARIANTS = {
    "plain": [],
    "pcgrad": ["techniques={pcgrad: {}}"],
    "smart": ["techniques={smart: {weight: 1.0, steps: 1}}"],
    "bregman": ["techniques={bregman: {mu: 1.0, beta: 0.75}}"],
    "llrd": ["techniques={llrd: {decay: 0.9}}"],
    "uda": ["techniques={uda: {}}"],
    "lora (r8)": ["techniques={lora: {rank: 8}}"],
    "lora_experts (r8)": ["techniques={lora_experts: {rank: 8}}"],
    "bi-encoder pairs": ["model.pair_encoding={qqp: bi, sts: bi}"],
    "cross+cos pairs": ["model.pair_encoding={qqp: cross+cos, sts: cross+cos}"],
    "mean+cnn+bilstm pooling": ["model.pooling=mean+cnn+bilstm"],
    "bf16 autocast": ["train.precision=bf16"],
}


def time_steps(overrides, steps):
    cfg = load_config("configs/quick.yaml", ["train.progress=false", "train.precision=fp32", *overrides])
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d)
        plan = [s for epoch in tr.plans for s in epoch]
        for tasks in plan[:2]:
            tr.train_step(tasks)
        t0 = time.perf_counter()
        for tasks in plan[2: 2 + steps]:
            tr.train_step(tasks)
        return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.manual_seed(0)
    names = ["plain"] + [n for n in VARIANTS if n != "plain" and (not args.only or n in args.only)]
    base = None
    print("| variant | s/step | relative to plain |\n|---|---|---|")
    for name in names:
        t = time_steps(VARIANTS[name], args.steps)
        base = base or t
        print(f"| {name} | {t:.2f} | {t / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
