"""Training and inference throughput of our encoder against transformers.BertModel.

Same weights (the default all-MiniLM-L6-v2 backbone), the same examples in the same order, the
same batch size and the same task heads (our MultitaskModel with the encoder swapped). transformers
gets plain batches padded to their longest member, as a typical user feeds it; ours forms batches
its own way (length bucketing) and may use bf16 autocast. Each variant in between is also timed, so
the table shows what every change bought.

    python bench/throughput.py [--examples 480] [--batch-size 32] [--threads N] [--compile]

The last line reads `train_ratio=X infer_ratio=Y` (ours over transformers, best configuration of ours).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import random
import time

import torch

from mtbert.core.config import load_config, resolve_data_dir
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


def time_train(model, task_batches, amp, fused=False):
    """`fused`: our trainer's optimizer (training.optimizer.adamw: fused AdamW, its parameter
    groups); otherwise torch's default AdamW, as a transformers user gets it."""
    opt = adamw(parameter_groups(model, 1e-5), 1e-5, 0.01) if fused else torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
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
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def time_infer(model, task, batches, amp):
    model.eval()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    for b in batches[:1]:
        with ctx():
            model(task, b["inputs"])
    n, t0 = 0, time.perf_counter()
    for b in batches:
        with ctx():
            model(task, b["inputs"])
        n += len(b["indices"])
    return n / (time.perf_counter() - t0)


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
          f"bucketed={padded_bucket} ({padded_bucket / real:.2f}x)")

    rows = []
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}

    def reset():
        ours.load_state_dict(base_state)
        theirs.load_state_dict(base_state, strict=False)
        theirs.encoder.bert.load_state_dict(HFEncoder(default_backbone_dir()).bert.state_dict())

    for label, model, batches, amp in [("transformers, padded, fp32", theirs, plain, False),
                                       ("ours, padded, fp32", ours, plain, False),
                                       ("ours, bucketed, fp32", ours, bucketed, False),
                                       ("ours, bucketed, bf16 autocast", ours, bucketed, True),
                                       ("ours, bf16, fused AdamW", ours, bucketed, "fused"),
                                       ("ours, bf16, fused, recompute>1024", ours, bucketed, "fused+recompute")]:
        reset()
        # (the last row: make train's memory bound, train.checkpoint_above_tokens=1024; its cost)
        model.encoder.checkpoint_above_tokens = 1024 if amp == "fused+recompute" else None
        rows.append((label, time_train(model, batches, bool(amp), fused=str(amp).startswith("fused"))))
    ours.encoder.checkpoint_above_tokens = None
    if args.compile:  # a compiled copy; its first pass (compilation) is not timed
        compiled = copy.deepcopy(ours)
        compiled.encoder.compile(dynamic=True)
        time_train(compiled, bucketed, True, fused=True)
        compiled.load_state_dict(base_state)
        rows.append(("ours, bf16, fused, compile", time_train(compiled, bucketed, True, fused=True)))
    print("\ntraining (forward + backward + AdamW step, examples/s):")
    for label, v in rows:
        print(f"  {label:<32} {v:8.1f}   x{v / rows[0][1]:.2f}")
    reset()

    infer_rows = []
    for task in ("sst", "qqp"):
        ds = sets[task]
        ds = encode_dataset(ds.task, ds.examples[: args.infer_examples], tok, "cross")
        plain_b = batches_in_order(ds, args.batch_size, False)
        sorted_b = batches_in_order(ds, args.batch_size, True, window=10 ** 9)  # inference: sort all
        unit = "sentences/s" if task == "sst" else "pairs/s"
        for label, model, batches, amp in [("transformers, padded, fp32", theirs, plain_b, False),
                                           ("ours, padded, fp32", ours, plain_b, False),
                                           ("ours, sorted, fp32", ours, sorted_b, False),
                                           ("ours, sorted, bf16 autocast", ours, sorted_b, True)]:
            infer_rows.append((task, unit, label, time_infer(model, task, batches, amp)))
        if args.compile:
            time_infer(compiled, task, sorted_b, True)
            infer_rows.append((task, unit, "ours, sorted, bf16 + compile", time_infer(compiled, task, sorted_b, True)))
    print("\ninference (torch.inference_mode):")
    for task, unit, label, v in infer_rows:
        base = next(r[3] for r in infer_rows if r[0] == task)
        print(f"  {task} {label:<30} {v:8.1f} {unit}   x{v / base:.2f}")

    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    mean_len = real / sum(len(b["labels"]) for _, b in bucketed)
    flops_ex = 3 * encoder_flops_per_token(ours.encoder.config, mean_len) * mean_len  # fwd + bwd ≈ 3x fwd
    best_fp32, best_bf16 = rows[2][1], max(rows[3][1], rows[4][1])
    print(f"\nmatmul peak (2048^2): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    print(f"achieved in training (useful FLOPs, real tokens only): fp32 {best_fp32 * flops_ex / 1e9:.0f} GFLOP/s "
          f"({best_fp32 * flops_ex / 1e9 / peak32:.0%} of fp32 peak), bf16 {best_bf16 * flops_ex / 1e9:.0f} GFLOP/s "
          f"({best_bf16 * flops_ex / 1e9 / peak16:.0%} of bf16 peak)")
    train_ratio = max(v for _, v in rows[1:]) / rows[0][1]
    infer_ratio = min(max(r[3] for r in infer_rows if r[0] == t and not r[2].startswith("transformers"))
                      / next(r[3] for r in infer_rows if r[0] == t) for t in ("sst", "qqp"))
    print(f"train_ratio={train_ratio:.2f} infer_ratio={infer_ratio:.2f}")


if __name__ == "__main__":
    main()
