"""Inference, dev metrics and CS224N-format prediction files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import EncodedDataset, collate, encode_dataset, load_split
from .runtime import autocast
from .tasks import get_task, overall_score


@torch.inference_mode()
def predict_dataset(model, ds: EncodedDataset, batch_size: int = 128, device=torch.device("cpu"),
                    amp_dtype=None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Predictions, probabilities/scores and raw logits for every example, in dataset order.
    Examples are run sorted by length so each batch carries little padding."""
    model.eval()
    task = ds.task
    order = sorted(range(len(ds)), key=ds.length)
    preds, probs, logits_all = [None] * len(ds), [None] * len(ds), [None] * len(ds)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = collate(ds, idx, pad_id)
        inputs = [{k: v.to(device) for k, v in x.items()} for x in batch["inputs"]]
        with autocast(device, amp_dtype):
            logits = model(task.name, inputs).float()
        p, pr = task.kind.predict(logits).cpu().numpy(), task.kind.probabilities(logits).cpu().numpy()
        lg = logits.cpu().numpy()
        for j, i in enumerate(idx):
            preds[i], probs[i], logits_all[i] = p[j], pr[j], lg[j]
    return {"pred": np.array(preds), "prob": np.array(probs), "logits": np.array(logits_all)}


def metrics_for(model, datasets: dict[str, EncodedDataset], **kw) -> tuple[dict[str, float], dict]:
    """Metric per task (+ overall when sst, qqp and sts are all present) and the raw outputs."""
    metrics, outputs = {}, {}
    for name, ds in datasets.items():
        out = predict_dataset(model, ds, **kw)
        gold = np.array([e.label for e in ds.examples])
        metrics[name] = ds.task.metric(out["pred"], gold)
        outputs[name] = out
    if {"sst", "qqp", "sts"} <= set(metrics):
        metrics["overall"] = overall_score(metrics)
    return metrics, outputs


def encode_split(model, tokenizer, data_dir, split: str, limit=None) -> dict[str, EncodedDataset]:
    sets = {}
    for name in model.tasks:
        task = get_task(name)
        examples, _ = load_split(task, data_dir, split, limit)
        sets[name] = encode_dataset(task, examples, tokenizer, model.pair_encoding.get(name, "cross"))
    return sets


def write_predictions(model, tokenizer, data_dir, out_dir, device, amp_dtype=None, batch_size=128,
                      splits=("dev", "test")) -> list[Path]:
    """{prefix}-{dev|test}-output.csv with the leaderboard's header and `id , value` rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        for name, ds in encode_split(model, tokenizer, data_dir, split).items():
            task = ds.task
            out = predict_dataset(model, ds, batch_size, device, amp_dtype, tokenizer.pad_id)
            path = out_dir / f"{task.pred_prefix}-{split}-output.csv"
            with open(path, "w") as f:
                f.write(f"id \t {task.pred_header} \n")
                for ex, p in zip(ds.examples, out["pred"]):
                    value = f"{float(p):.4f}" if task.metric_name == "pearson" else int(p)
                    f.write(f"{ex.id} , {value} \n")
            written.append(path)
    return written


def format_table(rows: dict[str, float], title: str = "") -> str:
    width = max(len(k) for k in rows) if rows else 4
    lines = ([title] if title else []) + [f"{'task':<{width}}  metric", "-" * (width + 9)]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in rows.items()]
    return "\n".join(lines)
