"""Run an `mtbert export --format onnx` directory with onnxruntime: texts in, predictions out.

Stand-alone on purpose: it needs numpy, tokenizers and onnxruntime, not mtbert or torch, and the
exporter copies this file into every ONNX export as runner.py. Usage:

    from runner import OnnxModel                  # or: from mtbert.inference.onnx_runner import OnnxModel
    m = OnnxModel("export-dir")                   # variant="int8" for the quantised encoder
    m.predict("sst", ["A gripping film."])        # {"pred": ..., "prob": ..., "logits": ...}
    m.predict("sts", [("A man plays.", "A man is playing.")])

    python runner.py EXPORT_DIR TASK "text" ["second text"]

A task reads one padded sequence batch per input slot its pair encoding needs ("text" for single
sentences, "pair" for a cross-encoded [CLS] a [SEP] b [SEP], "a" and "b" for the sentences of a
bi-encoded pair), each as input_ids, attention_mask and token_type_ids (int64, [batch, sequence]).
Its outputs are logits, pred (label or score) and prob (class probabilities, P(positive) or the
score), computed inside the graphs. Tokenization (truncation included) is exactly mtbert's.

mtbert_onnx.json records the layout's `format`; both are read:

- 2: the encoder is stored once. `encoder.onnx` maps (input_ids, attention_mask, token_type_ids)
  to `vec` (pooled sentence vectors [batch, dim]) and, where a head reads token states, `tokens`
  ([batch, sequence, hidden]); `heads/TASK.onnx` maps SLOT_vec (or SLOT_tokens and
  SLOT_attention_mask) of each slot to logits, pred and prob. A task runs the encoder once per slot,
  then its head. Per-task LoRA experts have one encoder per task (`encoder-TASK.onnx`): the manifest
  names each task's encoder. int8 quantises the encoders; the heads are shared by both variants.
- 1 (exports written before the encoder was stored once): one full graph per task, TASK.onnx
  (TASK.int8.onnx), inputs SLOT_input_ids, SLOT_attention_mask, SLOT_token_type_ids.

Anything else (an unknown format, a manifest that is not one, a missing graph file) is an
ExportError: one line naming the directory and what is wrong.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

MANIFEST = "mtbert_onnx.json"
FORMATS = (1, 2)  # manifest layouts this runner reads
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("logits", "pred", "prob")


class ExportError(ValueError):
    """The directory is not an ONNX export this runner can read (one line: what is wrong)."""


class Tokenizer:
    """[CLS] text [SEP] and [CLS] a [SEP] b [SEP] (segment ids 0 / 1), truncated to max_length,
    the longer side of a pair first: the same ids as mtbert.data.tokenizer.BertTokenizer."""

    def __init__(self, path: str | Path, max_length: int):
        self.tok = HFTokenizer.from_file(str(path))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.max_length = max_length
        self.cls_id, self.sep_id = self.tok.token_to_id("[CLS]"), self.tok.token_to_id("[SEP]")
        self.pad_id = self.tok.token_to_id("[PAD]") or 0

    def _pieces(self, texts):
        return [e.ids for e in self.tok.encode_batch([t or "" for t in texts], add_special_tokens=False)]

    def encode(self, texts):
        return [([self.cls_id] + ids[: self.max_length - 2] + [self.sep_id],) for ids in self._pieces(texts)]

    def encode_pairs(self, a, b):
        out, budget = [], self.max_length - 3
        for x, y in zip(self._pieces(a), self._pieces(b)):
            if len(x) + len(y) > budget:
                half = budget // 2
                if len(x) <= half:
                    y = y[: budget - len(x)]
                elif len(y) <= half:
                    x = x[: budget - len(y)]
                else:
                    x, y = x[: budget - half], y[:half]
            out.append(([self.cls_id] + x + [self.sep_id] + y + [self.sep_id], len(x) + 2))
        return out


def pad(seqs, pad_id: int) -> dict[str, np.ndarray]:
    """Sequences (ids, first-segment length or ids alone) -> padded int64 arrays [B, T]."""
    T = max(len(s[0]) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    types = np.zeros((len(seqs), T), dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for i, s in enumerate(seqs):
        n = len(s[0])
        ids[i, :n], mask[i, :n] = s[0], 1
        if len(s) > 1:  # a pair: the second segment has type 1
            types[i, s[1]:n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# ---------------------------------------------------------------- the manifest

def _require(ok: bool, directory: Path, what: str) -> None:
    if not ok:
        raise ExportError(f"{directory}: {MANIFEST} is garbled: {what}")


def _names_files(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(f, str) and f for k, f in value.items())


def read_manifest(directory: str | Path) -> dict:
    """The export's manifest, its layout checked: an ExportError (one line) if it is missing,
    unreadable, of a format this runner does not know, or lacks what that format needs."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} is not an mtbert ONNX export: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{directory}: {MANIFEST} is unreadable: {str(e).splitlines()[0] if str(e) else e!r}") from None
    _require(isinstance(manifest, dict), directory, "not a JSON object")
    version = manifest.get("format")
    if version not in FORMATS:
        raise ExportError(f"{directory}: {MANIFEST} has layout format {version!r}; this runner reads format "
                          f"{' or '.join(map(str, FORMATS))} (use the runner.py inside that export, or export again)")
    _require(isinstance(manifest.get("max_length"), int) and manifest["max_length"] > 2, directory,
             "max_length is not an integer above 2")
    tasks = manifest.get("tasks")
    _require(isinstance(tasks, dict) and bool(tasks), directory, "no tasks")
    for task, spec in tasks.items():
        _require(isinstance(spec, dict) and isinstance(spec.get("slots"), list) and bool(spec["slots"])
                 and all(isinstance(s, str) for s in spec["slots"]), directory, f"task {task!r} has no input slots")
    variants = manifest.get("variants" if version == 1 else "encoders")
    _require(isinstance(variants, dict) and bool(variants) and all(_names_files(v) for v in variants.values()),
             directory, f"{'variants' if version == 1 else 'encoders'} do not map names to graph files")
    if version == 1:
        _require(all(set(files) <= set(tasks) for files in variants.values()), directory,
                 "a variant has graphs of tasks the manifest does not list")
    else:
        outputs = manifest.get("encoder_outputs")
        _require(isinstance(outputs, list) and "vec" in outputs, directory, "encoder_outputs lack `vec`")
        for task, spec in tasks.items():
            _require(isinstance(spec.get("head"), str) and bool(spec["head"]), directory, f"task {task!r} has no head")
            _require(all(spec.get("encoder") in files for files in variants.values()), directory,
                     f"task {task!r} names an encoder that a variant lacks")
            reads = spec.get("reads")
            _require(isinstance(reads, list) and bool(reads) and all(r in outputs or r in INPUT_KEYS for r in reads),
                     directory, f"task {task!r} reads what neither the encoder nor the inputs give")
    return manifest


def manifest_variants(manifest: dict) -> list[str]:
    """The variants an export holds: fp32, and int8 where it was quantised."""
    return list(manifest["variants" if manifest["format"] == 1 else "encoders"])


def graph_files(manifest: dict, variant: str) -> list[str]:
    """Every graph file that `variant` runs, relative to the export directory."""
    if manifest["format"] == 1:
        return list(manifest["variants"][variant].values())
    return list(manifest["encoders"][variant].values()) + [spec["head"] for spec in manifest["tasks"].values()]


# ---------------------------------------------------------------- the graphs of one layout

def _session(ort, directory: Path, file: str, options):
    path = directory / file
    if not path.is_file():
        raise ExportError(f"{directory}: graph file {file} is missing")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own errors (a truncated or foreign file)
        raise ExportError(f"{directory}: onnxruntime cannot load {file}: {str(e).strip().splitlines()[0][:300]}") from None


class _TaskGraphs:
    """Format 1: one full graph per task; one call per batch."""

    def __init__(self, ort, directory: Path, manifest: dict, variant: str, options):
        self.manifest = manifest
        self.sessions = {t: _session(ort, directory, f, options) for t, f in manifest["variants"][variant].items()}

    def run(self, task: str, batches: list[dict], outputs: list[str]) -> list[np.ndarray]:
        slots = self.manifest["tasks"][task]["slots"]
        feeds = {f"{slot}_{key}": batch[key] for slot, batch in zip(slots, batches) for key in INPUT_KEYS}
        return self.sessions[task].run(outputs, feeds)


class _EncoderThenHead:
    """Format 2: each slot's batch through the task's encoder, then the task's head on what it reads."""

    def __init__(self, ort, directory: Path, manifest: dict, variant: str, options):
        self.manifest = manifest
        files = manifest["encoders"][variant]
        self.encoders = {name: _session(ort, directory, f, options) for name, f in files.items()}
        # the inputs each encoder graph declares (an encoder without token types may have none)
        self.encoder_inputs = {name: [i.name for i in s.get_inputs()] for name, s in self.encoders.items()}
        self.sessions = {t: _session(ort, directory, spec["head"], options) for t, spec in manifest["tasks"].items()}

    def run(self, task: str, batches: list[dict], outputs: list[str]) -> list[np.ndarray]:
        spec = self.manifest["tasks"][task]
        encoder, inputs = self.encoders[spec["encoder"]], self.encoder_inputs[spec["encoder"]]
        fetch = [r for r in spec["reads"] if r in self.manifest["encoder_outputs"]]
        feeds = {}
        for slot, batch in zip(spec["slots"], batches):
            encoded = dict(zip(fetch, encoder.run(fetch, {k: batch[k] for k in inputs})))
            for r in spec["reads"]:
                feeds[f"{slot}_{r}"] = encoded[r] if r in encoded else batch[r]
        return self.sessions[task].run(outputs, feeds)


# ---------------------------------------------------------------- the model

class OnnxModel:
    def __init__(self, directory: str | Path, variant: str = "fp32", threads: int | None = None,
                 batch_size: int = 64):
        import onnxruntime as ort
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        if variant not in manifest_variants(self.manifest):
            raise ExportError(f"{self.dir} has no {variant!r} graphs; it has {sorted(manifest_variants(self.manifest))}")
        if not (self.dir / "tokenizer.json").is_file():
            raise ExportError(f"{self.dir}: tokenizer.json is missing")
        self.tokenizer = Tokenizer(self.dir / "tokenizer.json", self.manifest["max_length"])
        self.batch_size = batch_size
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        layout = _TaskGraphs if self.manifest["format"] == 1 else _EncoderThenHead
        self.graphs = layout(ort, self.dir, self.manifest, variant, options)

    @property
    def tasks(self) -> list[str]:
        return list(self.graphs.sessions)

    def slots(self, task: str) -> list[str]:
        self._check_task(task)
        return list(self.manifest["tasks"][task]["slots"])

    def _check_task(self, task: str) -> None:
        if task not in self.graphs.sessions:
            raise KeyError(f"no task {task!r}; this export has {self.tasks}")

    def encode(self, task: str, items) -> list[tuple]:
        """Texts (single-sentence task) or (a, b) pairs -> per example, one sequence per input slot."""
        slots = self.slots(task)
        tok = self.tokenizer
        if slots == ["text"]:
            return [(s,) for s in tok.encode(list(items))]
        a, b = [p[0] for p in items], [p[1] for p in items]
        seqs = {"pair": tok.encode_pairs(a, b) if "pair" in slots else None,
                "a": tok.encode(a) if "a" in slots else None, "b": tok.encode(b) if "b" in slots else None}
        return list(zip(*(seqs[s] for s in slots)))

    def run_batch(self, task: str, batches: list[dict[str, np.ndarray]],
                  outputs: tuple[str, ...] = OUTPUTS) -> dict[str, np.ndarray]:
        """`outputs` of one batch: `batches` holds one padded batch per slot of the task (input_ids,
        attention_mask, token_type_ids as int64 [B, T], e.g. from pad()), in the task's slot order."""
        self._check_task(task)
        return dict(zip(outputs, self.graphs.run(task, batches, list(outputs))))

    def run(self, task: str, encoded: list[tuple]) -> dict[str, np.ndarray]:
        """Graph outputs for encoded examples, in their order (run sorted by length, in batches)."""
        n_slots = len(self.slots(task))
        order = sorted(range(len(encoded)), key=lambda i: sum(len(s[0]) for s in encoded[i]))
        parts = {name: [None] * len(encoded) for name in OUTPUTS}
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            batches = [pad([encoded[i][k] for i in idx], self.tokenizer.pad_id) for k in range(n_slots)]
            for name, out in self.run_batch(task, batches).items():
                for j, i in enumerate(idx):
                    parts[name][i] = out[j]
        return {n: np.array(v) for n, v in parts.items()}

    def predict(self, task: str, items) -> dict[str, np.ndarray]:
        return self.run(task, self.encode(task, items))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: python runner.py EXPORT_DIR TASK TEXT [SECOND_TEXT]", file=sys.stderr)
        return 2
    try:
        model = OnnxModel(argv[0])
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    item = argv[2] if len(argv) == 3 else (argv[2], argv[3])
    out = model.predict(argv[1], [item])
    labels = model.manifest["tasks"][argv[1]].get("labels") or []
    pred = out["pred"][0].item()
    print(json.dumps({"task": argv[1], "pred": pred,
                      "label": labels[int(pred)] if labels and float(pred).is_integer() else None,
                      "prob": np.asarray(out["prob"][0]).tolist()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
