"""Ensembles of finished runs (papers 002, 004): `mtbert ensemble RUN_DIR... --out DIR`.

For each task the ensemble averages its members' outputs example by example: mean softmax
probabilities (classification, prediction = argmax), mean sigmoid probability (binary, prediction =
prob > 0.5), mean score (regression). Members encode the text themselves, so they may differ in
tokenizer, pair encoding (cross / bi) and heads. With `--threshold TASK=VALUE` a member is used for
a task only if its dev metric for that task is >= VALUE (paper 004: sst 0.53, qqp 0.88, sts 0.87);
when no member reaches it the best member alone is used.

An ensemble directory holds
  ensemble.json  the members (absolute checkpoint paths, model.safetensors checksums, dev metrics),
                 the members used per task, the thresholds and the dev data used
  meta.json      {"ensemble": true, "dev": the ensemble's dev metrics at creation, ...}
  config.yaml    a readable record of how it was built (not a training config)
Members are referenced, not copied: moving, deleting or retraining a member breaks the ensemble,
and loading it then names the member and where it was expected. The ensemble directory itself
can be moved freely. `mtbert evaluate`, `mtbert predict` (and every caller of
`inference.loading.load_predictor`) accept it like a run directory.
"""
from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path

import yaml

from mtbert.core.config import resolve_data_dir
from mtbert.core.errors import CheckpointError, ConfigError
from mtbert.core.io import atomic_write_text, read_json, read_yaml, sha256
from mtbert.core.registry import register_stage
from mtbert.core.rundir import RunDir, check_output_outside
from mtbert.core.runtime import resolve_inference_precision, select_device
from mtbert.core.tasks import get_task, task_from_definition
from mtbert.core.trust import reading_run
from mtbert.inference.predictor import (
    EnsemblePredictor,
    Predictor,
    average_outputs,
    for_precision,
    load_examples,
    score_outputs,
)
from mtbert.modeling.checkpoint import find_checkpoint, load_checkpoint

ENSEMBLE_FILE = "ensemble.json"
FORMAT = "mtbert-ensemble/1"

register_stage("ensemble", "average several runs' probabilities / scores per task, members chosen by "
               "per-task dev thresholds", "002, 004", "mtbert ensemble RUN_DIR... --out RUN_DIR")


def is_ensemble_dir(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def used_members(path: str | Path) -> dict[str, Path]:
    """Name -> checkpoint of the members some task of the ensemble uses, in order ({} if its spec is
    unreadable: load_ensemble then says why)."""
    try:
        spec = json.loads((Path(path) / ENSEMBLE_FILE).read_text())
        records = {r["name"]: Path(r["checkpoint"]) for r in spec["members"]}
        return {m: records[m] for m in dict.fromkeys(m for names in spec["tasks"].values() for m in names)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def member_checkpoints(path: str | Path) -> list[Path]:
    """The checkpoints of the members some task of the ensemble uses ([] if its spec is unreadable)."""
    return list(used_members(path).values())


def parse_thresholds(items: list[str] | None) -> dict[str, float]:
    """["sst=0.53", "qqp=0.88"] -> {"sst": 0.53, "qqp": 0.88}."""
    out = {}
    for item in items or []:
        task, sep, value = item.partition("=")
        try:
            if not sep or not task.strip() or not math.isfinite(float(value)):
                raise ValueError
            out[task.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--threshold expects TASK=VALUE (e.g. sst=0.53), got {item!r}") from None
    return out


def _member_name(path: Path, taken: set[str]) -> str:
    base = RunDir.label(path)
    name, i = base or "member", 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def member_task_signatures(ckpt: Path) -> dict[str, tuple]:
    """What each task of a member checkpoint predicts (kind, number of labels, label names, range),
    read from its model.json and config.yaml without registering anything."""
    spec = read_json(ckpt / "model.json")
    raw = read_yaml(ckpt / "config.yaml")
    declared = raw.get("tasks") if isinstance(raw, dict) and isinstance(raw.get("tasks"), dict) else {}
    signatures = {}
    for name in spec.get("tasks", []) if isinstance(spec, dict) else []:
        with reading_run(ckpt):
            task = task_from_definition(name, declared[name]) if name in declared else get_task(name)
        signatures[name] = (type(task.kind).__name__, task.num_labels, task.label_names, task.label_range)
    return signatures


def check_shared_tasks_agree(members: list[tuple[Path, Path]]) -> None:
    """Members may have different task sets and tokenizers, but a task they share must mean the
    same thing in each: averaging a 2-class head with a 5-class one, or two label orders, would be
    wrong in silence."""
    first: dict[str, tuple[Path, tuple]] = {}
    for src, ckpt in members:
        for task, signature in member_task_signatures(ckpt).items():
            if task in first and first[task][1] != signature:
                other, theirs = first[task]
                raise ConfigError(f"members {other} and {src} define task {task!r} differently "
                                  f"(kind, labels, names or range: {theirs} vs {signature}); an ensemble averages "
                                  f"only the same task")
            first.setdefault(task, (src, signature))


def build_ensemble(members: list[str | Path], out_dir: str | Path, data_dir: str | Path | None = None,
                   thresholds: dict[str, float] | None = None, device: str = "auto", precision: str = "auto",
                   batch_size: int = 128, limit: int | None = None, command: str | None = None) -> dict:
    """Evaluate the members on dev, choose each task's members, write the ensemble directory.
    Returns the content of ensemble.json plus the ensemble's dev metrics ("dev")."""
    thresholds = dict(thresholds or {})
    out = Path(out_dir).resolve()
    if not members:
        raise ConfigError("an ensemble needs at least one member run")
    if find_checkpoint(out, required=False) is not None or RunDir(out).metrics.exists():
        raise ConfigError(f"{out} is a training run; choose a new directory for the ensemble")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_ensemble_dir(out))):
        raise ConfigError(f"{out} holds files that are not an ensemble's; choose a new or empty directory "
                          f"(an earlier ensemble there is replaced)")
    for m in members:
        check_output_outside(out, m)
    resolved, seen = [], {}
    for m in members:
        src = Path(m).resolve()
        if is_ensemble_dir(src):
            raise ConfigError(f"{m} is an ensemble; list its member runs instead")
        ckpt = find_checkpoint(src).resolve()
        if ckpt in seen:
            raise ConfigError(f"{m} and {seen[ckpt]} are the same checkpoint {ckpt}")
        seen[ckpt] = m
        resolved.append((src, ckpt))
    check_shared_tasks_agree(resolved)

    dev_device = select_device(device)
    precision = resolve_inference_precision(precision, dev_device)
    predictors: dict[str, Predictor] = {}
    records = []
    for src, ckpt in resolved:
        name = _member_name(src, set(predictors))
        model, tok, cfg, meta = load_checkpoint(ckpt, device=str(dev_device))
        model, amp = for_precision(model, precision, dev_device)
        predictors[name] = Predictor(model, tok, dev_device, amp, batch_size, name=name,
                                     data_dir=cfg.data.data_dir, meta=meta)
        records.append({"name": name, "source": str(src), "checkpoint": str(ckpt),
                        "sha256": sha256(ckpt / "model.safetensors"), "step": meta.get("step"),
                        "tasks": list(model.tasks)})
    tasks = list(dict.fromkeys(t for p in predictors.values() for t in p.tasks))
    unknown = sorted(set(thresholds) - set(tasks))
    if unknown:
        raise ConfigError(f"--threshold for task(s) {unknown} that no member has; the members' tasks are {tasks}")
    data = resolve_data_dir(str(data_dir) if data_dir else None).resolve()  # (never a member's own data_dir)
    specs = {}  # each task as its (first) member knows it; the members agree (check_shared_tasks_agree)
    for p in predictors.values():
        for t in p.tasks:
            specs.setdefault(t, p.task_spec(t))
    examples = load_examples(list(specs.values()), data, "dev", limit)

    outputs = {name: {t: p.predict(t, examples[t]) for t in p.tasks} for name, p in predictors.items()}
    for rec in records:
        rec["dev"] = score_outputs(outputs[rec["name"]], examples, specs=specs)
    member_dev = {rec["name"]: rec["dev"] for rec in records}
    task_members, fallbacks = {}, {}
    for t in tasks:
        having = [n for n in predictors if t in outputs[n]]
        chosen = [n for n in having if t not in thresholds or member_dev[n][t] >= thresholds[t]]
        if not chosen:
            chosen = [max(having, key=lambda n: member_dev[n][t])]
            fallbacks[t] = chosen[0]
        task_members[t] = chosen
    combined = {t: average_outputs(specs[t], [outputs[n][t] for n in task_members[t]]) for t in tasks}
    metrics = score_outputs(combined, examples, specs=specs)

    spec = {"format": FORMAT, "members": records, "tasks": task_members, "thresholds": thresholds,
            "fallbacks": fallbacks, "data_dir": str(data), "dev_limit": limit,
            "dev_examples": {t: len(examples[t]) for t in tasks}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / ENSEMBLE_FILE, json.dumps(spec, indent=2, default=float))
    atomic_write_text(out / "meta.json", json.dumps(
        {"ensemble": True, "dev": metrics, "members": [r["name"] for r in records],
         "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=float))
    record = {"command": command or "mtbert ensemble " + " ".join(shlex.quote(r["source"]) for r in records)
              + f" --out {shlex.quote(str(out))} --data-dir {shlex.quote(str(data))}"
              + (f" --limit {limit}" if limit else "")
              + "".join(f" --threshold {t}={v}" for t, v in thresholds.items()),
              "members": {r["name"]: r["checkpoint"] for r in records}, "thresholds": thresholds,
              "tasks": task_members, "data_dir": str(data), "dev_limit": limit}
    atomic_write_text(out / "config.yaml", "# mtbert ensemble record (see ensemble.json); not a training config\n"
                      + yaml.safe_dump(record, sort_keys=False, width=1000))
    return {**spec, "dev": metrics}


def load_ensemble(path: str | Path, device, precision: str = "fp32", batch_size: int = 128) -> EnsemblePredictor:
    """The EnsemblePredictor of an ensemble directory; loads only the members some task uses.
    `precision`: a resolved inference precision (core.runtime.resolve_inference_precision)."""
    path = Path(path)
    spec_path = path / ENSEMBLE_FILE
    try:
        spec = json.loads(spec_path.read_text())
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
        records = {r["name"]: r for r in spec["members"]}
        task_members = spec["tasks"]
        if not all(isinstance(r["name"], str) and isinstance(r["checkpoint"], str) for r in records.values()) or \
                not all(isinstance(t, str) and isinstance(m, list) and all(isinstance(x, str) for x in m)
                        for t, m in task_members.items()):
            raise TypeError("members need a name and a checkpoint path; tasks map task names to lists of members")
        if not task_members or not all(task_members.values()):
            raise ValueError("every task needs at least one member, and an ensemble at least one task")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"corrupt ensemble {spec_path}: {e}") from e
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{spec_path}: unknown ensemble format {spec.get('format')!r} (expected {FORMAT})")
    used = list(dict.fromkeys(m for names in task_members.values() for m in names))
    members = {}
    for name in used:
        if name not in records:
            raise CheckpointError(f"corrupt ensemble {spec_path}: task lists name unknown member {name!r}")
        ckpt = Path(records[name]["checkpoint"])
        if find_checkpoint(ckpt, required=False) != ckpt:
            raise CheckpointError(
                f"ensemble {path}: member {name!r} not found at {ckpt} (members are referenced, not copied: "
                f"move the run back, or rebuild the ensemble with `mtbert ensemble`)")
        digest = records[name].get("sha256")
        if digest and sha256(ckpt / "model.safetensors") != digest:
            raise CheckpointError(
                f"ensemble {path}: member {name!r} at {ckpt} changed since the ensemble was built "
                f"(model.safetensors differs); rebuild the ensemble with `mtbert ensemble`")
        model, tok, cfg, mmeta = load_checkpoint(ckpt, device=str(device))
        model, amp = for_precision(model, precision, device)
        members[name] = Predictor(model, tok, device, amp, batch_size, name=name,
                                  data_dir=cfg.data.data_dir, meta=mmeta)
    return EnsemblePredictor(members, task_members, name=str(path), data_dir=spec.get("data_dir"), meta=meta)


def format_summary(summary: dict, out_dir: str | Path = "") -> str:
    """Members used per task, then a dev table with one row per member and one for the ensemble."""
    lines = ["members used per task:"]
    for t, names in summary["tasks"].items():
        note = ""
        if t in summary["thresholds"]:
            thr = summary["thresholds"][t]
            note = (f"  (no member reaches {t} >= {thr}: using the best member alone)" if t in summary["fallbacks"]
                    else f"  (dev {t} >= {thr})")
        lines.append(f"  {t:<8} {', '.join(names)}{note}")
    rows = {r["name"]: r["dev"] for r in summary["members"]}
    rows["ENSEMBLE"] = summary["dev"]
    cols = list(dict.fromkeys(k for m in rows.values() for k in m))
    width = max(len(k) for k in rows)
    n = summary.get("dev_examples", {})
    lines.append(f"dev metrics ({', '.join(f'{t} {k}' for t, k in n.items())} examples)"
                 + (f"; ensemble written to {out_dir}" if out_dir else ""))
    lines.append(f"{'':<{width}}  " + "  ".join(f"{c:>8}" for c in cols))
    for name, m in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{m[c]:>8.4f}" if c in m else f"{'-':>8}" for c in cols))
    return "\n".join(lines)
