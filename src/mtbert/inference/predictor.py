"""Inference and dev metrics.

Everything that turns examples into predictions goes through a predictor. `Predictor` wraps one
model with its tokenizer and encodes examples its own way (tokenizer, cross or bi pairs);
`EnsemblePredictor` averages several predictors' probabilities or scores task by task (see
inference.ensemble). inference.loading opens either kind of run directory.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mtbert.core.errors import UnknownTaskError
from mtbert.core.runtime import AMP_DTYPES, autocast, release_free_memory
from mtbert.core.tasks import TaskSpec, get_task, using_tasks, with_overall
from mtbert.data.readers import (
    EncodedDataset,
    Example,
    collate,
    encode_dataset,
    load_split,
    pad,
)
from mtbert.modeling.heads import Rep
from mtbert.modeling.precision import encoder_to_bf16, quantize_int8


def for_precision(model, precision: str, device=torch.device("cpu")):
    """(model, autocast dtype) for a resolved inference precision (core.runtime.resolve_inference_precision).
    On CPU, bf16 casts the encoder's weights to bf16 (faster than autocast, modeling.precision) and
    int8 quantises its linear layers, both in place and without autocast; on CUDA bf16 / fp16
    autocast the model as it is; fp32 runs it as it is."""
    if precision == "int8":
        return quantize_int8(model), None
    if precision == "bf16" and torch.device(device).type == "cpu":
        return encoder_to_bf16(model), None
    return model, AMP_DTYPES[precision]


MAX_BATCH_TOKENS = 8192  # padded tokens per forward pass, all of an example's sequences counted


def length_sorted_batches(ds: EncodedDataset, batch_size: int, max_tokens: int | None = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Index batches in order of length (each carries little padding), of at most `batch_size`
    examples and, where `max_tokens` is set, at most that many padded tokens: short sentences go
    128 at a time, long pairs fewer, so a pass's memory is bounded by the budget instead of by
    the longest examples (RESULTS.md, training memory)."""
    order = sorted(range(len(ds)), key=ds.length)
    batches, current = [], []
    for i in order:  # (ascending: the newest example is the batch's longest)
        if current and (len(current) == batch_size or (max_tokens and (len(current) + 1) * ds.length(i) > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


@torch.inference_mode()
def predict_dataset(model, ds: EncodedDataset, batch_size: int = 128, device=torch.device("cpu"),
                    amp_dtype=None, pad_id: int = 0, max_tokens: int | None = MAX_BATCH_TOKENS,
                    release_every: int | None = None) -> dict[str, np.ndarray]:
    """Predictions, probabilities/scores and raw logits for every example, in dataset order.
    Examples are run sorted by length (length_sorted_batches). `release_every`: give the C
    allocator's free pages back every N batches (each batch a little longer than the last leaves
    the last one's blocks as holes glibc keeps: +0.8 GB over make train's evaluation, RESULTS.md)."""
    model.eval()
    task = ds.task
    preds, probs, logits_all = [None] * len(ds), [None] * len(ds), [None] * len(ds)
    for n, idx in enumerate(length_sorted_batches(ds, batch_size, max_tokens), 1):
        if release_every and n % release_every == 0:
            release_free_memory()
        batch = collate(ds, idx, pad_id)
        inputs = [{k: v.to(device) for k, v in x.items()} for x in batch["inputs"]]
        with autocast(device, amp_dtype):
            logits = model(task.name, inputs).float()
        p, pr = task.kind.predict(logits).cpu().numpy(), task.kind.probabilities(logits).cpu().numpy()
        lg = logits.cpu().numpy()
        for j, i in enumerate(idx):
            preds[i], probs[i], logits_all[i] = p[j], pr[j], lg[j]
    return {"pred": np.array(preds), "prob": np.array(probs), "logits": np.array(logits_all)}


CALL_COST_TOKENS = 48  # one more encoder call costs about as much as this many more tokens (MiniLM, CPU)


def length_batches(lengths: list[int], batch_size: int, call_cost: int = CALL_COST_TOKENS) -> list[tuple[int, int]]:
    """(start, end) batches of ascending `lengths`, at most `batch_size` each, that minimise padded
    tokens plus `call_cost` per batch: short single sentences are not padded to a pair's length,
    yet a few sequences of similar lengths share one call. Dynamic programming over the distinct
    lengths (a batch spans consecutive ones)."""
    groups: list[list[int]] = []  # [length, count] per distinct length, ascending
    for n in lengths:
        if groups and groups[-1][0] == n:
            groups[-1][1] += 1
        else:
            groups.append([n, 1])
    best, cut = [0.0] + [math.inf] * len(groups), [0] * (len(groups) + 1)  # best cost of the first g groups
    for j in range(1, len(groups) + 1):
        count = 0
        for i in range(j, 0, -1):  # the last batch spans groups i-1 .. j-1, padded to groups[j-1]'s length
            count += groups[i - 1][1]
            cost = best[i - 1] + math.ceil(count / batch_size) * call_cost + count * groups[j - 1][0]
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    spans, j = [], len(groups)
    while j:
        spans.append((cut[j], j))
        j = cut[j]
    bounds = np.cumsum([0] + [c for _, c in groups])
    return [(int(s), int(min(s + batch_size, bounds[j]))) for i, j in reversed(spans)
            for s in range(bounds[i], bounds[j], batch_size)]


def shares_encoder(model) -> bool:
    """Whether one encoder pass can serve every task of `model`: nothing hooks its forward (e.g.
    task-routed adapters, which change the encoder per task) and no head reads token states (only
    pooled vectors are kept across tasks)."""
    return (not model._forward_pre_hooks and not model._forward_hooks
            and not any(getattr(head, "reads_tokens", False) for head in model.heads.values()))


@torch.inference_mode()
def predict_datasets(model, datasets: list[EncodedDataset], batch_size: int = 128, device=torch.device("cpu"),
                     amp_dtype=None, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """predict_dataset for several datasets of any tasks in one shared encoder pass: every sequence
    of every dataset (a pair's cross-encoded and bi-encoded sequences too) goes through the encoder
    and pooler in length-sorted batches of `batch_size`, then each task's head reads its own pooled
    vectors. Many small requests of different tasks thus fill one batch (the server). Needs
    shares_encoder(model)."""
    model.eval()
    # every sequence as (dataset, example, slot), shortest first
    keys = [(d, i, s) for d, ds in enumerate(datasets) for i in range(len(ds)) for s in range(len(ds.inputs[i]))]
    keys.sort(key=lambda k: len(datasets[k[0]].inputs[k[1]][k[2]][0]))
    pooled = {}  # (dataset, example, slot) -> pooled vector [D]
    for start, end in length_batches([len(datasets[d].inputs[i][s][0]) for d, i, s in keys], batch_size):
        chunk = keys[start:end]
        inputs = {k: v.to(device) for k, v in pad([datasets[d].inputs[i][j] for d, i, j in chunk], pad_id).items()}
        with autocast(device, amp_dtype):
            vecs = model.encode(inputs).vec  # [B, D]
        pooled.update(zip(chunk, vecs))
    outs = []
    for d, ds in enumerate(datasets):
        task, n_slots = ds.task, len(ds.inputs[0]) if len(ds) else 0
        if not n_slots:
            outs.append({"pred": np.array([]), "prob": np.array([]), "logits": np.array([])})
            continue
        reps = [Rep(torch.stack([pooled[(d, i, j)] for i in range(len(ds))]), None, None) for j in range(n_slots)]
        with autocast(device, amp_dtype):
            logits = model.heads[task.name](*reps).float()
        outs.append({"pred": task.kind.predict(logits).cpu().numpy(), "prob": task.kind.probabilities(logits).cpu().numpy(),
                     "logits": logits.cpu().numpy()})
    return outs


# ---------------------------------------------------------------- predictors

class BasePredictor:
    """The predictor interface: `tasks` and `predict(task, examples)`.

    `predict` returns numpy arrays in example order: "pred" (label or score), "prob" (class
    probabilities, P(positive) for binary, the score for regression) and "logits" (raw outputs; for
    an ensemble the log of the averaged probabilities), plus "score" (= pred) for score tasks.
    `data_dir` is the run's configured data directory (None: the default), `meta` its meta.json."""

    name: str = ""
    data_dir: str | None = None
    meta: dict = {}
    scorer = None  # the run's overall score (core.tasks.OVERALL_SCORES); None: auto
    precision: str | None = None  # the resolved inference precision (fp32, bf16, fp16, int8) when known

    @property
    def tasks(self) -> list[str]:
        raise NotImplementedError

    def predict(self, task_name: str, examples: list[Example]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def predict_flagged(self, task_name: str, examples: list[Example]) -> tuple[dict[str, np.ndarray], list[bool]]:
        """`predict`, and per example whether the model cut it to fit its max_length (all False
        where the predictor cannot tell)."""
        return self.predict(task_name, examples), [False] * len(examples)

    def task_spec(self, task_name: str) -> TaskSpec:
        """The task as this model was trained on it (its labels, kind, columns), whatever another
        run loaded later in the same process declared under the same name."""
        self._check_task(task_name)
        return get_task(task_name)

    def _check_task(self, task_name: str) -> None:
        if task_name not in self.tasks:
            raise UnknownTaskError(f"{self.name or 'this model'} has no task {task_name!r}; it has {self.tasks}")


class Predictor(BasePredictor):
    """One model and its tokenizer (None if only pre-encoded datasets are passed)."""

    def __init__(self, model, tokenizer=None, device=torch.device("cpu"), amp_dtype=None, batch_size: int = 128,
                 pad_id: int | None = None, name: str = "", data_dir: str | None = None, meta: dict | None = None,
                 release_every: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.release_every = release_every  # (predict_dataset's: the trainer's evaluation sets it)
        self.device, self.amp_dtype, self.batch_size = torch.device(device), amp_dtype, batch_size
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else 0)
        self.name, self.data_dir, self.meta = name, data_dir, meta or {}

    @property
    def tasks(self) -> list[str]:
        return list(self.model.tasks)

    def task_spec(self, task_name: str) -> TaskSpec:
        self._check_task(task_name)
        return self.model.tasks[task_name]

    def encode(self, task_name: str, examples: list[Example]) -> EncodedDataset:
        self._check_task(task_name)
        if self.tokenizer is None:
            raise ValueError("this predictor has no tokenizer: pass it encoded datasets (predict_encoded)")
        return encode_dataset(self.model.tasks[task_name], examples, self.tokenizer,
                              self.model.pair_encoding.get(task_name, "cross"))

    def predict_encoded(self, ds: EncodedDataset) -> dict[str, np.ndarray]:
        out = predict_dataset(self.model, ds, self.batch_size, self.device, self.amp_dtype, self.pad_id,
                              release_every=self.release_every)
        return ds.task.kind.with_score(out)

    def predict(self, task_name: str, examples: list[Example]) -> dict[str, np.ndarray]:
        return self.predict_encoded(self.encode(task_name, examples))

    def predict_flagged(self, task_name: str, examples: list[Example]) -> tuple[dict[str, np.ndarray], list[bool]]:
        """The flags come from the same encoding the model reads (its tokenizer, its pair encoding)."""
        ds = self.encode(task_name, examples)
        return self.predict_encoded(ds), list(ds.truncated)

    def predict_encoded_many(self, datasets: list[EncodedDataset]) -> list[dict[str, np.ndarray]]:
        """predict_encoded for each of `datasets` (any tasks), in one shared encoder pass where the
        model allows it (predict_datasets), else one dataset after another."""
        if not shares_encoder(self.model):
            return [self.predict_encoded(ds) for ds in datasets]
        outs = predict_datasets(self.model, datasets, self.batch_size, self.device, self.amp_dtype, self.pad_id)
        return [ds.task.kind.with_score(out) for ds, out in zip(datasets, outs)]


def average_outputs(task: TaskSpec, outs: list[dict]) -> dict[str, np.ndarray]:
    """Combine member outputs for one task by its kind's averaging rule (core.kinds); a single
    member's outputs are returned unchanged."""
    if not outs:
        raise ValueError(f"task {task.name}: no member outputs to average")
    if len(outs) == 1:
        return dict(outs[0])
    return task.kind.average([o["prob"] for o in outs])


class EnsemblePredictor(BasePredictor):
    """Several predictors; task t averages the outputs of the members listed in task_members[t].
    Each member encodes the examples itself, so members may differ in tokenizer, pair encoding and
    heads."""

    def __init__(self, members: dict[str, BasePredictor], task_members: dict[str, list[str]], name: str = "",
                 data_dir: str | None = None, meta: dict | None = None):
        for task, names in task_members.items():
            if not names:
                raise ValueError(f"ensemble task {task}: no members")
            for m in names:
                if m not in members:
                    raise ValueError(f"ensemble task {task}: unknown member {m!r}")
                members[m]._check_task(task)
        self.members, self.task_members = members, {t: list(v) for t, v in task_members.items()}
        self.name, self.data_dir, self.meta = name, data_dir, meta or {}

    @property
    def tasks(self) -> list[str]:
        return list(self.task_members)

    def task_spec(self, task_name: str) -> TaskSpec:
        self._check_task(task_name)
        return self.members[self.task_members[task_name][0]].task_spec(task_name)

    def predict(self, task_name: str, examples: list[Example]) -> dict[str, np.ndarray]:
        return self.predict_flagged(task_name, examples)[0]

    def predict_flagged(self, task_name: str, examples: list[Example]) -> tuple[dict[str, np.ndarray], list[bool]]:
        """An example is flagged when any member cuts it; each member encodes the examples once."""
        self._check_task(task_name)
        outs, flags = [], [False] * len(examples)
        for m in self.task_members[task_name]:
            out, cut = self.members[m].predict_flagged(task_name, examples)
            outs.append(out)
            flags = [a or b for a, b in zip(flags, cut)]
        return average_outputs(self.task_spec(task_name), outs), flags


# ---------------------------------------------------------------- metrics

def score_outputs(outputs: dict[str, dict], examples: dict[str, list[Example]], scorer=None,
                  specs: dict[str, TaskSpec] | None = None) -> dict[str, float]:
    """Main metric per task (key: the task), its other metrics (key: "task/metric"), and the
    overall score where the scorer (default: auto, the CS224N leaderboard) defines one. `specs`:
    the tasks as the model knows them (default: the registry's)."""
    metrics, extra = {}, {}
    for name, out in outputs.items():
        task = (specs or {}).get(name) or get_task(name)
        gold = np.array([e.label for e in examples[name]])
        for m, value in task.all_metrics(out["pred"], gold).items():
            if m == task.main_metric:
                metrics[name] = value
            else:
                extra[f"{name}/{m}"] = value
    with using_tasks((specs or {}).values()):  # (a variant task of the model counts as its task)
        return {**with_overall(metrics, scorer), **extra}


def evaluate_examples(predictor: BasePredictor, examples: dict[str, list[Example]]) -> tuple[dict[str, float], dict]:
    """Metrics and raw outputs of any predictor on labelled examples per task."""
    outputs = {name: predictor.predict(name, ex) for name, ex in examples.items()}
    return score_outputs(outputs, examples, predictor.scorer, task_specs(predictor)), outputs


def metrics_for(model, datasets: dict[str, EncodedDataset], scorer=None, **kw) -> tuple[dict[str, float], dict]:
    """Metric per task (+ overall when sst, qqp and sts are all present) and the raw outputs.
    `model` is a MultitaskModel with `datasets` encoded for it (**kw: predict_dataset's batch_size,
    device, amp_dtype, pad_id), or a predictor, which encodes the datasets' examples itself."""
    if isinstance(model, BasePredictor):
        return evaluate_examples(model, {n: d.examples if isinstance(d, EncodedDataset) else d
                                         for n, d in datasets.items()})
    predictor = Predictor(model, **kw)
    outputs = {name: predictor.predict_encoded(ds) for name, ds in datasets.items()}
    return score_outputs(outputs, {name: ds.examples for name, ds in datasets.items()}, scorer,
                         {name: ds.task for name, ds in datasets.items()}), outputs


def load_examples(tasks, data_dir, split: str, limit=None) -> dict[str, list[Example]]:
    """The examples of each task (a TaskSpec, as a loaded model knows it, or a registered name)."""
    specs = [t if isinstance(t, TaskSpec) else get_task(t) for t in tasks]
    return {spec.name: load_split(spec, data_dir, split, limit)[0] for spec in specs}


def task_specs(predictor: BasePredictor) -> dict[str, TaskSpec]:
    """Every task of a loaded predictor as the model knows it."""
    return {name: predictor.task_spec(name) for name in predictor.tasks}


def encode_split(model, tokenizer, data_dir, split: str, limit=None) -> dict[str, EncodedDataset]:
    predictor = Predictor(model, tokenizer)
    return {name: predictor.encode(name, ex)
            for name, ex in load_examples(list(model.tasks.values()), data_dir, split, limit).items()}
