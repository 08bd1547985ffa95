"""`mtbert report`: an HTML analysis report of one or more runs.

For each run: learning curves (metrics.jsonl), confusion matrices (classification and binary
tasks, with precision / recall / F1 for binary ones), the predicted-vs-gold scatter with its
least-squares line and a rounded-bucket table (score tasks), a t-SNE of the SST sentence vectors,
first-head attention maps of one cross-encoded pair, and the largest errors per task. With several
runs, a comparison table comes first. Predictions come from `mtbert.evaluate`'s predictors on the
same examples as `mtbert evaluate` (same precision, batch size and --limit), so the metrics agree.

Layout: small pure functions compute (confusion_matrix, precision_recall_f1, bucket_table, fit_line,
largest_errors, ...), one function draws each figure (plot_*), `analyse_run` gathers one run's
numbers and figures, `render_html` writes the page, `write_report` ties them together.
"""
from __future__ import annotations

import html
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from mtbert.core.config import resolve_data_dir
from mtbert.core.io import (
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    read_run_text,
    to_json,
)
from mtbert.core.rundir import RunDir
from mtbert.core.runtime import autocast
from mtbert.data.readers import Example, collate, pad
from mtbert.inference.loading import load_predictor
from mtbert.inference.predictor import (
    BasePredictor,
    Predictor,
    load_examples,
    score_outputs,
    task_specs,
)


def log(msg: str) -> None:
    """Progress message on stderr."""
    print(f"report: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pure computations

def confusion_matrix(gold, pred, n_classes: int) -> np.ndarray:
    """Counts [n, n]: rows = gold class, columns = predicted class."""
    gold, pred = np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (gold, pred), 1)
    return cm


def row_normalise(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall of each gold class on the diagonal); empty rows stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


def precision_recall_f1(gold, pred, positive: int = 1) -> dict[str, float]:
    """Precision, recall and F1 of class `positive` (0 where undefined), plus its support."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    tp = int(((pred == positive) & (gold == positive)).sum())
    fp = int(((pred == positive) & (gold != positive)).sum())
    fn = int(((pred != positive) & (gold == positive)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": int((gold == positive).sum())}


def to_buckets(scores, lo: int = 0, hi: int = 5) -> np.ndarray:
    """Scores rounded (half up: 2.5 -> 3) to integer buckets, clipped to [lo, hi]."""
    return np.clip(np.floor(np.asarray(scores, dtype=np.float64) + 0.5), lo, hi).astype(np.int64)


def bucket_table(gold, pred, lo: int = 0, hi: int = 5) -> np.ndarray:
    """Confusion counts of rounded scores: rows = gold bucket lo..hi, columns = predicted bucket."""
    return confusion_matrix(to_buckets(gold, lo, hi) - lo, to_buckets(pred, lo, hi) - lo, hi - lo + 1)


def fit_line(x, y) -> tuple[float, float]:
    """Least-squares line y ≈ slope·x + intercept (slope 0 when x is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = x - x.mean()
    var = float((dx * dx).sum())
    slope = float((dx * (y - y.mean())).sum() / var) if var > 0 else 0.0
    return slope, float(y.mean() - slope * x.mean())


def largest_errors(task, examples: list[Example], out: dict, k: int = 10) -> list[dict]:
    """The k worst dev examples: classification / binary = wrong with the highest confidence in the
    wrong prediction; scores = largest |prediction - gold|."""
    gold = np.array([e.label for e in examples])
    pred, prob = np.asarray(out["pred"]), np.asarray(out["prob"])
    if task.kind.scores:
        err = np.abs(pred.astype(np.float64) - gold.astype(np.float64))
        order = np.argsort(-err, kind="stable")[:k]
        return [{"id": examples[i].id, "texts": list(examples[i].texts), "gold": float(gold[i]),
                 "pred": float(pred[i]), "error": float(err[i])} for i in order]
    if task.kind.positive_class is not None:  # prob is P(positive)
        conf = np.where(pred == task.kind.positive_class, prob, 1.0 - prob)
    else:
        conf = prob[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(pred != gold)
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:k]
    return [{"id": examples[i].id, "texts": list(examples[i].texts), "gold": int(gold[i]),
             "pred": int(pred[i]), "confidence": float(conf[i])} for i in order]


def read_metrics_log(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl rows of the shape the trainer writes (an integer step, a mapping of finite dev
    scores); other lines are skipped. [] if there is none."""
    path = RunDir(run_dir).metrics
    rows = []
    if path.exists():
        for line in read_run_text(path).splitlines():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if _well_formed(row):
                rows.append(row)
    return rows


def _well_formed(row) -> bool:
    def numbers(d):
        return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, (int, float))
                                           and not isinstance(v, bool) for k, v in d.items())
    return isinstance(row, dict) and isinstance(row.get("step"), int) and numbers(row.get("dev", {})) \
        and numbers(row.get("train_loss", {})) and numbers(row.get("task_weights", {}))


def pick_layers(n_layers: int) -> list[int]:
    """A low, a middle and the last layer (distinct, in order)."""
    return sorted({0, n_layers // 2, n_layers - 1})


def sample_indices(n: int, k: int, seed: int = 0) -> np.ndarray:
    """min(n, k) distinct indices in increasing order, drawn with a fixed seed."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE. One OpenMP thread: on a busy machine sklearn's threaded Barnes-Hut spins and runs
    10x slower (500 points: ~3 s single-threaded)."""
    from sklearn.manifold import TSNE
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    with threadpool_limits(1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                    random_state=seed).fit_transform(np.asarray(x, dtype=np.float32))


# ---------------------------------------------------------------- model internals

@torch.inference_mode()
def sentence_embeddings(predictor: Predictor, task_name: str, examples: list[Example]) -> np.ndarray:
    """The pooled sentence vectors the task's head reads (single-sentence tasks), [N, D]."""
    ds = predictor.encode(task_name, examples)
    model = predictor.model.eval()
    vecs = []
    for s in range(0, len(ds), predictor.batch_size):
        batch = collate(ds, list(range(s, min(s + predictor.batch_size, len(ds)))), predictor.pad_id)
        inputs = {k: v.to(predictor.device) for k, v in batch["inputs"][0].items()}
        with autocast(predictor.device, predictor.amp_dtype):
            vecs.append(model.embed(inputs).float().cpu().numpy())
    return np.concatenate(vecs) if vecs else np.zeros((0, 0), dtype=np.float32)


@torch.inference_mode()
def attention_maps(encoder, inputs: dict, layers: list[int], head: int = 0) -> dict[int, np.ndarray]:
    """Attention probabilities of one head at the given layers, {layer: [B, T, T]} (query × key),
    from the encoder's explicit softmax(QKᵀ/√d + mask) path (no autocast; in the encoder's own
    weights: fp32, or bf16 / int8 when the report runs at --precision bf16 / int8)."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = encoder(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"),
                      output_attentions=True)
    finally:
        encoder.train(was_training)
    return {layer: out["attentions"][layer][:, head].float().cpu().numpy() for layer in layers}


def pick_pair(examples: list[Example], tokenizer, lo: int = 8, hi: int = 32) -> tuple[Example, tuple]:
    """A pair whose cross encoding has lo..hi tokens (readable tick labels), else the shortest one."""
    enc = tokenizer.encode_pairs([e.texts[0] for e in examples], [e.texts[1] for e in examples])
    for e, x in zip(examples, enc):
        if lo <= len(x[0]) <= hi:
            return e, x
    i = min(range(len(enc)), key=lambda j: len(enc[j][0]))
    return examples[i], enc[i]


# ---------------------------------------------------------------- figures (one function each)

def _figure(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _save(fig, path: Path) -> str:
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(path, png.getvalue())
    return path.name


def plot_learning_curves(rows: list[dict], path: Path, title: str, specs: dict | None = None) -> str:
    """One panel per task (dev metric; train loss on a second axis) and one for the overall score."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r.get("dev", {})) if k != "overall"]
    panels = keys + ["overall"]
    fig = _figure(4.2 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels):
        pts = [(r["step"], r["dev"][key]) for r in rows if key in r.get("dev", {})]
        metric = specs[key].main_metric if key in (specs or {}) else "score"
        if pts:
            ax.plot(*zip(*pts), "o-", color="C0", label=f"dev {metric}")
        ax.set_title(f"{key}: dev {metric}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"dev {metric}", color="C0")
        ax.grid(alpha=0.3)
        losses = [(r["step"], r["train_loss"][key]) for r in rows if key in (r.get("train_loss") or {})]
        if losses:
            ax2 = ax.twinx()
            ax2.plot(*zip(*losses), "s--", color="C1", label="train loss")
            ax2.set_ylabel("train loss", color="C1")
    fig.suptitle(title)
    return _save(fig, path)


def plot_compare_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> str:
    """Dev overall score against step, one line per run."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("dev overall")
    ax.set_title("dev overall score per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _matrix(ax, m, labels, title, fmt, ylabel="gold", xlabel="predicted"):
    im = ax.imshow(m, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    hi = m.max() if m.size and m.max() > 0 else 1
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, fmt(v), ha="center", va="center", fontsize=8, color="white" if v > 0.6 * hi else "black")
    return im


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> str:
    """Counts and row-normalised matrix side by side."""
    fig = _figure(11, 4.8)
    a, b = fig.subplots(1, 2)
    fig.colorbar(_matrix(a, cm, labels, "counts", lambda v: str(int(v))), ax=a, shrink=0.8)
    fig.colorbar(_matrix(b, row_normalise(cm), labels, "row-normalised (recall per gold class)",
                         lambda v: f"{v:.2f}"), ax=b, shrink=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_scatter(gold, pred, slope: float, intercept: float, path: Path, title: str, r: float) -> str:
    """Predicted against gold scores with the least-squares line and the identity."""
    gold, pred = np.asarray(gold, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    fig = _figure(6, 5.5)
    ax = fig.subplots()
    ax.scatter(gold, pred, s=10, alpha=0.5, label="dev examples")
    lo, hi = min(gold.min(), pred.min(), 0.0), max(gold.max(), pred.max(), 5.0)
    xs = np.array([lo, hi])
    ax.plot(xs, slope * xs + intercept, color="C3", label=f"fit: pred = {slope:.3f}·gold + {intercept:.3f}")
    ax.plot(xs, xs, ":", color="grey", label="pred = gold")
    ax.set_xlabel("gold score")
    ax.set_ylabel("predicted score")
    ax.set_title(f"{title} (Pearson r = {r:.4f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tsne(points: np.ndarray, labels, names: list[str], path: Path, title: str) -> str:
    """2-D t-SNE points coloured by gold class."""
    fig = _figure(7, 6)
    ax = fig.subplots()
    labels = np.asarray(labels)
    for c, name in enumerate(names):
        m = labels == c
        if m.any():
            ax.scatter(points[m, 0], points[m, 1], s=12, alpha=0.75, color=f"C{c}", label=f"{c}: {name}")
    ax.set_title(title)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.legend(fontsize=8, title="gold class")
    return _save(fig, path)


def plot_attention(tokens: list[str], maps: dict[int, np.ndarray], path: Path, title: str) -> str:
    """One heatmap per layer (query rows, key columns), tokens as tick labels."""
    n = len(tokens)
    side = max(4.0, 0.22 * n + 1.5)
    fig = _figure((side + 0.9) * len(maps), side + 0.5)  # square maps + colorbar + token labels
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (layer, m) in zip(axes, maps.items()):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(float(m.max()), 1e-6))
        ax.set_xticks(range(n), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(n), tokens, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(f"layer {layer + 1}, head 1")
        fig.colorbar(im, ax=ax, shrink=0.7)
    fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------- one run

def run_names(run_dirs: list[str]) -> list[str]:
    """Display names (RunDir.label: the run's name, `-epochN` for a kept epoch), made unique."""
    names, seen = [], {}
    for d in run_dirs:
        p = Path(d).resolve()
        name = RunDir.label(p)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}  # (a run file of another shape: shown as absent)


def _read_json(path: Path) -> dict:
    return _mapping(read_json(path)) if path.exists() else {}


def analyse_task(task, examples: list[Example], out: dict, out_dir: Path, prefix: str, top: int) -> dict:
    """Numbers, figures and worst errors of one task."""
    gold = np.array([e.label for e in examples])
    res = {"kind": task.kind.name, "n": len(examples), "errors": largest_errors(task, examples, out, top)}
    if task.kind.scores:
        lo, hi = (int(round(v)) for v in (task.label_range or (0, 5)))
        slope, intercept = fit_line(gold, out["pred"])
        r = task.metric(out["pred"], gold)
        res.update(slope=slope, intercept=intercept, bucket_range=[lo, hi],
                   buckets=bucket_table(gold, out["pred"], lo, hi).tolist())
        res["figures"] = {"scatter": plot_scatter(gold, out["pred"], slope, intercept,
                                                  out_dir / f"{prefix}{task.name}-scatter.png",
                                                  f"{task.name}: predicted vs gold", r)}
        return res
    labels = list(task.label_names or [str(i) for i in range(task.num_labels)])
    cm = confusion_matrix(gold, out["pred"], task.num_labels)
    res.update(labels=labels, confusion=cm.tolist(), confusion_normalised=row_normalise(cm).tolist())
    res["per_class"] = {labels[c]: precision_recall_f1(gold, out["pred"], c) for c in range(task.num_labels)}
    if task.kind.positive_class is not None:  # the positive class's numbers at top level
        res.update({k: v for k, v in res["per_class"][labels[task.kind.positive_class]].items() if k != "support"})
    res["figures"] = {"confusion": plot_confusion(cm, labels, out_dir / f"{prefix}{task.name}-confusion.png",
                                                  f"{task.name}: confusion matrix ({len(examples)} dev examples)")}
    return res


def analyse_tsne(predictor, examples, task_name, out_dir, prefix, points) -> dict:
    task = predictor.task_spec(task_name)
    idx = sample_indices(len(examples), points)
    sample = [examples[i] for i in idx]
    log(f"embedding {len(sample)} {task_name} sentences for t-SNE...")
    emb = sentence_embeddings(predictor, task_name, sample)
    log("running t-SNE...")
    xy = tsne_2d(emb)
    names = list(task.label_names or [str(i) for i in range(task.num_labels)])
    fig = plot_tsne(xy, [e.label for e in sample], names, out_dir / f"{prefix}{task_name}-tsne.png",
                    f"{task_name}: t-SNE of pooled sentence vectors ({len(sample)} dev sentences)")
    return {"task": task_name, "points": len(sample), "figure": fig}


def analyse_attention(predictor, examples, task_name, out_dir, prefix) -> dict:
    tok = predictor.tokenizer
    ex, (ids, types) = pick_pair(examples, tok)
    inputs = {k: v.to(predictor.device) for k, v in pad([(ids, types)], predictor.pad_id).items()}
    layers = pick_layers(predictor.model.encoder.config.num_hidden_layers)
    maps = {k: v[0] for k, v in attention_maps(predictor.model.encoder, inputs, layers, head=0).items()}
    tokens = [tok.tok.id_to_token(i) or str(i) for i in ids]
    fig = plot_attention(tokens, maps, out_dir / f"{prefix}attention.png",
                         f"first-head attention, {task_name} dev pair {ex.id}")
    return {"task": task_name, "id": ex.id, "texts": list(ex.texts), "layers": [layer + 1 for layer in layers],
            "tokens": tokens, "figure": fig}


def analyse_run(run_dir: str, name: str, prefix: str, out_dir: Path, data_dir=None, limit=None, device="auto",
                precision="auto", batch_size: int = 128, tsne_points: int = 500, top: int = 10) -> dict:
    """Everything the report shows about one run; figures are written to out_dir."""
    run_dir = str(run_dir)
    log(f"loading {run_dir}")
    predictor: BasePredictor = load_predictor(run_dir, device, precision, batch_size)
    ddir = resolve_data_dir(data_dir)  # never the run's own data_dir: a loaded run reads only where the user says
    specs = task_specs(predictor)  # the tasks as this model knows them (another run may define a name otherwise)
    examples = load_examples(specs.values(), ddir, "dev", limit)
    outputs = {}
    for task_name, ex in examples.items():
        log(f"predicting dev ({task_name}, {len(ex)} examples)...")
        outputs[task_name] = predictor.predict(task_name, ex)
    metrics = score_outputs(outputs, examples, specs=specs)
    root = Path(run_dir)
    rows = read_metrics_log(root)
    res = {"name": name, "path": run_dir, "metrics": metrics, "summary": _mapping(RunDir(root).read_summary()),
           "checkpoint": _read_json(RunDir(root).best / "meta.json") or _read_json(root / "meta.json"),
           "figures": {}, "tasks": {}, "notes": [], "specs": specs}
    if rows:
        log("drawing learning curves...")
        res["figures"]["curves"] = plot_learning_curves(rows, out_dir / f"{prefix}curves.png",
                                                        f"{name}: learning curves", specs)
        res["curve"] = [(r["step"], r["dev"]["overall"]) for r in rows if "overall" in r.get("dev", {})]
    else:
        res["notes"].append("no metrics.jsonl: no learning curves")
    for task_name, ex in examples.items():
        log(f"analysing {task_name}...")
        res["tasks"][task_name] = analyse_task(specs[task_name], ex, outputs[task_name], out_dir, prefix, top)
    if isinstance(predictor, Predictor) and predictor.tokenizer is not None:
        # the model's first single-sentence classification task, and its first pair task (its order)
        single = [t for t in examples if not specs[t].is_pair and specs[t].kind.categorical]
        if single and len(examples[single[0]]) >= 5 and tsne_points >= 5:
            res["tsne"] = analyse_tsne(predictor, examples[single[0]], single[0], out_dir, prefix, tsne_points)
        else:
            res["notes"].append("t-SNE skipped: no single-sentence classification task with at least 5 examples")
        pairs = [t for t in examples if specs[t].is_pair]
        if pairs and examples[pairs[0]]:
            log("extracting attention maps...")
            res["attention"] = analyse_attention(predictor, examples[pairs[0]], pairs[0], out_dir, prefix)
        else:
            res["notes"].append("attention map skipped: no sentence-pair task")
    else:
        res["notes"].append("t-SNE and attention maps need a single model (this run is an ensemble)")
    del predictor
    return res


# ---------------------------------------------------------------- HTML

def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (float, np.floating)) else esc(v)


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else fmt(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _img(src: str, alt: str) -> str:
    return f'<figure><img src="{esc(src)}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'


def _metric_columns(runs: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in runs for k in r["metrics"] if k != "overall"))
    return keys + (["overall"] if any("overall" in r["metrics"] for r in runs) else [])


def _metric_label(key: str, runs: list[dict]) -> str:
    spec = next((r["specs"][key] for r in runs if key in r.get("specs", {})), None)
    return f"{key} ({spec.main_metric})" if spec else key


def render_comparison(runs: list[dict]) -> str:
    cols = _metric_columns(runs)
    rows = [[r["name"]] + [r["metrics"].get(k, "–") for k in cols]
            + [_Raw(esc(r["summary"].get(k, "–"))) for k in ("steps", "train_seconds")] for r in runs]
    return _table(["run"] + [_metric_label(k, runs) for k in cols] + ["train steps", "train seconds"], rows,
                  "compare")


def _errors_table(task, errors: list[dict]) -> str:
    names = task.label_names
    cols = [f"sentence {i + 1}" for i in range(len(task.text_columns))] if task.is_pair else ["sentence"]
    if task.kind.scores:
        rows = [[e["id"], *e["texts"], e["gold"], e["pred"], e["error"]] for e in errors]
        return _table(["id", *cols, "gold", "predicted", "|error|"], rows, "errors")
    label = (lambda c: f"{c}: {names[c]}") if names else str  # noqa: E731
    rows = [[e["id"], *e["texts"], label(e["gold"]), label(e["pred"]), e["confidence"]] for e in errors]
    return _table(["id", *cols, "gold", "predicted", "confidence"], rows, "errors")


def render_task(task, t: dict) -> str:
    task_name = task.name
    parts = [f"<h3>{esc(task_name)} ({t['n']} dev examples)</h3>"]
    if task.kind.scores:
        lo, hi = t["bucket_range"]
        parts.append(_img(t["figures"]["scatter"], f"{task_name}: predicted vs gold with least-squares line"))
        parts.append(f"<p>Least-squares line: predicted = {t['slope']:.4f} · gold + {t['intercept']:.4f}</p>")
        parts.append("<p>Bucket table (gold and predicted rounded half up to integers, rows = gold):</p>")
        rows = [[f"gold {lo + i}"] + row + [sum(row)] for i, row in enumerate(t["buckets"])]
        parts.append(_table(["", *[f"pred {b}" for b in range(lo, hi + 1)], "total"], rows, "buckets"))
    else:
        parts.append(_img(t["figures"]["confusion"], f"{task_name}: confusion matrix, counts and row-normalised"))
        rows = [[c, m["precision"], m["recall"], m["f1"], m["support"]] for c, m in t["per_class"].items()]
        if task.kind.positive_class is not None:
            parts.append("<p>Confusion matrix (rows = gold, columns = predicted):</p>")
            parts.append(_table(["", *[f"pred {x}" for x in t["labels"]]],
                                [[f"gold {x}"] + row for x, row in zip(t["labels"], t["confusion"])], "confusion"))
        parts.append(_table(["class", "precision", "recall", "F1", "support"], rows, "prf"))
    what = "largest |prediction − gold|" if task.kind.scores else "wrong predictions with the highest confidence"
    parts.append(f"<h4>Largest errors: {esc(what)}</h4>")
    parts.append(_errors_table(task, t["errors"]) if t["errors"] else "<p>No errors.</p>")
    return "\n".join(parts)


def render_run(r: dict) -> str:
    ck = r.get("checkpoint") or {}
    where = f"; best checkpoint at step {esc(ck['step'])} (epoch {esc(ck.get('epoch', '?'))})" if "step" in ck else ""
    parts = [f'<section id="{esc(_slug(r["name"]))}"><h2>Run {esc(r["name"])}</h2>',
             f"<p>Path: <code>{esc(r['path'])}</code>{where}</p>"]
    parts.append(_table(["task", "dev metric"], [[_metric_label(k, [r]), v] for k, v in r["metrics"].items()],
                        "metrics"))
    for note in r["notes"]:
        parts.append(f'<p class="note">{esc(note)}</p>')
    if "curves" in r["figures"]:
        parts.append("<h3>Learning curves</h3>" + _img(r["figures"]["curves"], f"{r['name']}: dev metrics and train "
                                                                             "losses against step"))
    for task_name, t in r["tasks"].items():
        parts.append(render_task(r["specs"][task_name], t))
    if "tsne" in r:
        s = r["tsne"]
        parts.append(f"<h3>t-SNE of {esc(s['task'])} sentence vectors</h3>"
                     + _img(s["figure"], f"t-SNE of {s['points']} pooled {s['task']} sentence vectors by gold class"))
    if "attention" in r:
        a = r["attention"]
        parts.append(f"<h3>Attention ({esc(a['task'])} pair {esc(a['id'])})</h3>")
        parts.append("<p>" + "<br>".join(esc(x) for x in a["texts"]) + "</p>")
        parts.append(_img(a["figure"], "first head, layers " + ", ".join(map(str, a["layers"]))
                          + ": the pair cross-encoded as one sequence"))
    parts.append("</section>")
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:0.6em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}
th{background:#f0f0f0}figure{margin:1em 0}img{max-width:100%}.note{color:#a50}
table.errors td{max-width:420px}figcaption{font-size:12px;color:#555}"""


def render_html(runs: list[dict], limit, compare_fig: str | None) -> str:
    title = "mtbert analysis report: " + ", ".join(r["name"] for r in runs)
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>",
             f"<p>Dev split, {'all examples' if not limit else f'the first {int(limit)} examples per task'}; "
             "metrics are those of <code>mtbert evaluate</code> on the same examples.</p>",
             "<h2>Comparison</h2>" if len(runs) > 1 else "<h2>Summary</h2>", render_comparison(runs)]
    if compare_fig:
        parts.append(_img(compare_fig, "dev overall score against step, per run"))
    parts += [render_run(r) for r in runs]
    parts.append("</body></html>")
    return "\n".join(parts)


def _jsonable(runs: list[dict], limit) -> dict:
    keep = ("name", "path", "metrics", "summary", "checkpoint", "figures", "tasks", "notes", "tsne", "attention")
    return {"split": "dev", "limit": limit, "runs": [{k: r[k] for k in keep if k in r} for r in runs]}


def write_report(run_dirs: list[str], out: str | Path, data_dir=None, limit=None, device="auto", precision="auto",
                 batch_size: int = 128, tsne_points: int = 500, top: int = 10) -> Path:
    """Analyse each run, write OUT/index.html, OUT/metrics.json and the PNG figures; returns index.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = run_names(list(run_dirs))
    runs = []
    for i, (d, name) in enumerate(zip(run_dirs, names)):
        prefix = f"run{i + 1}-{_slug(name)}-"
        runs.append(analyse_run(d, name, prefix, out, data_dir, limit, device, precision, batch_size, tsne_points, top))
    compare_fig = None
    if len(runs) > 1 and any(r.get("curve") for r in runs):
        compare_fig = plot_compare_curves({r["name"]: r.get("curve", []) for r in runs}, out / "compare-overall.png")
    atomic_write_text(out / "metrics.json", to_json(_jsonable(runs, limit), indent=2))
    index = out / "index.html"
    atomic_write_text(index, render_html(runs, limit, compare_fig))
    log(f"wrote {index}")
    return index
