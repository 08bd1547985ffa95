"""Where the time of our fp32 encoder goes, op by op, against ONNX Runtime's fp32 graph.

    python bench/kernel_gap.py [RUN_DIR] [--limit 256] [--batch-size 32] [--threads N] [--export DIR]
                               [--precision fp32]

Both run the same SST dev sentences in the same length-sorted batches (model calls only). Ours is
profiled with torch.profiler (self time per aten op); ONNX Runtime with its own profiler
(SessionOptions.enable_profiling: kernel time per node, summed by op type, after the graph
optimiser's fusions: SkipLayerNormalization = residual add + LayerNorm, BiasGelu = bias add +
GELU, FusedMatMul = MatMul with a folded transpose / scale). The export (`mtbert export --format
onnx`) is reused from --export (default RUN_DIR/export-onnx) or written there once. ONNX Runtime's
speed is the sst task's whole call (encoder graph, then head graph); its profile is the encoder
graph's (the head is one linear layer). --precision profiles one of our other precisions (bf16,
int8) against the same ONNX Runtime fp32 graph.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mtbert.core.config import resolve_data_dir
from mtbert.data.readers import collate
from mtbert.inference.loading import load_predictor
from mtbert.inference.onnx_runner import INPUT_KEYS, MANIFEST, OnnxModel
from mtbert.inference.predictor import load_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", default="runs/default")
    ap.add_argument("--limit", type=int, default=256, help="SST dev sentences (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--export", help="ONNX export directory (default RUN_DIR/export-onnx)")
    ap.add_argument("--precision", default="fp32", help="our precision to profile (default fp32)")
    ap.add_argument("--rows", type=int, default=15, help="ops listed per table")
    args = ap.parse_args()
    try:
        import onnxruntime as ort
    except ImportError:
        raise SystemExit("bench/kernel_gap.py needs onnxruntime: pip install 'mtbert[export]'") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    predictor = load_predictor(args.run_dir, device="cpu", precision=args.precision)
    model = predictor.model.eval()
    examples = load_examples(["sst"], resolve_data_dir(predictor.data_dir), "dev", args.limit)["sst"]
    ds = predictor.encode("sst", examples)
    order = sorted(range(len(ds)), key=ds.length)
    batches = [collate(ds, order[s: s + args.batch_size], predictor.pad_id) for s in range(0, len(order), args.batch_size)]
    export_dir = Path(args.export or Path(args.run_dir) / "export-onnx")
    if not (export_dir / MANIFEST).exists():
        from mtbert.apps.export import export_run
        export_run(args.run_dir, "onnx", export_dir, quantize="int8")
    runner = OnnxModel(export_dir, "fp32", threads)
    batch_feeds = [[{k: b["inputs"][0][k].numpy() for k in INPUT_KEYS}] for b in batches]
    # the profiled graph: the encoder sst runs (its head, one small graph more, is timed but not
    # profiled), or sst's own full graph in an export written before the encoder was stored once
    manifest = runner.manifest
    if manifest["format"] == 1:
        graph, prefix, output = manifest["variants"]["fp32"]["sst"], "text_", "logits"
    else:
        graph, prefix, output = manifest["encoders"]["fp32"][manifest["tasks"]["sst"]["encoder"]], "", "vec"
    graph = export_dir / graph
    feeds = [{prefix + k: v for k, v in f[0].items()} for f in batch_feeds]

    def ours():
        for b in batches:
            model("sst", b["inputs"])

    with torch.inference_mode():
        ours()  # warm-up
        start = time.perf_counter()
        ours()
        ours_speed = len(ds) / (time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours()
    print(f"{len(ds)} SST dev sentences, batches of {args.batch_size} sorted by length, {threads} threads\n")
    print(f"ours {args.precision}: {ours_speed:.1f} sentences/s; torch.profiler, self CPU time per op:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    runner.run_batch("sst", batch_feeds[0], ("logits",))  # warm-up
    start = time.perf_counter()
    for f in batch_feeds:
        runner.run_batch("sst", f, ("logits",))
    ort_speed = len(ds) / (time.perf_counter() - start)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        session.run([output], feeds[0])  # profiled too: its time is left out below
        for f in feeds:
            session.run([output], f)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            total[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    all_us = sum(total.values())
    print(f"\nonnxruntime fp32: {ort_speed:.1f} sentences/s; its profiler, kernel time per op type "
          f"(total {all_us / 1e3:.1f} ms):")
    print(f"{'op type':<28}{'ms':>10}{'%':>8}{'calls':>8}")
    for op, us in total.most_common(args.rows):
        print(f"{op:<28}{us / 1e3:>10.1f}{100 * us / all_us:>8.1f}{calls[op]:>8}")
    print(f"\nours_over_ort_fp32={ours_speed / ort_speed:.2f}")


if __name__ == "__main__":
    main()
