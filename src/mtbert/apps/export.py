"""`mtbert export RUN_DIR --format hf|sentence-transformers|onnx --out DIR`: the run's best
checkpoint in a format other tools load, with a model card.

- hf: a Hugging Face BertModel directory (transformers' AutoModel / AutoTokenizer load it) plus
  the pooler and task heads in mtbert_heads.safetensors (+ mtbert_heads.json), which
  modeling.hf_format.load_hf_export turns back into the full multitask model.
- sentence-transformers: Transformer + Pooling (+ the tanh Dense layer of `cls` pooling): encode()
  gives the run's pooled sentence vectors. Holds `cls` or `mean` pooling only.
- onnx: one graph per task (encoder + that task's head, outputs logits / pred / prob), dynamic
  batch and sequence axes, exported with torch.export; runner.py (inference.onnx_runner) runs it.
  `--quantize int8` adds dynamically quantised copies (TASK.int8.onnx).

Every export is checked against the PyTorch model on sample inputs before it is kept (outputs
within 1e-4, cosine >= 0.9999 for sentence vectors), written to a temporary sibling directory and
renamed into place at the end; an existing output is replaced only with `force`. Ensembles and
models a format cannot hold are refused before anything is written. transformers,
sentence-transformers, onnx, onnxscript and onnxruntime are optional (`pip install mtbert[export]`)
and imported only here, by the format that needs them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
import shlex
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mtbert import __version__
from mtbert.apps import model_card
from mtbert.core.errors import CheckpointError, ConfigError
from mtbert.core.io import replace_dir, temporary_dir, write_json
from mtbert.core.registry import Registry
from mtbert.core.rundir import RunDir
from mtbert.data.readers import pad
from mtbert.data.tokenizer import BertTokenizer
from mtbert.inference.ensemble import is_ensemble_dir
from mtbert.modeling import hf_format
from mtbert.modeling.adapters import merge_lora
from mtbert.modeling.checkpoint import find_checkpoint, load_checkpoint
from mtbert.modeling.model import MultitaskModel
from mtbert.modeling.poolers import POOLERS
from mtbert.training.techniques import TECHNIQUES

log = logging.getLogger("mtbert")

EXPORT_MARKER = "mtbert_export.json"  # in every export: what `--force` may replace
QUANTIZE = ("int8",)
TOLERANCE = 1e-4
# Inputs for the export checks: several lengths, one long enough to be truncated at small max_length.
SAMPLES = ["A gripping, funny and moving film.", "Dull.",
           "How do I learn Python quickly when I already know some Java and a little C?",
           "The plot is thin and the actors seem bored, but the music is lovely and the last twenty "
           "minutes almost make up for everything that came before them.", "Is it going to rain tomorrow?"]
EXTRAS_HINT = "install the export extra: pip install 'mtbert[export]'"


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ConfigError(f"this export format needs `{module}` ({EXTRAS_HINT})") from e


# ---------------------------------------------------------------- checks before writing

def declared_refusal(model: MultitaskModel, fmt: str) -> str | None:
    """Why `fmt` cannot hold `model`, from what its poolers and techniques declare they export to."""
    parts = [(f"pooling {name!r}", POOLERS.get(name)) for name in model.pooling.split("+")]
    parts += [(f"technique {name!r}", TECHNIQUES.get(name)) for name in model.extensions if name in TECHNIQUES]
    for what, part in parts:
        allowed = getattr(part, "exports", FORMATS)
        if fmt not in allowed:
            note = getattr(part, "export_note", "")
            return f"{what} exports to --format {' or '.join(allowed)} only{f' ({note})' if note else ''}"
    return None


def check_exportable(model: MultitaskModel, fmt: str) -> None:
    """Refuse what a format cannot hold, with the alternative."""
    reason = declared_refusal(model, fmt)
    if reason:
        raise CheckpointError(reason)


def single_encoder(model: MultitaskModel) -> MultitaskModel:
    """A copy whose encoder is a plain BertModel: shared LoRA adapters folded into the weights."""
    model = copy.deepcopy(model)
    if "lora" in model.extensions:
        merge_lora(model.encoder)
    return model


# ---------------------------------------------------------------- formats

def _pooled(model: MultitaskModel, tokenizer: BertTokenizer, texts: list[str]) -> torch.Tensor:
    """Our pooled sentence vectors [N, D] (what sentence-transformers' encode must give)."""
    batch = pad(tokenizer.encode(texts), tokenizer.pad_id)
    with torch.inference_mode():
        return model.embed(batch).float()


def write_hf(out: Path, model: MultitaskModel, tokenizer: BertTokenizer, max_length: int, dropout: float) -> str:
    model = single_encoder(model)
    hf_format.save_hf_encoder(out, model.encoder, tokenizer)
    hf_format.save_heads(out, model, dropout, max_length)
    _require("transformers")
    from transformers import AutoModel, AutoTokenizer
    with _quiet():
        theirs, their_tok = AutoModel.from_pretrained(str(out)).eval(), AutoTokenizer.from_pretrained(str(out))
    enc = their_tok(SAMPLES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = model.encoder(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])["last_hidden_state"]
        got = theirs(**enc).last_hidden_state
    _check_close("hf hidden states", got, ref)
    return f"""```python
from transformers import AutoModel, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{out.name}")
encoder = AutoModel.from_pretrained("{out.name}")            # the fine-tuned shared encoder (BertModel)
hidden = encoder(**tok(["A gripping film."], return_tensors="pt")).last_hidden_state

# the full multitask model (pooler + task heads from {hf_format.HEADS_FILE}), with mtbert installed:
from mtbert.modeling.hf_format import load_hf_export
model, tokenizer = load_hf_export("{out.name}")
```"""


def write_sentence_transformers(out: Path, model: MultitaskModel, tokenizer: BertTokenizer, max_length: int) -> str:
    model = single_encoder(model)
    _require("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Pooling,
        Transformer,
    )
    hidden = model.encoder.config.hidden_size
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".hf-") as scratch:
        hf_format.save_hf_encoder(scratch, model.encoder, tokenizer)
        modules = [Transformer(scratch, max_seq_length=max_length), Pooling(hidden, model.pooling)]
        if model.pooling == "cls":  # our `cls` is BERT's pooler: tanh(W h_[CLS] + b)
            pooler = model.encoder.pooler
            modules.append(Dense(hidden, hidden, activation_function=torch.nn.Tanh(),
                                 init_weight=pooler.weight.detach().clone(), init_bias=pooler.bias.detach().clone()))
        SentenceTransformer(modules=modules, device="cpu").save(str(out))
    with _quiet():
        loaded = SentenceTransformer(str(out), device="cpu")
    got = torch.as_tensor(loaded.encode(SAMPLES, convert_to_numpy=True, show_progress_bar=False))
    cos = torch.nn.functional.cosine_similarity(got, _pooled(model, tokenizer, SAMPLES), dim=-1)
    if cos.min() < 0.9999:
        raise CheckpointError(f"sentence-transformers export check failed: cosine {cos.min():.6f} < 0.9999")
    return f"""```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{out.name}")
vectors = model.encode(["A gripping film.", "A moving film."])   # the run's {model.pooling}-pooled sentence vectors
```"""


def _slots(mode: str) -> list[str]:
    """Input sequences of a task graph, by pair encoding (see inference.onnx_runner)."""
    return {"single": ["text"], "cross": ["pair"], "bi": ["a", "b"], "cross+cos": ["pair", "a", "b"]}[mode]


class TaskGraph(torch.nn.Module):
    """One task as a graph: (SLOT ids, mask, types for each slot) -> logits, pred, prob."""

    def __init__(self, model: MultitaskModel, task: str):
        super().__init__()
        self.model, self.task = model, task
        self.n_slots = len(_slots(model.pair_encoding[task]))

    def forward(self, *tensors):
        inputs = [{"input_ids": tensors[3 * k], "attention_mask": tensors[3 * k + 1],
                   "token_type_ids": tensors[3 * k + 2]} for k in range(self.n_slots)]
        logits = self.model(self.task, inputs).float()
        kind = self.model.tasks[self.task].kind
        return logits, kind.predict(logits), kind.probabilities(logits)


def _example_inputs(tokenizer: BertTokenizer, slots: list[str], texts: list[str]) -> tuple[torch.Tensor, ...]:
    a, b = texts, texts[1:] + texts[:1]
    seqs = {"text": lambda: tokenizer.encode(a), "pair": lambda: tokenizer.encode_pairs(a, b),
            "a": lambda: tokenizer.encode(a), "b": lambda: tokenizer.encode(b)}
    out = []
    for slot in slots:
        batch = pad(seqs[slot](), tokenizer.pad_id)
        out += [batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]]
    return tuple(out)


def write_onnx(out: Path, model: MultitaskModel, tokenizer: BertTokenizer, max_length: int,
               quantize: str | None, meta: dict) -> str:
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        _require(mod)
    import onnxruntime as ort
    model = model.eval()
    variants: dict[str, dict[str, str]] = {"fp32": {}}
    tasks = {}
    for task in model.tasks:
        slots = _slots(model.pair_encoding[task])
        graph = TaskGraph(model, task).eval()
        names = [f"{s}_{k}" for s in slots for k in ("input_ids", "attention_mask", "token_type_ids")]
        batch = torch.export.Dim("batch", min=1, max=65536)
        seq = {s: torch.export.Dim(f"{s}_seq", min=1, max=model.encoder.config.max_position_embeddings) for s in slots}
        shapes = tuple({0: batch, 1: seq[s]} for s in slots for _ in range(3))
        example = _example_inputs(tokenizer, slots, SAMPLES[:2])  # other shapes are checked below
        path = out / f"{task}.onnx"
        try:
            with _quiet():
                torch.onnx.export(graph, example, str(path), dynamo=True, input_names=names,
                                  output_names=["logits", "pred", "prob"], dynamic_shapes=(shapes,),
                                  external_data=False, verbose=False)
        except Exception as e:  # e.g. an operation torch.export or ONNX cannot express
            raise CheckpointError(f"task {task}: cannot export to ONNX: {_reason(e)}") from e
        variants["fp32"][task] = path.name
        tasks[task] = {"slots": slots, "inputs": names, "outputs": ["logits", "pred", "prob"],
                       "labels": list(model.tasks[task].label_names or []), "kind": repr(model.tasks[task].kind)}
        checks = [_example_inputs(tokenizer, slots, SAMPLES), _example_inputs(tokenizer, slots, SAMPLES[2:3])]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for inputs in checks:  # batch sizes and lengths unlike the export example's
            with torch.inference_mode():
                ref = graph(*inputs)[0]
            got = session.run(["logits"], {n: t.numpy() for n, t in zip(names, inputs)})[0]
            _check_close(f"onnx {task} logits", torch.from_numpy(got), ref)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            qpath = out / f"{task}.int8.onnx"
            with _quiet():
                quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
            variants.setdefault("int8", {})[task] = qpath.name
            ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"])  # loads
    tokenizer.save(out)
    shutil.copyfile(Path(__file__).resolve().parents[1] / "inference" / "onnx_runner.py", out / "runner.py")
    manifest = {"format": 1, "max_length": max_length, "pad_id": tokenizer.pad_id, "tasks": tasks,
                "variants": variants, "meta": meta}
    (out / "mtbert_onnx.json").write_text(json.dumps(manifest, indent=2, default=float))
    task = next(iter(tasks))
    return f"""Needs only `onnxruntime`, `tokenizers` and `numpy`:

```python
from runner import OnnxModel                 # runner.py in this directory
model = OnnxModel("{out.name}")               # OnnxModel("{out.name}", variant="int8"): quantised graphs{'' if quantize else ' (with --quantize int8)'}
model.predict("{task}", [{'"A gripping film."' if tasks[task]['slots'] == ['text'] else '("How do I cook rice?", "How is rice cooked?")'}])  # {{"pred", "prob", "logits"}}
```

```bash
python runner.py {out.name} {task} {'"A gripping film."' if tasks[task]['slots'] == ['text'] else '"How do I cook rice?" "How is rice cooked?"'}
```

One graph per task ({', '.join(f'`{f}`' for f in variants['fp32'].values())}); inputs
`SLOT_input_ids`, `SLOT_attention_mask`, `SLOT_token_type_ids` (int64, [batch, sequence]) per slot
(`text`; `pair` = [CLS] a [SEP] b [SEP]; `a`, `b` = each sentence alone), outputs `logits`, `pred`, `prob`.
`mtbert_onnx.json` lists the slots of each task."""


def _reason(e: Exception) -> str:
    """One line from torch.export's long report: its exception summary if it has one."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    summary = [ln for ln in lines if ln.startswith("<class ")]
    return (summary[0] if summary else next((ln for ln in lines if ln), type(e).__name__))[:400]


@contextlib.contextmanager
def _quiet():
    """The exporters' progress prints and bars (transformers' "Loading weights" on stderr), warnings
    and log lines: not ours to show (their errors still arrive as exceptions)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _check_close(what: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (got.float() - ref.float()).abs().max().item() if got.shape == ref.shape else float("inf")
    if not diff <= TOLERANCE:
        raise CheckpointError(f"{what} differ from mtbert's by {diff:.3g} (> {TOLERANCE}): export not written")


# ---------------------------------------------------------------- the command

@dataclass(frozen=True)
class ExportFormat:
    """One export format: what loads it (its model card's library and pipeline tag), how it is
    written (returns the card's usage snippet), its notes and the quantisations it takes. What it
    cannot hold is declared by the poolers and techniques themselves (`exports`)."""
    name: str
    library: str
    pipeline_tag: str
    write: Callable[..., str]           # (out, model, tokenizer, cfg, meta, quantize) -> usage
    notes: Callable[[MultitaskModel], list[str]] = lambda model: []
    quantize: tuple[str, ...] = ()


def _merged_lora_note(model: MultitaskModel) -> list[str]:
    return ["Trained with LoRA adapters; they are merged into the exported encoder's weights."] \
        if "lora" in model.extensions else []


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format")
EXPORT_FORMATS.register(ExportFormat(
    "hf", "transformers", "feature-extraction",
    lambda out, model, tok, cfg, meta, quantize: write_hf(out, model, tok, cfg.model.max_length, cfg.model.dropout),
    _merged_lora_note), name="hf")
EXPORT_FORMATS.register(ExportFormat(
    "sentence-transformers", "sentence-transformers", "sentence-similarity",
    lambda out, model, tok, cfg, meta, quantize: write_sentence_transformers(out, model, tok, cfg.model.max_length),
    lambda model: _merged_lora_note(model) + [
        "Sentence vectors only: the task heads are not part of this format (use the hf export)."]),
    name="sentence-transformers")
EXPORT_FORMATS.register(ExportFormat(
    "onnx", "onnx", "text-classification",
    lambda out, model, tok, cfg, meta, quantize: write_onnx(out, model, tok, cfg.model.max_length, quantize, meta),
    quantize=QUANTIZE), name="onnx")
FORMATS = tuple(EXPORT_FORMATS.names())
INT8_NOTE = ("The int8 graphs are dynamically quantised (weights int8, activations quantised per batch); their "
             "dev metrics can differ from the fp32 graphs' (see the project's RESULTS.md).")


def export_run(run_dir: str | Path, fmt: str, out: str | Path, force: bool = False, quantize: str | None = None) -> Path:
    """Export RUN_DIR's best checkpoint (or a checkpoint directory) to `out`; returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    form = EXPORT_FORMATS.get(fmt)
    if quantize is not None and quantize not in form.quantize:
        takes = [f.name for f in EXPORT_FORMATS.values() if quantize in f.quantize]
        raise ConfigError(f"--quantize {quantize} applies to --format {' or '.join(takes) or 'none'} only")
    if is_ensemble_dir(run_dir):
        raise CheckpointError(f"{run_dir} is an ensemble: its members are separate models; export each member run")
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    ckpt = find_checkpoint(run_dir)
    if out.resolve() == ckpt.resolve() or out.resolve() in ckpt.resolve().parents:
        raise ConfigError(f"--out {out} would replace the checkpoint it exports ({ckpt})")
    if out.exists() or out.is_symlink():
        check_replaceable(out)
    model, tokenizer, cfg, meta = load_checkpoint(ckpt)
    check_exportable(model, fmt)
    run_root = RunDir.of_checkpoint(ckpt)
    summary, command = model_card.read_run_files(run_root)
    tmp = temporary_dir(out)
    try:
        torch.manual_seed(0)
        usage = form.write(tmp, model, tokenizer, cfg, meta, quantize)
        tasks = {t: {"labels": list(spec.label_names or []), "metric": spec.main_metric, "scores": spec.kind.scores,
                     "description": spec.description,
                     "pair_encoding": model.pair_encoding[t],
                     "files": {s: spec.file(s) for s in ("train", "dev")}} for t, spec in model.tasks.items()}
        notes = form.notes(model) + ([INT8_NOTE] if quantize else [])
        card = model_card.render(form, run_root.name, cfg.to_dict(), tasks, meta, summary,
                                 command or _reproduce_command(run_root), usage, notes)
        (tmp / "README.md").write_text(card)
        write_json(tmp / EXPORT_MARKER, {"format": fmt, "source": str(ckpt.resolve()), "mtbert": __version__})
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_replaceable(out: Path) -> None:
    """`--force` replaces an earlier export (it holds EXPORT_MARKER) or an empty directory, nothing else."""
    if out.is_dir() and not out.is_symlink() and ((out / EXPORT_MARKER).is_file() or not any(out.iterdir())):
        return
    raise FileExistsError(f"{out} is not an mtbert export (it has no {EXPORT_MARKER}): --force replaces only an "
                          f"earlier export; choose another --out, or remove {out} yourself")


def _reproduce_command(run_dir: Path) -> str:
    return (f"# not recorded with the run; this reproduces it from its saved config:\n"
            f"mtbert train --config {shlex.quote(str(run_dir / 'config.yaml'))} --out {shlex.quote(str(run_dir))}")


