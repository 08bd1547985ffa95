"""Run an `mtbert export --format onnx` directory with onnxruntime: texts in, predictions out.

Stand-alone on purpose: it needs numpy, tokenizers and onnxruntime, not mtbert or torch, and the
exporter copies this file into every ONNX export as runner.py. Usage:

    from runner import OnnxModel                  # or: from mtbert.inference.onnx_runner import OnnxModel
    m = OnnxModel("export-dir")                   # variant="int8" for the quantised graphs
    m.predict("sst", ["A gripping film."])        # {"pred": ..., "prob": ..., "logits": ...}
    m.predict("sts", [("A man plays.", "A man is playing.")])

    python runner.py EXPORT_DIR TASK "text" ["second text"]

Each task has its own graph (encoder + that task's head) with dynamic batch and sequence axes.
Its inputs are one padded sequence batch per slot the task's encoding needs ("text" for single
sentences, "pair" for a cross-encoded [CLS] a [SEP] b [SEP], "a" and "b" for the sentences of a
bi-encoded pair), named SLOT_input_ids, SLOT_attention_mask, SLOT_token_type_ids; its outputs
are logits, pred (label or score) and prob (class probabilities, P(positive) or the score),
computed inside the graph. Tokenization (truncation included) is exactly mtbert's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

MANIFEST = "mtbert_onnx.json"


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


class OnnxModel:
    def __init__(self, directory: str | Path, variant: str = "fp32", threads: int | None = None,
                 batch_size: int = 64):
        import onnxruntime as ort
        self.dir = Path(directory)
        self.manifest = json.loads((self.dir / MANIFEST).read_text())
        if variant not in self.manifest["variants"]:
            raise ValueError(f"{self.dir} has no {variant!r} graphs; it has {sorted(self.manifest['variants'])}")
        self.tokenizer = Tokenizer(self.dir / "tokenizer.json", self.manifest["max_length"])
        self.batch_size = batch_size
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        files = self.manifest["variants"][variant]
        self.sessions = {t: ort.InferenceSession(str(self.dir / f), options, providers=["CPUExecutionProvider"])
                         for t, f in files.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.sessions)

    def encode(self, task: str, items) -> list[tuple]:
        """Texts (single-sentence task) or (a, b) pairs -> per example, one sequence per input slot."""
        slots = self.manifest["tasks"][task]["slots"]
        tok = self.tokenizer
        if slots == ["text"]:
            return [(s,) for s in tok.encode(list(items))]
        a, b = [p[0] for p in items], [p[1] for p in items]
        seqs = {"pair": tok.encode_pairs(a, b) if "pair" in slots else None,
                "a": tok.encode(a) if "a" in slots else None, "b": tok.encode(b) if "b" in slots else None}
        return list(zip(*(seqs[s] for s in slots)))

    def run(self, task: str, encoded: list[tuple]) -> dict[str, np.ndarray]:
        """Graph outputs for encoded examples, in their order (run sorted by length, in batches)."""
        if task not in self.sessions:
            raise KeyError(f"no task {task!r}; this export has {self.tasks}")
        slots = self.manifest["tasks"][task]["slots"]
        order = sorted(range(len(encoded)), key=lambda i: sum(len(s[0]) for s in encoded[i]))
        names = [o.name for o in self.sessions[task].get_outputs()]
        parts = {n: [None] * len(encoded) for n in names}
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            feeds = {}
            for k, slot in enumerate(slots):
                for key, arr in pad([encoded[i][k] for i in idx], self.tokenizer.pad_id).items():
                    feeds[f"{slot}_{key}"] = arr
            for name, out in zip(names, self.sessions[task].run(names, feeds)):
                for j, i in enumerate(idx):
                    parts[name][i] = out[j]
        return {n: np.array(v) for n, v in parts.items()}

    def predict(self, task: str, items) -> dict[str, np.ndarray]:
        return self.run(task, self.encode(task, items))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: python runner.py EXPORT_DIR TASK TEXT [SECOND_TEXT]", file=sys.stderr)
        return 2
    model = OnnxModel(argv[0])
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
