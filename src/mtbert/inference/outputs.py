"""What inference writes and prints: CS224N-format prediction files and metric tables."""
from __future__ import annotations

from pathlib import Path

from mtbert.core.io import atomic_write_text
from mtbert.core.tasks import get_task
from mtbert.inference.predictor import BasePredictor, load_examples


def write_prediction_files(predictor: BasePredictor, data_dir, out_dir, splits=("dev", "test")) -> list[Path]:
    """{prefix}-{dev|test}-output.csv with the leaderboard's header and `id , value` rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        for name, examples in load_examples(predictor.tasks, data_dir, split).items():
            task = get_task(name)
            out = predictor.predict(name, examples)
            path = out_dir / f"{task.pred_prefix}-{split}-output.csv"
            lines = [f"id \t {task.pred_header} \n"]
            for ex, p in zip(examples, out["pred"]):
                value = f"{float(p):.4f}" if task.metric_name == "pearson" else int(p)
                lines.append(f"{ex.id} , {value} \n")
            atomic_write_text(path, "".join(lines))  # a reader never sees half a file
            written.append(path)
    return written


def format_table(rows: dict[str, float], title: str = "") -> str:
    width = max(len(k) for k in rows) if rows else 4
    lines = ([title] if title else []) + [f"{'task':<{width}}  metric", "-" * (width + 9)]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in rows.items()]
    return "\n".join(lines)
