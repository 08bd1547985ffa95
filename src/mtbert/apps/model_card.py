"""The model card (README.md) every export writes, in the Hugging Face format: a YAML metadata
header (library, base model, tags, model-index with the dev metrics), then the tasks and labels,
dev metrics, data, training config and command, usage, and intended use and limits."""
from __future__ import annotations

from pathlib import Path

import yaml

from mtbert import __version__
from mtbert.core.rundir import RunDir

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"

QUORA_CAVEAT = (
    "The backbone matters for QQP: all-MiniLM-L6-v2 (the default) and all-mpnet-base-v2 were trained by "
    "their makers on about a billion sentence pairs that include Quora duplicate-question pairs, among other "
    "data. QQP numbers of a model built on them are therefore not comparable with those of papers whose "
    "backbone did not see Quora pairs (e.g. plain BERT-base).")


def title_and_what(task: str, info: dict) -> tuple[str, str]:
    """A task's title and what it is, from its definition's `description:` ("Title: what it is")."""
    title, _, what = (info.get("description") or "").partition(":")
    return (title.strip() or task), what.strip()


def _base_model(cfg: dict) -> str | None:
    model = cfg.get("model") or {}
    if model.get("tiny") is not None:  # random-initialised encoder: there is no base model
        return None
    if model.get("backbone") in ("default", "", None):
        return DEFAULT_BACKBONE
    return None  # a local directory: no hub id to name


def _metrics_rows(dev: dict) -> list[str]:
    return [f"| {k} | {v:.4f} |" for k, v in dev.items() if isinstance(v, (int, float))]


def model_index(name: str, tasks: dict, dev: dict) -> list[dict]:
    results = []
    for task, info in tasks.items():
        if task not in dev:
            continue
        title = title_and_what(task, info)[0]
        results.append({"task": {"type": "sentence-similarity" if info["scores"] else "text-classification",
                                 "name": title},
                        "dataset": {"name": f"{title} (CS224N dev split)", "type": task, "split": "dev"},
                        "metrics": [{"type": info["metric"], "value": round(float(dev[task]), 4),
                                     "name": f"dev {info['metric']}"}]})
    return [{"name": name, "results": results}] if results else []


def render(form, name: str, cfg: dict, tasks: dict, meta: dict, summary: dict | None, command: str,
           usage: str, notes: list[str] = (), kept_epoch: bool = False) -> str:
    """`tasks`: name -> {labels, metric, scores (bool), pair_encoding, files (train/dev/test file names),
    description (the definition's "Title: what it is")}. `kept_epoch`: the checkpoint is one epoch's
    (train.keep_epochs), not the run's best."""
    dev = meta.get("dev") or {}
    base = _base_model(cfg)
    fmt = form.name  # an apps.export.ExportFormat
    header = {"library_name": form.library, "pipeline_tag": form.pipeline_tag, "language": ["en"],
              "tags": ["mtbert", "bert", "multitask", *(["onnx"] if fmt == "onnx" else []),
                       *(["sentence-transformers", "feature-extraction"] if fmt == "sentence-transformers" else [])],
              **({"base_model": base} if base else {}), "model-index": model_index(name, tasks, dev)}
    model, data, train = cfg.get("model", {}), cfg.get("data", {}), cfg.get("train", {})
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"A multitask BERT encoder fine-tuned with mtbert {__version__} on "
             f"{', '.join(title_and_what(t, info)[0] for t, info in tasks.items())}: one shared encoder "
             + ("(random-initialised, `model.tiny`), " if model.get("tiny") is not None else
                f"(backbone `{model.get('backbone')}`{f' = {base}' if base else ''}), ") +
             f"{model.get('pooling')} pooling, one small head per task. Exported as `{fmt}`.", "",
             "## Tasks and labels", "",
             "| task | what | pair encoding | output | labels |", "|---|---|---|---|---|"]
    for t, info in tasks.items():
        labels = ", ".join(f"{i} = {l}" for i, l in enumerate(info["labels"])) or "score"
        lines.append(f"| {t} | {title_and_what(t, info)[1]} | {info['pair_encoding']} | "
                     f"{'score' if info['scores'] else 'class'} ({info['metric']}) | {labels} |")
    lines += ["", "## Dev metrics", "",
              (f"The checkpoint kept at the end of epoch {meta.get('epoch', '?')} (step {meta.get('step', '?')}) "
               "by `train.keep_epochs`; if it was picked for its dev score, these are slightly optimistic. "
               if kept_epoch else
               f"Best checkpoint of the run (step {meta.get('step', '?')}, epoch {meta.get('epoch', '?')}), "
               "chosen on these same dev sets, so they are slightly optimistic. ") +
              "`overall` is the CS224N score "
              "(SST acc + QQP acc + (STS r + 1) / 2) / 3.", "", "| metric | dev |", "|---|---|",
              *_metrics_rows(dev)]
    if summary:
        lines += ["", f"Training: {summary.get('steps')} optimizer steps, {summary.get('train_seconds')} s, "
                      f"{summary.get('examples_seen')} examples seen, "
                      f"{summary.get('trainable_params', 0):,} trainable parameters."]
    lines += ["", "## Data", "",
              "The CS224N default-project files (tab-separated): " +
              "; ".join(f"{t}: `{info['files']['train']}` (train), `{info['files']['dev']}` (dev)"
                        for t, info in tasks.items()) + ".",
              f"Per task and split at most {data.get('limit') or 'all'} examples; a seeded "
              f"{float(data.get('train_fraction', 1.0)):.0%} of each training set. Malformed rows are skipped.",
              "", "## Training", "",
              "Command:", "", "```bash", command, "```", "",
              f"Schedule `{train.get('schedule')}`, weighting `{train.get('weighting')}`, lr {train.get('lr')}, "
              f"batch {data.get('batch_size')} per task, techniques: "
              f"{', '.join(cfg.get('techniques') or {}) or 'none'}. The full resolved config:", "",
              "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "",
              "## Usage", "", usage.strip(), "",
              "## Intended use and limits", "",
              "- Research and teaching: English sentence sentiment (movie reviews), question-paraphrase "
              "detection and sentence similarity, in the domains of the training data. Not evaluated for "
              "other domains or languages, nor for decisions about people.",
              f"- {QUORA_CAVEAT}",
              "- The dev sets were used to pick the checkpoint; report test-set numbers from the CS224N "
              "leaderboard, not these.",
              "- SST labels and STS scores come from crowd judgements and carry their biases; the model can "
              "repeat stereotypes present in the backbone's pre-training data.",
              *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def read_run_files(run_dir: Path, summary: bool = True) -> tuple[dict | None, str | None]:
    """summary.json (if `summary`) and the recorded training command of a run directory (either may
    be missing)."""
    run = RunDir(run_dir)
    return run.read_summary() if summary else None, run.read_command()
