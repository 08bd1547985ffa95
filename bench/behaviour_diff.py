"""A behaviour fingerprint of one source tree, to show by `diff` that a refactor changed no result.

For each of a few tiny runs (tests/tiny.yaml on the shared CS224N data, fp32, several schedules,
weightings, pair encodings and techniques), the tree at --src (run as `python -m mtbert.cli` with
PYTHONPATH=SRC) trains the run, evaluates it and writes its CS224N prediction files. The
fingerprint holds what a user sees of each: every metrics.jsonl row (wall-clock and memory fields
dropped), the best dev metrics, the sha256 of the best checkpoint's weights, `mtbert evaluate`'s
output, and the sha256 of every prediction file. Files a newer tree adds (MANIFEST.json, the
int8 check) are left out, so that only shared outputs are compared.

    git worktree add /tmp/before <commit before the refactor>
    python bench/behaviour_diff.py --src /tmp/before/src --out /tmp/before.json
    python bench/behaviour_diff.py --src src --out /tmp/after.json
    diff /tmp/before.json /tmp/after.json && echo identical

Both must run on the same CPU class: fp32 kernels sum in another order elsewhere (test_golden.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "tests" / "tiny.yaml"
VOLATILE = {"elapsed_s", "memory", "time_s", "wall_s", "seconds"}  # differ run to run, whatever the code

RUNS = {
    "interleaved": ["train.max_steps=8"],
    "annealed_pcgrad_smart": ["train.max_steps=8", "train.schedule=annealed",
                              "techniques={pcgrad: {}, smart: {weight: 1.0}}"],
    "crosscos_uncertainty": ["train.max_steps=8", "train.weighting=uncertainty",
                             "model.pair_encoding={qqp: cross+cos, sts: cross+cos}"],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(src: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-m", "mtbert.cli", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mtbert {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def stable(row):
    if isinstance(row, dict):
        return {k: stable(v) for k, v in row.items() if k not in VOLATILE}
    return row


def fingerprint(src: Path, name: str, overrides: list[str], work: Path) -> dict:
    run, preds = work / name, work / f"{name}-predictions"
    sets = [a for o in overrides + ["train.progress=false", "train.precision=fp32"] for a in ("--set", o)]
    cli(src, "train", "--config", str(TINY), "--out", str(run), *sets)
    rows = [stable(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "summary.json").read_text())
    evaluation = cli(src, "evaluate", str(run)).replace(str(work), "<work>")  # (a fresh temporary folder each time)
    cli(src, "predict", str(run), "--out", str(preds))
    return {"metrics_rows": rows, "best_dev": summary.get("best_dev"),
            "best_weights_sha256": sha256(run / "best" / "model.safetensors"),
            "evaluate_output": evaluation.splitlines(),
            "prediction_files": {p.name: sha256(p) for p in sorted(preds.glob("*.csv"))}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True, help="the tree's src/ folder (PYTHONPATH of the runs)")
    ap.add_argument("--out", required=True, help="where the fingerprint JSON goes")
    args = ap.parse_args()
    if "MTBERT_DATA" not in os.environ:
        raise SystemExit("set MTBERT_DATA to the CS224N data folder")
    src = Path(args.src).resolve()
    result = {}
    with tempfile.TemporaryDirectory(prefix="mtbert-behaviour-") as work:
        for i, (name, overrides) in enumerate(RUNS.items(), 1):
            start = time.time()
            result[name] = fingerprint(src, name, overrides, Path(work))
            print(f"[{i}/{len(RUNS)}] {name}: {time.time() - start:.0f}s", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
