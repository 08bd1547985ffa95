"""Ablation runner: named variants of one base config, trained one after another, tabulated.

An ablation file (YAML) names a base config, overrides common to every variant, the training
budget in words, and the variants, each a list of `--set`-style overrides:

    config: ../default.yaml
    budget: "400 steps per variant"
    common: [train.max_steps=400]
    variants:
      cross: []
      bi_concat: ["model.pair_encoding={qqp: bi, sts: bi}"]

Each variant trains into RUNS_DIR/NAME/VARIANT. A variant whose summary.json exists is not run
again, so a stopped ablation continues where it left off (a half-finished variant restarts). A
variant this hardware cannot run natively (bf16 on a CPU without AVX-512 BF16 or AMX) is skipped,
with a row saying why. The table goes to RESULTS_DIR/NAME.md after every variant.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from mtbert.core.config import load_config
from mtbert.core.errors import ConfigError, MtbertError
from mtbert.core.io import atomic_write_text, read_json
from mtbert.core.rundir import RunDir
from mtbert.core.runtime import resolve_precision, select_device
from mtbert.training.trainer import train
from mtbert.training.validate import validate_run


def read_ablation(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"ablation file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: an ablation file must be a mapping (config, common, variants), "
                          f"got {type(spec).__name__}")
    unknown = set(spec) - {"config", "budget", "common", "variants", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    if not isinstance(spec.get("variants"), dict) or not spec["variants"]:
        raise ConfigError(f"{path}: needs a non-empty `variants` mapping of name -> list of overrides")
    if not isinstance(spec.get("config"), str):
        raise ConfigError(f"{path}: needs `config`, the base config file (relative to the ablation file)")
    for name, overrides in [("common", spec.get("common")), *spec["variants"].items()]:
        if overrides is not None and not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
            raise ConfigError(f"{path}: {name} must be a list of KEY=VALUE overrides, got {overrides!r}"[:300])
    return spec


def run_ablation(path: str | Path, runs_dir: str | Path = "runs/ablations", results_dir: str | Path = "results/ablations",
                 extra: list[str] = ()) -> Path:
    path = Path(path)
    spec, name = read_ablation(path), path.stem
    base = (path.parent / spec["config"]).resolve()
    variants = {v: [*(spec.get("common") or []), *(o or []), *extra] for v, o in spec["variants"].items()}
    configs = {v: load_config(base, o) for v, o in variants.items()}
    for variant, cfg in configs.items():  # every variant is checked before any trains
        if not not_native(cfg):
            try:
                validate_run(cfg)
            except MtbertError as e:
                raise ConfigError(f"ablation {name}, variant {variant}: {e}") from e
    rows = []
    for variant, overrides in variants.items():
        cfg = configs[variant]
        reason = not_native(cfg)
        if reason:
            rows.append((variant, overrides, None, reason))
        else:
            out = Path(runs_dir) / name / variant
            summary_path = RunDir(out).summary
            if not summary_path.exists():
                if out.exists():  # interrupted earlier: start this variant again
                    shutil.rmtree(out)
                train(cfg, out)  # the same entry as `mtbert train`
            rows.append((variant, overrides, read_json(summary_path), None))
        table = format_ablation(name, spec, rows)
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(results_dir) / f"{name}.md", table)
    return Path(results_dir) / f"{name}.md"


def not_native(cfg) -> str | None:
    """Why this hardware cannot run the variant natively (its device or precision), or None."""
    try:
        resolve_precision(cfg.train.precision, select_device(cfg.train.device))
    except ValueError as e:
        return str(e)
    return None


def format_ablation(name: str, spec: dict, rows: list) -> str:
    tasks = sorted({t for _, _, s, _ in rows if s for t in s["best_dev"] if t != "overall"})
    head = ["variant", *tasks, "overall", "trainable params", "train s", "examples/s", "overrides"]
    lines = [f"# Ablation: {name}", "", spec.get("description", "").strip(), "",
             f"Base config `{spec['config']}`; budget: {spec.get('budget', 'not stated')}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, overrides, s, skipped in rows:
        if skipped:
            cells = [variant, *("—" for _ in tasks), "—", "—", "—", "—",
                     f"skipped on this machine: {skipped}"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        dev = s["best_dev"]
        speed = s.get("examples_seen", 0) / s["train_seconds"] if s["train_seconds"] else 0.0
        cells = [variant, *(f"{dev[t]:.4f}" if t in dev else "—" for t in tasks),
                 f"{dev['overall']:.4f}" if "overall" in dev else "—", f"{s.get('trainable_params', 0):,}",
                 f"{s['train_seconds']:.0f}", f"{speed:.1f}", " ".join(f"`{o}`" for o in overrides) or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
