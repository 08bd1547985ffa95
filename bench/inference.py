"""One inference benchmark: ours in every precision against transformers and ONNX Runtime.

    python bench/inference.py [RUN_DIR] [--batch-size 32] [--threads N] [--limit N] [--repeat R]
                              [--export DIR] [--data-dir DIR]

Every path runs the same trained run (RUN_DIR, default runs/default) on the same dev batches: each
task's dev examples tokenised once by the run's tokenizer, sorted by length and cut into batches of
--batch-size, the same for all paths, with the same thread count (torch.set_num_threads and
onnxruntime's intra_op_num_threads). The paths:

- ours fp32 and ours in every other precision this CPU runs (core.runtime.native_precisions:
  bf16 = bf16 encoder weights where the CPU has AVX-512 BF16 or AMX, int8 = dynamically quantised
  linear layers; see modeling.precision); for comparison, not offered: "ours bf16, weights not
  prepacked" (bf16 weights through plain nn.Linear, which oneDNN reorders on every call) and "ours
  bf16 autocast" (fp32 weights under torch.autocast), what --precision bf16 ran before;
- transformers fp32: transformers' AutoModel holding the run's encoder weights (written with
  modeling.hf_format.save_hf_encoder, as `mtbert export --format hf` does) behind the run's own
  pooler and heads;
- ONNX Runtime fp32 and int8: the run's ONNX export (`mtbert export --format onnx --quantize int8`:
  the encoder stored once plus a small head graph per task, int8 = the encoder through
  onnxruntime.quantization.quantize_dynamic), reused from --export (default RUN_DIR/export-onnx)
  or written there once. A task's call is that task's work alone, as ours is: the encoder on each
  input sequence the task needs, then its head (inference.onnx_runner.OnnxModel.run_batch; an
  export written before the encoder was stored once runs the task's own full graph: the same fp32
  work, but its int8 pair-task graphs were nearly unquantised, so their int8 pair speeds ran at
  fp32's and do not compare with a current export's).

For every path it prints the throughput of each task (model calls only: tokenisation and batching
are shared and excluded; one untimed pass per path first, as a warm-up; then --repeat R rounds in
which every path is timed once in turn, the best of R kept, so that drift of the machine's speed
during the run touches every path alike) and the dev metric of every task plus the run's overall
score, computed from the untimed pass's outputs.
A path is accuracy-preserving when its dev overall is within 0.005 of ours fp32.

The last line reads `ours_over_ort=X infer_ratio=Y auto_over_ort=Z`: our fastest
accuracy-preserving path over ONNX Runtime's fastest accuracy-preserving path (X) and over
transformers fp32 (Y); and (Z) the path that `--precision auto` resolves to for this run
(core.runtime.resolve_inference_precision with the run's int8 check: bf16 where the CPU computes it natively, int8
where the run's own int8 check passed, else fp32), whatever its score, over ONNX Runtime's fastest
accuracy-preserving path in its own terms: the faster of ORT fp32 and ORT int8, int8 counted only
where its dev overall is within 0.005 of ORT fp32's. Z is what a user who leaves the precision
alone gets against a user of ONNX Runtime; the line above the last names the two paths it compares.
Speed is the single-sentence task's throughput (SST: sentences/s), the case the issue's
measurements and the server's p50 are about; the table shows the pair task (QQP, cross-encoded)
beside it, and the ratio on it is printed a few lines above the last.

Progress goes to stderr as it runs (flush=True): a line as each path starts and finishes its
warm-up pass and each timed round (with its throughput), and a line every ~10 s inside a long
pass, so that a slow CPU on full dev sets (over 15 minutes on an AVX2 machine) shows where it is.

onnxruntime (with onnx and onnxscript, to export) and transformers are optional: `pip install
mtbert[export]`; without them the script stops with a one-line message.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtbert.core.config import resolve_data_dir
from mtbert.core.runtime import native_precisions, resolve_inference_precision
from mtbert.data.readers import collate
from mtbert.inference.loading import int8_check_passed, load_predictor
from mtbert.inference.onnx_runner import (
    INPUT_KEYS,
    MANIFEST,
    ExportError,
    OnnxModel,
    manifest_variants,
    read_manifest,
)
from mtbert.inference.predictor import for_precision, load_examples, score_outputs
from mtbert.modeling import hf_format
from mtbert.modeling.precision import encoder_to_bf16

PRESERVING = 0.005  # largest |dev overall - ours fp32| of an accuracy-preserving path
PROGRESS_SECONDS = 10.0  # a progress line at least this often inside a long pass


def say(message: str) -> None:
    """A progress line: stderr, flushed at once (stdout holds the report)."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """`label: i/n batches` every PROGRESS_SECONDS of a long pass."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.last = label, total, time.perf_counter()

    def tick(self, done: int) -> None:
        if time.perf_counter() - self.last >= PROGRESS_SECONDS:
            self.last = time.perf_counter()
            say(f"      {self.label}: {done}/{self.total} batches")


class TransformersEncoder(torch.nn.Module):
    """transformers' AutoModel behind our encoder's call signature (last_hidden_state, pooler_output)."""

    def __init__(self, directory: Path, token_types: bool):
        super().__init__()
        from transformers import AutoModel
        self.model = AutoModel.from_pretrained(str(directory)).eval()
        self.token_types = token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None, inputs_embeds=None, output_attentions=False):
        kw = {"token_type_ids": token_type_ids} if self.token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def require(modules: list[str]) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"bench/inference.py needs {', '.join(missing)} (optional bench dependencies): "
                         f"pip install 'mtbert[export]'")


def torch_runner(model, amp_dtype):
    """task, batch -> fp32 logits [B, out] for one of our (or transformers') models."""
    model.eval()

    @torch.inference_mode()
    def run(task, batch):
        if amp_dtype is None:
            return model(task, batch["inputs"]).float().numpy()
        with torch.autocast("cpu", dtype=amp_dtype):
            return model(task, batch["inputs"]).float().numpy()
    return run


def ort_runner(export_dir: Path, variant: str, threads: int):
    """task, batch -> logits of the export's `variant` (fp32 or int8) in onnxruntime: one task's work
    alone, whatever the export's layout (its encoder on each input sequence of the batch, then the
    task's head; or, in an export written before the encoder was stored once, the task's own graph)."""
    model = OnnxModel(export_dir, variant, threads)

    def run(task, batch):
        return model.run_batch(task, batch["feeds"], ("logits",))["logits"]
    return run


def ort_feeds(batch: dict) -> list[dict[str, np.ndarray]]:
    """The ONNX inputs of one of our batches: the same tensors, as int64 arrays, one dict per slot."""
    return [{key: x[key].numpy().astype(np.int64) for key in INPUT_KEYS} for x in batch["inputs"]]


def first_pass(label: str, run, batches: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    """One untimed pass (the warm-up): the logits per task, in dataset order."""
    say(f"  warm-up (untimed; its outputs are scored): {label} ...")
    start, logits = time.perf_counter(), {}
    for task, bs in batches.items():
        progress, outputs = Progress(f"{label}, {task} warm-up", len(bs)), []
        for i, b in enumerate(bs):
            outputs.append(run(task, b))
            progress.tick(i + 1)
        order = np.concatenate([b["indices"].numpy() for b in bs])
        logits[task] = np.concatenate(outputs)[np.argsort(order)]
    say(f"  warm-up {label}: done in {time.perf_counter() - start:.1f} s")
    return logits


def timed_pass(run, bs: list[dict], task: str, label: str) -> float:
    progress = Progress(f"{label}, {task}", len(bs))
    start = time.perf_counter()
    for i, b in enumerate(bs):
        run(task, b)
        progress.tick(i + 1)  # a clock read per batch: nothing beside a model call
    return sum(len(b["indices"]) for b in bs) / (time.perf_counter() - start)


def time_paths(paths: dict, batches: dict[str, list[dict]], repeat: int,
               units: dict[str, str]) -> dict[str, dict[str, float]]:
    """Examples/s per path and task: the best of `repeat` rounds, each round timing every path once
    in turn, so that a machine slowing down or speeding up during the run affects every path alike."""
    speed = {label: dict.fromkeys(batches, 0.0) for label in paths}
    for r in range(1, repeat + 1):
        for label, run in paths.items():
            say(f"  round {r}/{repeat}: {label} ...")
            this_round = {task: timed_pass(run, bs, task, label) for task, bs in batches.items()}
            say(f"  round {r}/{repeat}: {label}: " + ", ".join(f"{t} {v:.1f} {units[t]}" for t, v in this_round.items()))
            for task, v in this_round.items():
                speed[label][task] = max(speed[label][task], v)
    return speed


def ort_fastest_preserving(rows: dict, key: str, task: str) -> tuple[str, str]:
    """(label, why) of ONNX Runtime's fastest accuracy-preserving path on `task`: the faster of its
    fp32 and int8 graphs, int8 counted only where its dev `key` is within PRESERVING of ORT fp32's
    (judged against its own fp32 graph, as our int8 check is against ours fp32; each path's dev
    score here is computed from its own outputs, rows[label][1])."""
    fp32, int8 = rows["onnxruntime fp32"][1][key], rows["onnxruntime int8"][1][key]
    if abs(int8 - fp32) > PRESERVING:
        return "onnxruntime fp32", f"int8 left out: its {key} {int8:.4f} is not within {PRESERVING} of fp32's {fp32:.4f}"
    label = max(("onnxruntime fp32", "onnxruntime int8"), key=lambda lb: rows[lb][0][task])
    return label, f"the faster of fp32 and int8 (int8 {key} {int8:.4f} within {PRESERVING} of fp32's {fp32:.4f})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", default="runs/default")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="threads for torch and onnxruntime (default: torch's default)")
    ap.add_argument("--limit", type=int, help="first N dev examples per task (default: all)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed rounds over all paths, in turn (the best pass per path and task is kept)")
    ap.add_argument("--export", help="ONNX export directory (default RUN_DIR/export-onnx; written there if missing)")
    ap.add_argument("--data-dir")
    args = ap.parse_args(argv)
    require(["onnxruntime", "onnx", "onnxscript", "transformers"])
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device("cpu")

    base = load_predictor(args.run_dir, device="cpu", precision="fp32", batch_size=args.batch_size)
    # what `auto` resolves to for this run (the loader reads the run's int8 check): its path is timed below
    auto = resolve_inference_precision("auto", torch.device("cpu"), int8_passed=int8_check_passed(args.run_dir))
    say(f"run {args.run_dir}: `auto` resolves to {auto} on this CPU")
    model, scorer = base.model, base.scorer
    examples = load_examples(base.tasks, resolve_data_dir(args.data_dir or base.data_dir), "dev", args.limit)
    datasets = {t: base.encode(t, ex) for t, ex in examples.items()}
    export_dir = Path(args.export or Path(args.run_dir) / "export-onnx")
    if not (export_dir / MANIFEST).exists():
        from mtbert.apps.export import export_run
        print(f"exporting {args.run_dir} to ONNX (fp32 + int8) in {export_dir} ...", file=sys.stderr)
        export_run(args.run_dir, "onnx", export_dir, quantize="int8")

    # the same length-sorted batches for every path
    batches = {}
    for t, ds in datasets.items():
        order = sorted(range(len(ds)), key=ds.length)
        batches[t] = [collate(ds, order[s: s + args.batch_size], base.pad_id)
                      for s in range(0, len(order), args.batch_size)]

    paths = {"ours fp32": torch_runner(model, None)}
    for precision in native_precisions(device, inference=True):
        if precision != "fp32":
            paths[f"ours {precision}"] = torch_runner(*for_precision(copy.deepcopy(model), precision, device))
    if "bf16" in native_precisions(device, inference=True):  # what `bf16` was before, for comparison
        paths["ours bf16, weights not prepacked"] = torch_runner(encoder_to_bf16(copy.deepcopy(model), prepack=False), None)
        paths["ours bf16 autocast"] = torch_runner(model, torch.bfloat16)

    with tempfile.TemporaryDirectory() as tmp:
        hf_format.save_hf_encoder(tmp, model.encoder, base.tokenizer)
        theirs = copy.deepcopy(model)
        theirs.encoder = TransformersEncoder(Path(tmp), model.encoder.family.token_types)
    paths["transformers fp32"] = torch_runner(theirs, None)

    try:
        if "int8" not in manifest_variants(read_manifest(export_dir)):
            raise SystemExit(f"{export_dir} has no int8 graphs: export again with --quantize int8")
        for variant in ("fp32", "int8"):
            paths[f"onnxruntime {variant}"] = ort_runner(export_dir, variant, threads)
    except ExportError as e:
        raise SystemExit(f"bench/inference.py: {e}") from None
    for bs in batches.values():
        for b in bs:
            b["feeds"] = ort_feeds(b)

    units = {t: "pairs/s" if datasets[t].task.is_pair else "sentences/s" for t in batches}
    sizes = {t: len(ds) for t, ds in datasets.items()}
    say(f"{len(paths)} paths: {', '.join(paths)}; dev examples per task {sizes}; {args.repeat} timed round(s)")
    rows, reference = {}, None
    first = {label: first_pass(label, run, batches) for label, run in paths.items()}
    speeds = time_paths(paths, batches, args.repeat, units)
    for label in paths:
        speed, logits = speeds[label], first[label]
        outputs = {t: {"pred": datasets[t].task.kind.predict(torch.from_numpy(lg)).numpy()} for t, lg in logits.items()}
        metrics = score_outputs(outputs, examples, scorer)
        reference = reference or logits
        diff = max(float(np.abs(logits[t] - reference[t]).max()) for t in logits)
        rows[label] = (speed, metrics, diff)
        say(f"  best of {args.repeat}, {label}: " + ", ".join(f"{t} {v:.1f}/s" for t, v in speed.items()))

    tasks = list(batches)
    key = "overall" if "overall" in rows["ours fp32"][1] else tasks[0]
    ref_score = rows["ours fp32"][1][key]
    single = next((t for t in tasks if not datasets[t].task.is_pair), tasks[0])
    pair = next((t for t in tasks if model.pair_encoding[t] == "cross"), None)
    n = {t: len(ds) for t, ds in datasets.items()}
    print(f"\nrun {args.run_dir}; dev examples {n}; batch {args.batch_size}, sorted by length; "
          f"{threads} threads; export {export_dir}\n")
    print("| path | " + " | ".join(f"{t} ex/s" for t in tasks) + " | " + " | ".join(tasks)
          + f" | {key} | Δ{key} | max abs Δlogit | accuracy-preserving |")
    print("|---|" + "---|" * (2 * len(tasks) + 4))
    preserving = {}
    for label, (speed, metrics, diff) in rows.items():
        delta = metrics[key] - ref_score
        keep = abs(delta) <= PRESERVING
        if keep:
            preserving[label] = speed
        print(f"| {label} | " + " | ".join(f"{speed[t]:.1f}" for t in tasks) + " | "
              + " | ".join(f"{metrics[t]:.4f}" for t in tasks)
              + f" | {metrics[key]:.4f} | {delta:+.4f} | {diff:.2g} | {'yes' if keep else 'no'} |")

    def best(prefix: str, task: str) -> tuple[str, float]:
        found = [(label, s[task]) for label, s in preserving.items()
                 if label.startswith(prefix) and not label.endswith("autocast")]  # offered paths only
        return max(found, key=lambda x: x[1]) if found else ("none", float("nan"))

    def ratios(task: str) -> tuple[float, float, str, str]:
        ours, ort = best("ours", task), best("onnxruntime", task)
        return ours[1] / ort[1], ours[1] / rows["transformers fp32"][0][task], ours[0], ort[0]

    if pair is not None:
        x, y, o, r = ratios(pair)
        print(f"\npair task {pair}: ours ({o}) over onnxruntime ({r}) {x:.2f}, over transformers fp32 {y:.2f}")
    x, y, o, r = ratios(single)
    print(f"single-sentence task {single}: fastest accuracy-preserving ours = {o}, onnxruntime = {r}")
    auto_label = f"ours {auto}"  # a path of its own above: auto resolves only to a precision this CPU runs
    ort_label, ort_why = ort_fastest_preserving(rows, key, single)
    z = rows[auto_label][0][single] / rows[ort_label][0][single]
    print(f"auto_over_ort on {single}: {auto_label} (what `auto` resolves to for this run) over {ort_label} "
          f"(onnxruntime's fastest accuracy-preserving path: {ort_why})")
    print(f"ours_over_ort={x:.2f} infer_ratio={y:.2f} auto_over_ort={z:.2f}")


if __name__ == "__main__":
    main()
