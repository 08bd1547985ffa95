"""Training and inference throughput of our encoder against transformers.BertModel.

Same weights (the default all-MiniLM-L6-v2 backbone), the same examples in the same order, the
same batch size and the same task heads (our MultitaskModel with the encoder swapped). transformers
gets plain batches padded to their longest member, in fp32, as a typical user feeds it; ours forms
batches its own way (length bucketing) and runs in the precision that training's `auto` picks on
this CPU (core.runtime.auto_precision: bf16 autocast where the CPU computes bf16 natively, AVX-512
BF16 or AMX; fp32 elsewhere). Each variant in between is also timed, so the table shows what every
change bought. A precision this CPU only emulates (bf16 on an AVX2 CPU: 39x slower than fp32) is
never timed: the script says so and why. The matmul peak, and the share of it that training
reaches, are given for the precisions the CPU runs natively only.

    python bench/throughput.py [--examples 480] [--infer-examples 1600] [--batch-size 32] [--threads N]
                               [--compile]

The first lines name the CPU, its class and torch's instruction set; progress goes to stderr as the
script runs (every step count or ~10 s of a long loop). The last line reads `train_ratio=X
infer_ratio=Y`: ours in `auto`'s precision (its best configuration) over transformers fp32.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
import time

import torch

from mtbert.core.config import load_config, resolve_data_dir
from mtbert.core.hardware import detect
from mtbert.core.runtime import AMP_DTYPES, auto_precision, native_precisions
from mtbert.core.tasks import get_task
from mtbert.data.readers import collate, encode_dataset, load_split
from mtbert.modeling.checkpoint import build_model
from mtbert.modeling.encoder import default_backbone_dir
from mtbert.training.optimizer import adamw, parameter_groups


class HFEncoder(torch.nn.Module):
    """transformers.BertModel behind our encoder's call signature."""

    def __init__(self, directory):
        super().__init__()
        from transformers import BertModel
        self.bert = BertModel.from_pretrained(str(directory))
        self.config = self.bert.config

    def forward(self, input_ids, attention_mask, token_type_ids=None, inputs_embeds=None, output_attentions=False):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def batches_in_order(ds, batch_size, bucket: bool, window: int = 50):
    """Consecutive batches of the given example order; with `bucket`, sorted by length inside windows
    of `window` batches (the same examples are processed, grouped by length)."""
    idx = list(range(len(ds)))
    if bucket:
        w = batch_size * window
        idx = [i for s in range(0, len(idx), w) for i in sorted(idx[s: s + w], key=ds.length)]
    return [collate(ds, idx[s: s + batch_size]) for s in range(0, len(idx), batch_size)]


def tokens_in(batches) -> tuple[int, int]:
    real = sum(int(x["attention_mask"].sum()) for b in batches for x in b["inputs"])
    padded = sum(x["input_ids"].numel() for b in batches for x in b["inputs"])
    return real, padded


def encoder_flops_per_token(cfg, seq_len: float) -> float:
    """Forward FLOPs per token: 2 x (weights of the layers) + attention scores and mixing."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return L * (2 * (4 * H * H + 2 * H * I) + 4 * seq_len * H)


def matmul_peak(dtype, n=2048, seconds=1.5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e9


class Progress:
    """`label: i/n` on stderr every `every` seconds of a long loop (flush=True: a slow CPU, or output
    sent to a file, still shows the script is working)."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.last = time.perf_counter()

    def tick(self, done: int) -> None:
        if time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            print(f"    {self.label}: {done}/{self.total}", file=sys.stderr, flush=True)


def timed(label: str, measure):
    """Runs `measure()` (examples/s) between a start and a finish line on stderr."""
    print(f"  {label} ...", file=sys.stderr, flush=True)
    speed = measure()
    print(f"  {label}: {speed:.1f} examples/s", file=sys.stderr, flush=True)
    return speed


def precision_context(precision: str):
    dtype = AMP_DTYPES[precision]
    return (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else contextlib.nullcontext


def time_train(model, task_batches, precision, fused=False, label="train"):
    """`fused`: our trainer's optimizer (training.optimizer.adamw: fused AdamW, its parameter
    groups); otherwise torch's default AdamW, as a transformers user gets it."""
    opt = adamw(parameter_groups(model, 1e-5), 1e-5, 0.01) if fused else torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    ctx, progress = precision_context(precision), Progress(f"{label}, step", len(task_batches))
    n, t0 = 0, None
    for step, (task, batch) in enumerate(task_batches):
        if step == 2:  # two warm-up steps
            n, t0 = 0, time.perf_counter()
        with ctx():
            logits = model(task, batch["inputs"])
        get_task(task).kind.loss(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += len(batch["labels"])
        progress.tick(step + 1)
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def time_infer(model, task, batches, precision, label="infer"):
    model.eval()
    ctx, progress = precision_context(precision), Progress(f"{label}, batch", len(batches))
    for b in batches[:1]:
        with ctx():
            model(task, b["inputs"])
    n, t0 = 0, time.perf_counter()
    for i, b in enumerate(batches):
        with ctx():
            model(task, b["inputs"])
        n += len(b["indices"])
        progress.tick(i + 1)
    return n / (time.perf_counter() - t0)


def describe_cpu(caps, auto: str, why: str, timed_precisions: list[str]) -> None:
    """The machine the numbers belong to, first; and which precisions are timed, and why not the others."""
    onednn = f", ONEDNN_MAX_CPU_ISA={caps.onednn_max_isa}" if caps.onednn_max_isa else ""
    print(f"cpu: {caps.cpu_model}; class {caps.cpu_isa_class}; torch {caps.torch_version} instruction set "
          f"{caps.aten_isa}{onednn}", flush=True)
    print(f"training's auto precision here: {auto} ({why})", flush=True)
    if "bf16" not in timed_precisions:
        print(f"bf16: not timed: {caps.cpu_bf16_reason()}", flush=True)


def training_variants(auto: str, timed_precisions: list[str]) -> list[tuple]:
    """(label, ours?, bucketed?, precision, fused AdamW?, recompute?) in the table's order: each row
    adds one change to the one before; the last two are ours as training runs it, in `auto`'s precision
    (the last: train.checkpoint_above_tokens=1024, which bounds train's memory; its cost)."""
    rows = [("transformers, padded, fp32", False, False, "fp32", False, False),
            ("ours, padded, fp32", True, False, "fp32", False, False),
            ("ours, bucketed, fp32", True, True, "fp32", False, False)]
    if "bf16" in timed_precisions:
        rows.append(("ours, bucketed, bf16 autocast", True, True, "bf16", False, False))
    return rows + [(f"ours, {auto}, fused AdamW", True, True, auto, True, False),
                   (f"ours, {auto}, fused, recompute>1024", True, True, auto, True, True)]


def inference_variants(timed_precisions: list[str]) -> list[tuple]:
    """(label, ours?, sorted?, precision) in the table's order."""
    rows = [("transformers, padded, fp32", False, False, "fp32"),
            ("ours, padded, fp32", True, False, "fp32"),
            ("ours, sorted, fp32", True, True, "fp32")]
    if "bf16" in timed_precisions:
        rows.append(("ours, sorted, bf16 autocast", True, True, "bf16"))
    return rows


def report_peaks(rows, timed_precisions: list[str], flops_per_example: float) -> None:
    """The matmul peak of each precision timed (those the CPU runs natively: an emulated one's 'peak'
    would make any share of it meaningless) and the share of it that training's best row reaches."""
    peaks = {p: matmul_peak(AMP_DTYPES[p] or torch.float32) for p in timed_precisions}
    print("\nmatmul peak (2048^2): " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()))
    achieved = []
    for p, peak in peaks.items():
        gflops = max(v for label, p_, v in rows if p_ == p and label.startswith("ours")) * flops_per_example / 1e9
        achieved.append(f"{p} {gflops:.0f} GFLOP/s ({gflops / peak:.0%} of {p} peak)")
    print("achieved in training (useful FLOPs, real tokens only): " + ", ".join(achieved))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=480, help="training examples per task")
    ap.add_argument("--infer-examples", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true",
                    help="also time ours under torch.compile (inductor, dynamic shapes; compile time excluded)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu, caps = torch.device("cpu"), detect()
    auto, why = auto_precision(cpu, caps)
    timed_precisions = native_precisions(cpu, caps)  # training's: fp32, and bf16 where native
    describe_cpu(caps, auto, why, timed_precisions)
    cfg = load_config("configs/default.yaml", ["model.pooling=cls", "model.pair_encoding={qqp: cross, sts: cross}"])
    data_dir = resolve_data_dir(None)
    ours, tok = build_model(cfg)
    theirs, _ = build_model(cfg)
    theirs.encoder = HFEncoder(default_backbone_dir())
    theirs.load_state_dict(ours.state_dict(), strict=False)  # identical heads
    for m in (ours, theirs):  # dropout off: identical computation, timing only
        m.eval()

    rng = random.Random(0)
    sets = {}
    for name in ("sst", "qqp", "sts"):
        task = get_task(name)
        ex, _ = load_split(task, data_dir, "train")
        rng.shuffle(ex)
        sets[name] = encode_dataset(task, ex[: max(args.examples, args.infer_examples)], tok, "cross")
    train_sets = {n: encode_dataset(ds.task, ds.examples[: args.examples], tok, "cross") for n, ds in sets.items()}

    def interleave(bucket):
        per_task = {n: batches_in_order(ds, args.batch_size, bucket) for n, ds in train_sets.items()}
        return [(n, per_task[n][i]) for i in range(len(per_task["sst"])) for n in per_task]

    plain, bucketed = interleave(False), interleave(True)
    real, padded_plain = tokens_in([b for _, b in plain])
    _, padded_bucket = tokens_in([b for _, b in bucketed])
    print(f"threads={torch.get_num_threads()} batch={args.batch_size} train examples={sum(len(b['labels']) for _, b in plain)}")
    print(f"tokens: real={real} padded-to-longest={padded_plain} ({padded_plain / real:.2f}x) "
          f"bucketed={padded_bucket} ({padded_bucket / real:.2f}x)", flush=True)

    rows = []  # (label, precision, examples/s)
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}

    def reset():
        ours.load_state_dict(base_state)
        theirs.load_state_dict(base_state, strict=False)
        theirs.encoder.bert.load_state_dict(HFEncoder(default_backbone_dir()).bert.state_dict())

    print("training:", file=sys.stderr, flush=True)
    for label, is_ours, bucket, precision, fused, recompute in training_variants(auto, timed_precisions):
        reset()
        model = ours if is_ours else theirs
        model.encoder.checkpoint_above_tokens = 1024 if recompute else None
        batches = bucketed if bucket else plain
        rows.append((label, precision, timed(label, lambda: time_train(model, batches, precision, fused, label))))
    ours.encoder.checkpoint_above_tokens = None
    if args.compile:  # a compiled copy; its first pass (compilation) is not timed
        compiled = copy.deepcopy(ours)
        compiled.encoder.compile(dynamic=True)
        timed("compiling (untimed pass)", lambda: time_train(compiled, bucketed, auto, fused=True, label="compile"))
        compiled.load_state_dict(base_state)
        label = f"ours, {auto}, fused, compile"
        rows.append((label, auto, timed(label, lambda: time_train(compiled, bucketed, auto, fused=True, label=label))))
    print("\ntraining (forward + backward + AdamW step, examples/s):")
    for label, _, v in rows:
        print(f"  {label:<34} {v:8.1f}   x{v / rows[0][2]:.2f}")
    reset()

    infer_rows = []  # (task, unit, label, precision, examples/s)
    print("inference:", file=sys.stderr, flush=True)
    for task in ("sst", "qqp"):
        ds = sets[task]
        ds = encode_dataset(ds.task, ds.examples[: args.infer_examples], tok, "cross")
        plain_b = batches_in_order(ds, args.batch_size, False)
        sorted_b = batches_in_order(ds, args.batch_size, True, window=10 ** 9)  # inference: sort all
        unit = "sentences/s" if task == "sst" else "pairs/s"
        for label, is_ours, sort, precision in inference_variants(timed_precisions):
            model, batches = (ours if is_ours else theirs), (sorted_b if sort else plain_b)
            speed = timed(f"{task} {label}", lambda: time_infer(model, task, batches, precision, f"{task} {label}"))
            infer_rows.append((task, unit, label, precision, speed))
        if args.compile:
            label = f"ours, sorted, {auto} + compile"
            time_infer(compiled, task, sorted_b, auto)
            speed = timed(f"{task} {label}", lambda: time_infer(compiled, task, sorted_b, auto, f"{task} {label}"))
            infer_rows.append((task, unit, label, auto, speed))
    print("\ninference (torch.inference_mode):")
    for task, unit, label, _, v in infer_rows:
        base = next(r[4] for r in infer_rows if r[0] == task)
        print(f"  {task} {label:<30} {v:8.1f} {unit}   x{v / base:.2f}")

    mean_len = real / sum(len(b["labels"]) for _, b in bucketed)
    flops_ex = 3 * encoder_flops_per_token(ours.encoder.config, mean_len) * mean_len  # fwd + bwd ≈ 3x fwd
    report_peaks(rows, timed_precisions, flops_ex)

    # the ratios: ours in auto's precision (its best configuration) over transformers fp32
    train_ratio = max(v for label, p, v in rows if label.startswith("ours") and p == auto) / rows[0][2]
    infer_ratio = min(max(r[4] for r in infer_rows if r[0] == t and r[2].startswith("ours") and r[3] == auto)
                      / next(r[4] for r in infer_rows if r[0] == t) for t in ("sst", "qqp"))
    print(f"\nratios: ours in {auto} (training's auto here) over transformers fp32")
    print(f"train_ratio={train_ratio:.2f} infer_ratio={infer_ratio:.2f}")


if __name__ == "__main__":
    main()
