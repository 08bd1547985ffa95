"""Dev metrics and speed of an ONNX export, fp32 against dynamically quantised int8 (and PyTorch).

    python bench/onnx_quality.py RUN_DIR [--export DIR] [--limit N] [--threads N]

Exports RUN_DIR with `mtbert export --format onnx --quantize int8` into DIR (default
RUN_DIR/export-onnx; an existing export there is reused), then evaluates the PyTorch checkpoint
(fp32), the fp32 graphs and the int8 graphs on the same dev examples (`--limit N`: the first N per
task) and prints a markdown table: dev metric per task, overall, examples per second, graph sizes
(all the graph files a variant runs).
The last line reads `int8_minus_fp32_overall=.. int8_speedup=..`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mtbert.apps.export import export_run
from mtbert.core.config import resolve_data_dir
from mtbert.inference.loading import load_predictor
from mtbert.inference.onnx_predictor import OnnxPredictor
from mtbert.inference.onnx_runner import (
    MANIFEST,
    graph_files,
    manifest_variants,
    read_manifest,
)
from mtbert.inference.predictor import evaluate_examples, load_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--export", help="ONNX export directory (default RUN_DIR/export-onnx)")
    ap.add_argument("--limit", type=int, help="first N dev examples per task (default: all)")
    ap.add_argument("--threads", type=int, help="threads for PyTorch and onnxruntime (default: all cores)")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    out = Path(args.export or Path(args.run_dir) / "export-onnx")
    if not (out / MANIFEST).exists():
        export_run(args.run_dir, "onnx", out, quantize="int8")
    manifest = read_manifest(out)
    if "int8" not in manifest_variants(manifest):
        raise SystemExit(f"{out} has no int8 graphs: export again with --quantize int8")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch_predictor = load_predictor(args.run_dir, device="cpu", precision="fp32")
    examples = load_examples(torch_predictor.tasks, resolve_data_dir(args.data_dir or torch_predictor.data_dir),
                             "dev", args.limit)
    n = sum(len(v) for v in examples.values())
    rows = {}
    for name, predictor in (("pytorch fp32", torch_predictor), ("onnx fp32", OnnxPredictor(out, "fp32", args.threads)),
                            ("onnx int8", OnnxPredictor(out, "int8", args.threads))):
        start = time.perf_counter()
        metrics, _ = evaluate_examples(predictor, examples)
        rows[name] = (metrics, n / (time.perf_counter() - start))
    size = {v: sum((out / f).stat().st_size for f in graph_files(manifest, v)) / 2**20 for v in manifest_variants(manifest)}
    keys = list(rows["pytorch fp32"][0])
    print(f"{n} dev examples ({args.limit or 'all'} per task), run {args.run_dir}, export {out}\n")
    print("| model | " + " | ".join(keys) + " | examples/s | graphs MiB |")
    print("|---|" + "---|" * (len(keys) + 2))
    for name, (metrics, speed) in rows.items():
        mib = size.get(name.split()[-1]) if name.startswith("onnx") else None
        print(f"| {name} | " + " | ".join(f"{metrics[k]:.4f}" for k in keys) + f" | {speed:.1f} | "
              + (f"{mib:.1f}" if mib else "—") + " |")
    fp32, int8 = rows["onnx fp32"], rows["onnx int8"]
    key = "overall" if "overall" in fp32[0] else keys[0]
    print(f"\nint8_minus_fp32_{key}={int8[0][key] - fp32[0][key]:+.4f} int8_speedup={int8[1] / fp32[1]:.2f}")


if __name__ == "__main__":
    main()
