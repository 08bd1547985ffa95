"""`mtbert` command line: train, evaluate, predict, ensemble, data check, techniques, report, ablate, serve."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from mtbert import __version__
from mtbert.apps.ablate import run_ablation
from mtbert.apps.export import FORMATS, QUANTIZE, export_run
from mtbert.apps.report import write_report
from mtbert.apps.serve import serve
from mtbert.apps.tune import run_tune
from mtbert.core.config import load_config, resolve_data_dir
from mtbert.core.errors import CheckpointError, ConfigError, DataError
from mtbert.core.registry import STAGES
from mtbert.core.tasks import TASKS
from mtbert.data.readers import check_data_dir
from mtbert.inference.ensemble import build_ensemble, format_summary, parse_thresholds
from mtbert.inference.loading import load_predictor
from mtbert.inference.outputs import format_table, write_prediction_files
from mtbert.inference.predictor import evaluate_examples, load_examples
from mtbert.modeling.heads import PAIR_ENCODINGS, PAIR_HEADS
from mtbert.modeling.poolers import POOLERS
from mtbert.training.pretrain import run_pretrain
from mtbert.training.schedules import SCHEDULES
from mtbert.training.state import resume_config
from mtbert.training.techniques import TECHNIQUES
from mtbert.training.trainer import train
from mtbert.training.weightings import WEIGHTINGS


def _data_dir(args, cfg_value=None) -> Path:
    return resolve_data_dir(getattr(args, "data_dir", None) or cfg_value)


def cmd_train(args) -> int:

    if args.resume:  # the run's own config: changing it halfway would not be the same run
        if args.config or args.set or (args.out and Path(args.out).resolve() != Path(args.resume).resolve()):
            raise ConfigError("--resume RUN_DIR continues with RUN_DIR/config.yaml: "
                              "it takes no --config, --set or other --out")
        out, cfg = args.resume, resume_config(args.resume, args.data_dir)
    else:
        if not args.out:
            raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR)")
        overrides = list(args.set or [])
        if args.data_dir:
            overrides.append(f"data.data_dir={args.data_dir}")
        out, cfg = args.out, load_config(args.config or "configs/default.yaml", overrides)
        if os.environ.get("RANK", "0") == "0":  # for the model card of an export
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "command.txt").write_text(shlex.join(["mtbert", *args.argv]) + "\n")
    summary = train(cfg, out, resume=bool(args.resume))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one table
        print(format_table(summary["best_dev"], f"best dev metrics ({out}/best)"))
        print(f"train_seconds={summary['train_seconds']} steps={summary['steps']}")
    return 0


def cmd_pretrain(args) -> int:
    overrides = list(args.set or []) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    summary = run_pretrain(load_config(args.config, overrides), args.out)
    print(f"pretrained {summary['step']} steps in {summary['seconds']}s; final loss {summary['final_loss']}")
    print(f"checkpoint: {summary['checkpoint']}  (fine-tune with --set model.backbone={args.out})")
    return 0


def _load_predictor(args):
    """A Predictor for a run or checkpoint, an EnsemblePredictor for an ensemble directory."""
    return load_predictor(args.run_dir, args.device, args.precision, args.batch_size)


def cmd_evaluate(args) -> int:
    predictor = _load_predictor(args)
    if args.split == "test":
        raise SystemExit("the test-student files have no labels; use `mtbert predict` for them")
    examples = load_examples(predictor.tasks, _data_dir(args, predictor.data_dir), args.split, args.limit)
    metrics, _ = evaluate_examples(predictor, examples)
    print(format_table(metrics, f"{args.split} metrics for {args.run_dir}"))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args) -> int:
    predictor = _load_predictor(args)
    paths = write_prediction_files(predictor, _data_dir(args, predictor.data_dir), args.out)
    for p in paths:
        print(p)
    return 0


def cmd_ensemble(args) -> int:
    summary = build_ensemble(args.run_dirs, args.out, args.data_dir, parse_thresholds(args.threshold), args.device,
                             args.precision, args.batch_size, args.limit)
    print(format_summary(summary, args.out))
    return 0


def cmd_data_check(args) -> int:
    data_dir = _data_dir(args)
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
        print(f"{r['file']:<30} {r['checksum']:<10} {r['rows']:>7} {r['malformed']:>9}"
              + (f"  {r['reasons']}" if r["malformed"] else ""))
        bad |= r["checksum"] != "ok"
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


def cmd_serve(args) -> int:
    serve(args.run_dir, args.host, args.port, max_items=args.max_items, max_chars=args.max_chars,
          max_batch_items=args.max_batch_items, device=args.device, precision=args.precision, batch_size=args.batch_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtbert", description="Multitask BERT fine-tuning toolkit")
    p.add_argument("--version", action="version", version=f"mtbert {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def add_data_dir(sp):
        sp.add_argument("--data-dir", help="directory of the CS224N CSVs (default: $MTBERT_DATA or ../shared/data)")

    def add_runtime(sp):
        sp.add_argument("--device", default="auto")
        sp.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
        sp.add_argument("--batch-size", type=int, default=128)

    def add_config(sp, out_help, example, out_required=True):
        sp.add_argument("--config", default="configs/default.yaml")
        sp.add_argument("--out", required=out_required, help=out_help)
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"override a config key, e.g. {example}")
        add_data_dir(sp)

    t = sub.add_parser("train", help="train a model (under torchrun: data-parallel, one process per device)")
    add_config(t, "run directory", "train.epochs=1", out_required=False)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last saved state (RUN_DIR/last)")
    t.set_defaults(func=cmd_train, config=None)  # None: --resume can tell that no --config was given

    pt = sub.add_parser("pretrain", help="contrastive pre-training stage (SimCSE, MNRL) -> OUT/best")
    add_config(pt, "stage directory; train from it with model.backbone=OUT", "pretrain.lr=1e-5")
    pt.set_defaults(func=cmd_pretrain)

    e = sub.add_parser("evaluate", help="metrics of a run's best checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--limit", type=int, help="first N examples per task (default: all)")
    add_data_dir(e)
    add_runtime(e)
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="CS224N-format prediction files for dev and test-student")
    pr.add_argument("run_dir")
    pr.add_argument("--out", required=True)
    add_data_dir(pr)
    add_runtime(pr)
    pr.set_defaults(func=cmd_predict)

    en = sub.add_parser("ensemble", help="average several runs' predictions into one run directory")
    en.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="member runs (referenced, not copied)")
    en.add_argument("--out", required=True, help="ensemble directory, usable by evaluate and predict")
    en.add_argument("--threshold", action="append", metavar="TASK=VALUE",
                    help="use a member for TASK only if its dev metric >= VALUE (repeatable), e.g. sst=0.53")
    en.add_argument("--limit", type=int, help="dev examples per task for thresholds and metrics (default: all)")
    add_data_dir(en)
    add_runtime(en)
    en.set_defaults(func=cmd_ensemble)

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="verify checksums and count rows / malformed rows")
    add_data_dir(dc)
    dc.set_defaults(func=cmd_data_check)

    ab = sub.add_parser("ablate", help="train the variants of an ablation file and tabulate them")
    ab.add_argument("file", help="configs/ablations/NAME.yaml")
    ab.add_argument("--runs-dir", default="runs/ablations")
    ab.add_argument("--results-dir", default="results/ablations")
    ab.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every variant")
    add_data_dir(ab)
    ab.set_defaults(func=cmd_ablate)

    rp = sub.add_parser("report", help="HTML analysis report: curves, confusion matrices, t-SNE, attention, errors")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs (or checkpoints) to analyse and compare")
    rp.add_argument("--out", required=True, help="report directory: index.html, metrics.json and PNG figures")
    rp.add_argument("--limit", type=int, help="first N dev examples per task (default: all)")
    rp.add_argument("--tsne-points", type=int, default=500, help="SST sentences in the t-SNE plot (default 500)")
    rp.add_argument("--top", type=int, default=10, help="largest errors listed per task (default 10)")
    add_data_dir(rp)
    add_runtime(rp)
    rp.set_defaults(func=cmd_report)

    sv = sub.add_parser("serve", help="HTTP JSON API and web page for a run (or ensemble) directory")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-items", type=int, default=64, help="texts or pairs per request (more: 413)")
    sv.add_argument("--max-chars", type=int, default=20_000, help="characters per text (more: 413)")
    sv.add_argument("--max-batch-items", type=int, default=256,
                    help="items of concurrent requests run together in one predictor call")
    add_runtime(sv)
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="the best checkpoint as a Hugging Face, sentence-transformers or ONNX "
                                       "model, with a model card (README.md)")
    ex.add_argument("run_dir", help="run directory (its best/) or checkpoint directory")
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument("--out", required=True, help="export directory (refused if it exists, unless --force)")
    ex.add_argument("--force", action="store_true", help="replace an existing --out")
    ex.add_argument("--quantize", choices=QUANTIZE, help="onnx: also write dynamically quantised graphs")
    ex.set_defaults(func=cmd_export)

    tu = sub.add_parser("tune", help="hyperparameter search with Optuna over a YAML search space")
    tu.add_argument("space", help="search space file, e.g. configs/tune/small.yaml")
    tu.add_argument("--n-trials", type=int, required=True, help="finished trials the study should hold")
    tu.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    tu.add_argument("--runs-dir", default="runs/tune", help="trials go to RUNS_DIR/NAME/trial-NNN, the study to study.db")
    tu.add_argument("--results-dir", default="results/tune", help="results table: RESULTS_DIR/NAME.md")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every trial")
    add_data_dir(tu)
    tu.set_defaults(func=cmd_tune)

    tq = sub.add_parser("techniques", help="list the available training techniques")
    tq.set_defaults(func=cmd_techniques)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, OSError, ValueError, KeyError) as e:
        print(f"mtbert {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
