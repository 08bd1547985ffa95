"""The model behind the API: one worker thread runs the predictor, and requests are batched
across clients and tasks (see the package docstring)."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import HTTPException

from mtbert.apps.serve.hardening import cap
from mtbert.apps.serve.schemas import ROUTE_ADAPTERS, is_blank
from mtbert.core.errors import ConfigError
from mtbert.core.runtime import set_threads
from mtbert.data.readers import Example
from mtbert.inference.predictor import BasePredictor, Predictor

log = logging.getLogger("mtbert.serve")


@dataclass
class Pending:
    """A request waiting for the model: its task, its examples, and where its answer goes."""
    task: str
    examples: list[Example]
    answer: asyncio.Future


def routes_of(predictor: BasePredictor) -> dict[str, str]:
    """Route alias -> the model's task that answers it: the first of its tasks (in its order) whose
    definition declares that `route:`. A route no adapter knows, or a task whose kind the route's
    answer cannot carry, is a ConfigError."""
    routes = {}
    for task in predictor.tasks:
        spec = predictor.task_spec(task)
        if spec.route is None or spec.route in routes:
            continue
        adapter = ROUTE_ADAPTERS.get(spec.route)
        if not adapter.fits(spec):
            raise ConfigError(f"task {task} declares route {spec.route!r}, whose answer cannot carry a "
                              f"{type(spec.kind).__name__} {'pair' if spec.is_pair else 'single-text'} task")
        routes[spec.route] = task
    return routes


class ModelService:
    """The predictor, the request limits and the single worker thread the predictor runs on."""

    def __init__(self, predictor: BasePredictor, max_items: int, max_chars: int, max_batch_items: int = 256,
                 threads: int | None = None):
        self.predictor, self.max_items, self.max_chars = predictor, max_items, max_chars
        self.max_batch_items = max(max_batch_items, max_items)
        self.routes = routes_of(predictor)  # route alias -> the task answering it
        # (torch's intra-op thread count is per thread: set it on the thread that runs the model)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtbert-predict",
                                         initializer=set_threads, initargs=(threads,))
        self.waiting: list[Pending] = []
        self.drainer: asyncio.Task | None = None  # runs the waiting requests while there are any
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # requests per recent predictor call (tests, diagnostics)
        self.calls = self.requests = self.items = 0  # since the start

    def usage(self) -> str:
        per_call = f": {self.requests / self.calls:.1f} requests a call" if self.calls else ""
        return f"answered {self.requests} requests ({self.items} items) in {self.calls} model calls{per_call}"

    def task_for(self, route: str) -> str:
        if route in self.routes:
            return self.routes[route]
        raise HTTPException(404, f"this model was not trained for {route} (no task declares `route: {route}`); "
                                 f"it has tasks {self.predictor.tasks}")

    def check_items(self, field: str, items: list[tuple[str, ...]]) -> None:
        if len(items) > self.max_items:
            raise HTTPException(413, f"{len(items)} {field} in one request; the limit is {self.max_items}")
        for i, texts in enumerate(items):
            for j, text in enumerate(texts):
                where = f"{field}[{i}]" + (f"[{j}]" if len(texts) > 1 else "")
                if is_blank(text):
                    raise HTTPException(422, f"{where} is empty")
                if len(text) > self.max_chars:
                    raise HTTPException(413, f"{where} has {len(text)} characters; the limit is {self.max_chars}")
                try:  # the tokenizer takes UTF-8: a lone surrogate ("\ud800") would fail the whole batch
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise HTTPException(422, f"{where} is not valid Unicode ({e.reason} at character {e.start})") from None

    @property
    def shared_pass(self) -> bool:
        """One model with its tokenizer: the waiting requests of all tasks run in one predictor call."""
        return isinstance(self.predictor, Predictor) and self.predictor.tokenizer is not None

    def _predict(self, batches: list[tuple[str, list[Example]]]) -> list[tuple[dict, list[bool]]]:
        """(outputs, truncation flags) per (task, examples), on the worker thread. A single model
        encodes each task's examples once (the flags come from that encoding) and runs all tasks in
        one shared encoder pass where it can; an ensemble predicts task by task."""
        if self.shared_pass:
            datasets = [self.predictor.encode(task, examples) for task, examples in batches]
            outs = self.predictor.predict_encoded_many(datasets)
            return [(out, ds.truncated) for out, ds in zip(outs, datasets)]
        return [self.predictor.predict_flagged(task, examples) for task, examples in batches]

    async def predict(self, route: str, field: str, items: list[tuple[str, ...]]) -> tuple[str, dict, list[bool]]:
        return await self.predict_task(self.task_for(route), field, items, route)

    async def predict_task(self, task: str, field: str, items: list[tuple[str, ...]],
                           route: str | None = None) -> tuple[str, dict, list[bool]]:
        route = route or f"tasks/{task}"
        self.check_items(field, items)
        examples = [Example(str(i), tuple(texts), None) for i, texts in enumerate(items)]
        answer = asyncio.get_running_loop().create_future()
        self.waiting.append(Pending(task, examples, answer))
        if self.drainer is None or self.drainer.done():  # (kept referenced, so it is not collected)
            self.drainer = asyncio.create_task(self._drain())
        try:
            out, truncated = await answer
        except Exception as e:  # a failed prediction is this request's 500, never the server's end
            log.error("prediction failed for %s: %s: %s", route, type(e).__name__, e)
            raise HTTPException(500, cap(f"prediction failed: {type(e).__name__}: {e}", 200)) from e
        return task, out, truncated

    async def _drain(self) -> None:
        """Run the waiting requests, those of all tasks together, until none is left."""
        while self.waiting:
            group, items = [], 0
            for req in self.waiting:
                if group and items + len(req.examples) > self.max_batch_items:
                    break
                group.append(req)
                items += len(req.examples)
            self.waiting = self.waiting[len(group):]
            if not await self._answer(group) and len(group) > 1:
                # one request may have failed them all: run each on its own, so only the faulty one fails
                log.warning("a batch of %d requests failed; answering them one by one", len(group))
                for req in group:
                    await self._answer([req])

    async def _answer(self, group: list) -> bool:
        """Run `group`'s requests in one worker call (each task's examples together) and give each
        request its slice of its task's result. False if the call failed: with one request, that
        request gets the error."""
        group = [req for req in group if not req.answer.done()]  # (a client that went away cancels its future)
        if not group:
            return True
        by_task: dict[str, list[Pending]] = {}
        for req in group:
            by_task.setdefault(req.task, []).append(req)
        # requests per predictor call: one call for all of them, or one per task
        self.batch_sizes.extend([len(group)] if self.shared_pass else [len(reqs) for reqs in by_task.values()])
        batches = [(task, [ex for req in reqs for ex in req.examples]) for task, reqs in by_task.items()]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.worker, self._predict, batches)
        except Exception as e:
            if len(group) == 1 and not group[0].answer.done():
                group[0].answer.set_exception(e)
            return False
        for reqs, (out, truncated) in zip(by_task.values(), results):
            start = 0
            for req in reqs:  # each request its own slice of the arrays
                end = start + len(req.examples)
                if not req.answer.done():
                    req.answer.set_result(({k: v[start:end] for k, v in out.items()}, truncated[start:end]))
                start = end
        self.calls += 1 if self.shared_pass else len(by_task)
        self.requests += len(group)
        self.items += sum(len(req.examples) for req in group)
        return True
