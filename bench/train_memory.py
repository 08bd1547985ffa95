"""Resident memory of a training run, epoch by epoch.

Runs `mtbert train` in a child process (by default the `make train` recipe, configs/default.yaml)
and reads the memory that the trainer records in every metrics.jsonl row (`memory.rss_mb`, the
resident set at that evaluation, and `memory.peak_rss_mb`, the peak so far). A sampler thread also
polls the child's resident set every 0.5 s, so the peak between evaluations is seen as well.

    python bench/train_memory.py [--config configs/default.yaml] [--set KEY=VALUE ...] [--out DIR]

The last line reads `peak_rss_mb=X growth_from_epoch1=Y` (Y: the largest rise of the per-epoch
resident set over its epoch-1 value, as a fraction; the target is <= 0.10).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="mtbert-mem-")) / "run"
    cmd = [sys.executable, "-m", "mtbert", "train", "--config", args.config, "--out", str(out), "--overwrite",
           "--set", "train.progress=false"] + [x for kv in args.set for x in ("--set", kv)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    child = subprocess.Popen(cmd)
    samples: list[tuple[float, float]] = []

    def sample():
        while child.poll() is None:
            r = rss_mb(child.pid)
            if r is not None:
                samples.append((time.time() - t0, r))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = child.wait()
    sampler.join()
    if rc != 0:
        sys.exit(f"training failed (exit {rc})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{'epoch':>5} {'step':>6} {'elapsed s':>9} {'rss MB':>8} {'peak so far MB':>15} {'sampled max MB':>15}")
    per_epoch, prev_t = [], 0.0
    for row in rows:
        mem = row.get("memory", {})
        window = [r for t, r in samples if prev_t <= t <= row["elapsed_s"] + 30]
        prev_t = row["elapsed_s"]
        sampled = max(window) if window else float("nan")
        per_epoch.append(mem.get("rss_mb", float("nan")))
        print(f"{row['epoch']:>5} {row['step']:>6} {row['elapsed_s']:>9.0f} {mem.get('rss_mb', float('nan')):>8.0f} "
              f"{mem.get('peak_rss_mb', float('nan')):>15.0f} {sampled:>15.0f}")
    peak = max([r for _, r in samples] + [row.get("memory", {}).get("peak_rss_mb", 0) for row in rows])
    base = per_epoch[1] if len(per_epoch) > 1 else per_epoch[0]
    growth = max((r - base) / base for r in per_epoch[1:]) if len(per_epoch) > 1 else 0.0
    print(f"run: {out}  wall {time.time() - t0:.0f} s  samples {len(samples)}")
    print(f"peak_rss_mb={peak:.0f} growth_from_epoch1={growth:.3f}")


if __name__ == "__main__":
    main()
