"""`mtbert export RUN_DIR --format hf|sentence-transformers|onnx --out DIR`: the run's best
checkpoint in a format other tools load, with a model card.

- hf: a Hugging Face BertModel directory (transformers' AutoModel / AutoTokenizer load it) plus
  the pooler and task heads in mtbert_heads.safetensors (+ mtbert_heads.json), which
  modeling.hf_format.load_hf_export turns back into the full multitask model.
- sentence-transformers: Transformer + Pooling (+ the tanh Dense layer of `cls` pooling): encode()
  gives the run's pooled sentence vectors. Holds `cls` or `mean` pooling only.
- onnx: the encoder stored once and a small graph per task head, exported with torch.export with
  dynamic batch and sequence axes. `encoder.onnx` (encoder + pooler: token ids -> pooled vectors,
  and token states where a head reads them) runs once per input sequence a task needs (one for a
  sentence or cross-encoded pair, two for a bi-encoded pair, three for cross+cos), and
  `heads/TASK.onnx` turns those into logits / pred / prob. The heads are kilobytes, so an export
  of N tasks is one encoder's size, not N; a single graph with every head as an output would need
  every task's input sequences at once, which pair encodings make differ per task. Per-task LoRA
  experts are N encoders by nature (`encoder-TASK.onnx`). `--quantize int8` adds a dynamically
  quantised encoder (`encoder.int8.onnx`); the heads stay fp32. mtbert_onnx.json records the
  layout's format (ONNX_FORMAT); runner.py (inference.onnx_runner) runs it and the earlier layout
  (format 1: a full graph per task).

Every export is checked against the PyTorch model on sample inputs before it is kept (outputs
within 1e-4, cosine >= 0.9999 for sentence vectors; ONNX: every task, run through the written
directory by its runner), written to a temporary sibling directory and renamed into place at the
end; an existing output is replaced only with `force`. Ensembles and models a format cannot hold
are refused before anything is written. transformers, sentence-transformers, onnx, onnxscript and
onnxruntime are optional (`pip install mtbert[export]`) and imported only by the format that needs
them (inference.onnx_runner imports onnxruntime only when it loads an export).
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
from mtbert.inference.onnx_runner import INPUT_KEYS as ENCODER_INPUTS
from mtbert.inference.onnx_runner import MANIFEST, OUTPUTS, ExportError, OnnxModel
from mtbert.modeling import hf_format
from mtbert.modeling.adapters import lora_layers, merge_lora
from mtbert.modeling.checkpoint import find_checkpoint, load_checkpoint
from mtbert.modeling.heads import Rep
from mtbert.modeling.model import MultitaskModel
from mtbert.modeling.poolers import POOLERS
from mtbert.training.techniques import TECHNIQUES

log = logging.getLogger("mtbert")

EXPORT_MARKER = "mtbert_export.json"  # in every export: what `--force` may replace
QUANTIZE = ("int8",)
ONNX_FORMAT = 2  # mtbert_onnx.json's layout: the encoder once plus a head graph per task (1: a full graph per task)
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
    """Input sequences of a task, by pair encoding (see inference.onnx_runner)."""
    return {"single": ["text"], "cross": ["pair"], "bi": ["a", "b"], "cross+cos": ["pair", "a", "b"]}[mode]


def _reads(model: MultitaskModel, task: str) -> list[str]:
    """What a task's head reads of each encoded slot: the pooled vector, or the token states and
    their mask (a bi-encoder head that aligns tokens, heads.AttentionPairHead)."""
    return ["tokens", "attention_mask"] if getattr(model.heads[task], "reads_tokens", False) else ["vec"]


def _encoders(model: MultitaskModel) -> dict[str, dict]:
    """Encoder graph name -> {"adapter": the routed LoRA adapter it runs or None, "tasks": [...]}:
    one shared encoder, or one per task where per-task LoRA experts make each task's encoder its own."""
    if any(layer.routed for layer in lora_layers(model.encoder)):
        return {f"encoder-{task}": {"adapter": task, "tasks": [task]} for task in model.tasks}
    return {"encoder": {"adapter": None, "tasks": list(model.tasks)}}


class EncoderGraph(torch.nn.Module):
    """The encoder and pooler as a graph: (input_ids, attention_mask, token_type_ids) -> vec
    (pooled sentence vectors [B, D]) and, if `with_tokens`, tokens (token states [B, T, H])."""

    def __init__(self, model: MultitaskModel, adapter: str | None, with_tokens: bool):
        super().__init__()
        self.model, self.adapter, self.with_tokens = model, adapter, with_tokens

    def forward(self, input_ids, attention_mask, token_type_ids):
        layers = lora_layers(self.model.encoder) if self.adapter else []
        for layer in layers:  # what MultitaskModel.forward's routing hook does for a task
            layer.active = self.adapter
        try:
            rep = self.model.encode({"input_ids": input_ids, "attention_mask": attention_mask,
                                     "token_type_ids": token_type_ids})
        finally:
            for layer in layers:
                layer.active = None
        return (rep.vec.float(), rep.tokens.float()) if self.with_tokens else (rep.vec.float(),)


class HeadGraph(torch.nn.Module):
    """One task's head as a graph: what it reads of each slot (SLOT_vec, or SLOT_tokens and
    SLOT_attention_mask) -> logits, pred, prob."""

    def __init__(self, model: MultitaskModel, task: str):
        super().__init__()
        self.head, self.kind = model.heads[task], model.tasks[task].kind
        self.reads, self.n_slots = _reads(model, task), len(_slots(model.pair_encoding[task]))

    def forward(self, *tensors):
        n = len(self.reads)
        per_slot = [tensors[n * k: n * (k + 1)] for k in range(self.n_slots)]
        if self.reads == ["vec"]:
            reps = [Rep(vec=vec, tokens=None, mask=None) for (vec,) in per_slot]
        else:
            reps = [Rep(vec=None, tokens=tokens, mask=mask) for tokens, mask in per_slot]
        logits = self.head(*reps).float()
        return logits, self.kind.predict(logits), self.kind.probabilities(logits)


def _example_inputs(tokenizer: BertTokenizer, slots: list[str], texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """One padded batch per slot: `texts` as sentences, or paired with the next text."""
    a, b = texts, texts[1:] + texts[:1]
    seqs = {"text": lambda: tokenizer.encode(a), "pair": lambda: tokenizer.encode_pairs(a, b),
            "a": lambda: tokenizer.encode(a), "b": lambda: tokenizer.encode(b)}
    return [pad(seqs[slot](), tokenizer.pad_id) for slot in slots]


def _to_onnx(module: torch.nn.Module, example: tuple, path: Path, inputs: list[str], outputs: list[str],
             dynamic_shapes: tuple, what: str) -> None:
    """`dynamic_shapes` follows forward's signature: one entry per parameter (a *tensors one: a tuple)."""
    try:
        with _quiet():
            torch.onnx.export(module, example, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                              dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
    except Exception as e:  # e.g. an operation torch.export or ONNX cannot express
        raise CheckpointError(f"{what}: cannot export to ONNX: {_reason(e)}") from e


def write_onnx(out: Path, model: MultitaskModel, tokenizer: BertTokenizer, max_length: int,
               quantize: str | None, meta: dict) -> str:
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        _require(mod)
    model = model.eval()
    encoders = _encoders(model)
    with_tokens = any("tokens" in _reads(model, task) for task in model.tasks)
    encoder_outputs = ["vec", "tokens"] if with_tokens else ["vec"]
    batch = torch.export.Dim("batch", min=1, max=65536)
    max_positions = model.encoder.config.max_position_embeddings
    files: dict[str, dict[str, str]] = {"fp32": {}}
    head_examples: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (task, slot) -> what a head may read
    for name, spec in encoders.items():
        graph = EncoderGraph(model, spec["adapter"], with_tokens).eval()
        seq = torch.export.Dim("seq", min=1, max=max_positions)
        path = out / f"{name}.onnx"
        example = _example_inputs(tokenizer, ["text"], SAMPLES[:2])[0]  # other shapes are checked below
        _to_onnx(graph, tuple(example[k] for k in ENCODER_INPUTS), path, list(ENCODER_INPUTS), encoder_outputs,
                 tuple({0: batch, 1: seq} for _ in ENCODER_INPUTS), name)
        files["fp32"][name] = path.name
        for task in spec["tasks"]:  # the heads' export examples: this encoder's outputs on theirs
            slots = _slots(model.pair_encoding[task])
            with torch.no_grad():  # (not inference_mode: torch.export traces the heads on these)
                for slot, x in zip(slots, _example_inputs(tokenizer, slots, SAMPLES[:2])):
                    encoded = dict(zip(encoder_outputs, graph(*(x[k] for k in ENCODER_INPUTS))))
                    head_examples[task, slot] = {**encoded, "attention_mask": x["attention_mask"]}
        if quantize == "int8":  # the encoder holds nearly all the weights; heads stay fp32
            from onnxruntime.quantization import QuantType, quantize_dynamic
            qpath = out / f"{name}.int8.onnx"
            with _quiet():
                quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
            files.setdefault("int8", {})[name] = qpath.name
    (out / "heads").mkdir()
    tasks = {}
    for task in model.tasks:
        slots, reads = _slots(model.pair_encoding[task]), _reads(model, task)
        encoder = next(name for name, spec in encoders.items() if task in spec["tasks"])
        example = tuple(head_examples[task, slot][r] for slot in slots for r in reads)
        shapes = []
        for slot in slots:
            seq = torch.export.Dim(f"{slot}_seq", min=1, max=max_positions)
            shapes += [{"vec": {0: batch}, "tokens": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}[r]
                       for r in reads]
        path = out / "heads" / f"{task}.onnx"
        _to_onnx(HeadGraph(model, task).eval(), example, path, [f"{s}_{r}" for s in slots for r in reads],
                 list(OUTPUTS), (tuple(shapes),), f"task {task}")
        tasks[task] = {"slots": slots, "encoder": encoder, "head": f"heads/{path.name}", "reads": reads,
                       "outputs": list(OUTPUTS), "labels": list(model.tasks[task].label_names or []),
                       "kind": repr(model.tasks[task].kind)}
    tokenizer.save(out)
    shutil.copyfile(Path(__file__).resolve().parents[1] / "inference" / "onnx_runner.py", out / "runner.py")
    manifest = {"format": ONNX_FORMAT, "max_length": max_length, "pad_id": tokenizer.pad_id,
                "encoder_outputs": encoder_outputs, "encoders": files, "tasks": tasks, "meta": meta}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float))
    _check_onnx(out, model, tokenizer, list(files))
    task = next(iter(tasks))
    single = tasks[task]["slots"] == ["text"]
    encoder_files = ", ".join(f"`{f}`" for f in files["fp32"].values())
    stored = (f"The encoder is stored once ({encoder_files})" if len(files["fp32"]) == 1 else
              f"Each task has its own encoder (per-task LoRA experts: {encoder_files})")
    return f"""Needs only `onnxruntime`, `tokenizers` and `numpy`:

```python
from runner import OnnxModel                 # runner.py in this directory
model = OnnxModel("{out.name}")               # OnnxModel("{out.name}", variant="int8"): quantised encoder{'' if quantize else ' (with --quantize int8)'}
model.predict("{task}", [{'"A gripping film."' if single else '("How do I cook rice?", "How is rice cooked?")'}])  # {{"pred", "prob", "logits"}}
```

```bash
python runner.py {out.name} {task} {'"A gripping film."' if single else '"How do I cook rice?" "How is rice cooked?"'}
```

{stored}: inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, [batch, sequence]),
outputs {' and '.join(f'`{o}`' for o in encoder_outputs)} (pooled sentence vectors{', token states' if with_tokens else ''}).
Each task has a small head graph, `heads/TASK.onnx`, run on the encoder's outputs for each input
sequence the task needs (`text`; `pair` = [CLS] a [SEP] b [SEP]; `a`, `b` = each sentence alone),
with outputs `logits`, `pred`, `prob`. `mtbert_onnx.json` lists each task's sequences, encoder and
head; runner.py runs them in turn."""


def _check_onnx(out: Path, model: MultitaskModel, tokenizer: BertTokenizer, variants: list[str]) -> None:
    """Every task through the written export, by the runner users run: fp32 logits within TOLERANCE
    of the model's on batch sizes and lengths unlike the export example's; int8 loads and gives
    finite logits of the same shape (its accuracy is bench/onnx_quality.py's to measure)."""
    for variant in variants:
        try:
            runner = OnnxModel(out, variant)
        except ExportError as e:
            raise CheckpointError(f"onnx export check: {e}") from None
        for task in model.tasks:
            slots = _slots(model.pair_encoding[task])
            for texts in (SAMPLES, SAMPLES[2:3]):
                inputs = _example_inputs(tokenizer, slots, texts)
                with torch.inference_mode():
                    ref = model(task, inputs).float()
                got = torch.from_numpy(runner.run_batch(task, [{k: t.numpy() for k, t in x.items()} for x in inputs],
                                                        ("logits",))["logits"])
                if variant == "fp32":
                    _check_close(f"onnx {task} logits", got, ref)
                elif got.shape != ref.shape or not torch.isfinite(got).all():
                    raise CheckpointError(f"onnx {variant} {task} logits: shape {tuple(got.shape)} (expected "
                                          f"{tuple(ref.shape)}) or not finite: export not written")


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
    run_root, kept_epoch = RunDir.of_checkpoint(ckpt), RunDir.is_kept_epoch(ckpt)
    # (a kept epoch's card takes its run's command, not the whole run's totals as if they were its own)
    summary, command = model_card.read_run_files(run_root, summary=not kept_epoch)
    tmp = temporary_dir(out)
    try:
        torch.manual_seed(0)
        # (the writers name the folder they write in; the card's snippets must name where it will live)
        usage = form.write(tmp, model, tokenizer, cfg, meta, quantize).replace(tmp.name, out.name)
        tasks = {t: {"labels": list(spec.label_names or []), "metric": spec.main_metric, "scores": spec.kind.scores,
                     "description": spec.description,
                     "pair_encoding": model.pair_encoding[t],
                     "files": {s: spec.file(s) for s in ("train", "dev")}} for t, spec in model.tasks.items()}
        notes = form.notes(model) + ([INT8_NOTE] if quantize else [])
        card = model_card.render(form, RunDir.label(ckpt), cfg.to_dict(), tasks, meta, summary,
                                 command or _reproduce_command(run_root), usage, notes, kept_epoch)
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


