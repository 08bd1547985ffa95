"""The model behind the API: requests batched across clients and tasks, one call at a time to
the model (in its worker process, or on a thread: `worker`; see the package docstring)."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from fastapi import HTTPException

from mtbert.apps.serve.hardening import cap
from mtbert.apps.serve.schemas import ROUTE_ADAPTERS, is_blank
from mtbert.apps.serve.worker import (
    ModelFacts,
    ProcessModel,
    ThreadModel,
    WorkerDied,
    WorkerRestarting,
)
from mtbert.core.errors import ConfigError
from mtbert.core.tasks import TaskSpec
from mtbert.data.readers import Example

log = logging.getLogger("mtbert.serve")


@dataclass
class Pending:
    """A request waiting for the model: its task, its examples, and where its answer goes."""
    task: str
    examples: list[Example]
    answer: asyncio.Future


def routes_of(facts: ModelFacts) -> dict[str, str]:
    """Route alias -> the model's task that answers it: the first of its tasks (in its order) whose
    definition declares that `route:`. A route no adapter knows, or a task whose kind the route's
    answer cannot carry, is a ConfigError."""
    routes = {}
    for task in facts.tasks:
        spec = facts.specs[task]
        if spec.route is None or spec.route in routes:
            continue
        adapter = ROUTE_ADAPTERS.get(spec.route)
        if not adapter.fits(spec):
            raise ConfigError(f"task {task} declares route {spec.route!r}, whose answer cannot carry a "
                              f"{type(spec.kind).__name__} {'pair' if spec.is_pair else 'single-text'} task")
        routes[spec.route] = task
    return routes


RETRY_AFTER_S = 5  # about one model load: what a client should wait while a worker restarts


def unavailable(why: str) -> HTTPException:
    """503 with Retry-After: the model cannot answer now (a worker is restarting)."""
    return HTTPException(503, f"{why}; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)})


class ModelService:
    """The model (a ProcessModel or ThreadModel), the request limits, and the requests waiting for it."""

    def __init__(self, model: ProcessModel | ThreadModel, max_items: int, max_chars: int, max_batch_items: int = 256):
        self.model, self.max_items, self.max_chars = model, max_items, max_chars
        self.facts = model.facts
        self.max_batch_items = max(max_batch_items, max_items)
        self.routes = routes_of(self.facts)  # route alias -> the task answering it
        self.waiting: list[Pending] = []
        self.drainer: asyncio.Task | None = None  # runs the waiting requests while there are any
        self.arrived = asyncio.Event()  # a request joined the waiting ones
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # requests per recent predictor call (tests, diagnostics)
        self.calls = self.requests = self.items = 0  # since the start

    def usage(self) -> str:
        per_call = f": {self.requests / self.calls:.1f} requests a call" if self.calls else ""
        return f"answered {self.requests} requests ({self.items} items) in {self.calls} model calls{per_call}"

    @property
    def tasks(self) -> list[str]:
        return self.facts.tasks

    def task_spec(self, task: str) -> TaskSpec:
        return self.facts.specs[task]

    @property
    def status(self) -> str:
        """ok, or the state of a worker that is not ready: restarting | failed | stopped."""
        return self.model.status

    @property
    def ready(self) -> bool:
        """At least one worker can take a call."""
        return self.model.capacity > 0

    def task_for(self, route: str) -> str:
        if route in self.routes:
            return self.routes[route]
        raise HTTPException(404, f"this model was not trained for {route} (no task declares `route: {route}`); "
                                 f"it has tasks {self.tasks}")

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
        """One model with its tokenizer: the waiting requests of all tasks run in one model call."""
        return self.facts.shared_pass

    async def predict(self, route: str, field: str, items: list[tuple[str, ...]]) -> tuple[str, dict, list[bool]]:
        return await self.predict_task(self.task_for(route), field, items, route)

    async def predict_task(self, task: str, field: str, items: list[tuple[str, ...]],
                           route: str | None = None) -> tuple[str, dict, list[bool]]:
        route = route or f"tasks/{task}"
        self.check_items(field, items)
        if not self.ready:
            raise unavailable(f"the model is {self.status}")
        examples = [Example(str(i), tuple(texts), None) for i, texts in enumerate(items)]
        answer = asyncio.get_running_loop().create_future()
        self.waiting.append(Pending(task, examples, answer))
        self.arrived.set()
        if self.drainer is None or self.drainer.done():  # (kept referenced, so it is not collected)
            self.drainer = asyncio.create_task(self._drain())
        try:
            out, truncated = await answer
        except (WorkerDied, WorkerRestarting) as e:  # answered once, never run again
            raise unavailable(str(e)) from None
        except Exception as e:  # a failed prediction is this request's 500, never the server's end
            log.error("prediction failed for %s: %s: %s", route, type(e).__name__, e)
            raise HTTPException(500, cap(f"prediction failed: {type(e).__name__}: {e}", 200)) from e
        return task, out, truncated

    async def _drain(self) -> None:
        """Run the waiting requests, those of all tasks together, until none is left: one call at
        a time per ready worker, each taking all that waits when a worker comes free."""
        running: set[asyncio.Task] = set()
        while self.waiting or running:
            while self.waiting and len(running) < max(self.model.capacity, 1):
                running.add(asyncio.create_task(self._run(self._next_group())))
            self.arrived.clear()
            arrival = asyncio.create_task(self.arrived.wait())  # (a free worker takes a new request at once)
            done, _ = await asyncio.wait(running | {arrival}, return_when=asyncio.FIRST_COMPLETED)
            arrival.cancel()
            running -= done

    def _next_group(self) -> list[Pending]:
        """The waiting requests, oldest first, up to max_batch_items items (at least one request)."""
        group, items = [], 0
        for req in self.waiting:
            if group and items + len(req.examples) > self.max_batch_items:
                break
            group.append(req)
            items += len(req.examples)
        self.waiting = self.waiting[len(group):]
        return group

    async def _run(self, group: list[Pending]) -> None:
        if not await self._answer(group) and len(group) > 1:
            # one request may have failed them all: run each on its own, so only the faulty one fails
            log.warning("a batch of %d requests failed; answering them one by one", len(group))
            for req in group:
                await self._answer([req])

    async def _answer(self, group: list) -> bool:
        """Run `group`'s requests in one model call (each task's examples together) and give each
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
            results = await self.model.call(batches)
        except (WorkerDied, WorkerRestarting) as e:  # every request of the call gets it; none runs again
            for req in group:
                if not req.answer.done():
                    req.answer.set_exception(e)
            return True
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
