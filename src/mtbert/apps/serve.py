"""HTTP JSON API and a small web page over a trained run: `mtbert serve RUN_DIR`.

Routes: GET / (web page), GET /health, GET /v1/info, POST /v1/sentiment, /v1/paraphrase,
/v1/similarity (OpenAPI schema at /openapi.json, interactive docs at /docs).

Batching and concurrency: the model is loaded once and runs on a single dedicated worker thread,
so requests queue for it instead of racing on it, while the event loop stays free to answer
/health and reject bad requests. Requests are batched across clients and routes: while the model
works, arriving requests wait; when it is free, all waiting requests (up to `max_batch_items`
items, whatever their task) go to the worker in one call. A single model (Predictor) tokenises
each task's examples once (the `truncated` flags come from that encoding) and runs every sequence
of every task through the shared encoder together (Predictor.predict_encoded_many: length-sorted
passes of at most `batch_size` sequences, split where padding costs more than another pass), then
each task's head; an ensemble predicts task by task, each member encoding once
(EnsemblePredictor.predict_flagged). Each request gets its own slice of the
result. Nothing waits for a batch to fill, so a lone request is answered at once. The predictor
runs under torch.inference_mode; `threads` sets the worker's torch intra-op threads.

Limits: at most `max_items` texts or pairs per request (413), at most `max_chars` characters per
text (413), request bodies of at most `max_body_bytes` (413); empty texts, texts that are not valid
Unicode (lone surrogates) and non-finite numbers (NaN, Infinity, 1e999) are refused (422).
Texts longer than the model's max_length tokens are truncated as in training and flagged with
`"truncated": true`. Every error is JSON with a readable "detail" string of at most
MAX_DETAIL_CHARS characters (an input is never echoed back whole).

One client cannot fail another: input is validated before it joins a batch, and if a merged batch
fails anyway, each of its requests is run again on its own, so only the faulty one fails.

Hostile clients (`serve`): a connection must deliver a complete request head within
`read_timeout` seconds of connecting or of its last response, and a request body within
`read_timeout` seconds (408); idle keep-alive connections close after `keep_alive_timeout`; at most
`max_connections` at once (more: 503). Only requests whose Host header names a trusted host are
answered (400 otherwise: DNS rebinding), by default the loopback names and the address served on.
/docs works offline (Swagger UI assets from the fastapi-offline package) or is off.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import unicodedata
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from mtbert import __version__
from mtbert.core.errors import ConfigError
from mtbert.core.io import read_json, read_yaml
from mtbert.core.rundir import RunDir
from mtbert.core.runtime import set_threads
from mtbert.data.readers import Example
from mtbert.inference.api import describe_task
from mtbert.inference.ensemble import ENSEMBLE_FILE, is_ensemble_dir
from mtbert.inference.loading import load_predictor
from mtbert.inference.outputs import prediction_records
from mtbert.inference.predictor import BasePredictor, EnsemblePredictor, Predictor

log = logging.getLogger("mtbert.serve")

# route -> the model tasks that can answer it, in order of preference
ROUTE_TASKS = {"sentiment": ("sst", "cfimdb"), "paraphrase": ("qqp",), "similarity": ("sts", "sts_bins")}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # trusted Host headers unless widened (IPv6 in brackets)
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
MAX_DETAIL_CHARS = 500  # an error's "detail" (never a client's whole input echoed back)
MAX_ERRORS = 10         # validation errors listed per response


# ---------------------------------------------------------------- request and response bodies


# Characters that show nothing on their own: spaces and line breaks, format characters (zero-width
# space and joiners, BOM) and combining marks. A text of only these is blank.
INVISIBLE = {"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Me"}


def is_blank(text: str) -> bool:
    return all(c.isspace() or unicodedata.category(c) in INVISIBLE for c in text)

class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, examples=[["A gripping, funny and moving film."]])


class PairsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[tuple[str, str]] = Field(min_length=1, examples=[[["How do I learn Python?",
                                                                  "What is the best way to learn Python?"]]])


class TaskRequest(BaseModel):
    """Any task of the run: `texts` for a single-sentence task, `pairs` for a pair task."""
    model_config = ConfigDict(extra="forbid")
    texts: list[str] | None = Field(default=None, min_length=1, examples=[["A gripping, funny and moving film."]])
    pairs: list[tuple[str, str]] | None = Field(default=None, min_length=1)


class TaskResponse(BaseModel):
    task: str
    results: list[dict] = Field(description="per item: label, label_index and probabilities (or probability, "
                                            "binary), or score; and truncated")


class SentimentResult(BaseModel):
    label: int
    label_name: str
    probability: float = Field(description="probability of the predicted label")
    probabilities: list[float] = Field(description="one per label, in label order (see /v1/info)")
    truncated: bool


class ParaphraseResult(BaseModel):
    probability: float
    is_paraphrase: bool
    truncated: bool


class SimilarityResult(BaseModel):
    score: float = Field(description="0 (unrelated) to 5 (same meaning)")
    truncated: bool


class SentimentResponse(BaseModel):
    task: str
    results: list[SentimentResult]


class ParaphraseResponse(BaseModel):
    task: str
    results: list[ParaphraseResult]


class SimilarityResponse(BaseModel):
    task: str
    results: list[SimilarityResult]


# ---------------------------------------------------------------- the model behind the API

def leaf_predictors(predictor: BasePredictor) -> list[Predictor]:
    """The single-model predictors inside `predictor` (an ensemble's members, recursively)."""
    if isinstance(predictor, EnsemblePredictor):
        return [leaf for member in predictor.members.values() for leaf in leaf_predictors(member)]
    return [predictor] if isinstance(predictor, Predictor) else []


def describe(predictor: BasePredictor, run_dir: Path | None) -> dict:
    """Backbone(s), max tokens and dev metrics for /v1/info, read from the checkpoints and run."""
    checkpoints = [Path(leaf.name) for leaf in leaf_predictors(predictor)]  # a Predictor's name is its checkpoint
    if run_dir and is_ensemble_dir(run_dir):  # an ensemble's members are named; ensemble.json has their paths
        members = read_json(run_dir / ENSEMBLE_FILE)["members"]
        checkpoints = [Path(m["checkpoint"]) for m in members if m["name"] in predictor.members]
    backbones = [_public_name((read_yaml(c) or {}).get("model", {}).get("backbone"))
                 for c in (ckpt / "config.yaml" for ckpt in checkpoints) if c.exists()]
    max_tokens = [leaf.tokenizer.max_length for leaf in leaf_predictors(predictor) if leaf.tokenizer is not None]
    dev = predictor.meta.get("dev")
    if dev is None and run_dir:
        dev = (RunDir(run_dir).read_summary() or {}).get("best_dev")
    return {"backbone": backbones[0] if len(set(backbones)) == 1 else backbones,
            "ensemble": isinstance(predictor, EnsemblePredictor),
            "dev_metrics": dev or {}, "max_tokens": min(max_tokens) if max_tokens else None}


def _public_name(value) -> str:
    """A name for responses: a path (a checkpoint used as backbone, a run directory) by its last
    part only, so the server's file system layout is never shown."""
    text = str(value)
    return Path(text).name or text if ("/" in text or "\\" in text) else text


def _cap(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text` short enough for an error response, and encodable (lone surrogates escaped)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ModelService:
    """The predictor, the request limits and the single worker thread the predictor runs on."""

    def __init__(self, predictor: BasePredictor, max_items: int, max_chars: int, max_batch_items: int = 256,
                 threads: int | None = None):
        self.predictor, self.max_items, self.max_chars = predictor, max_items, max_chars
        self.max_batch_items = max(max_batch_items, max_items)
        # route -> the task answering it, for the routes this model can answer
        self.routes = {route: next(t for t in tasks if t in predictor.tasks)
                       for route, tasks in ROUTE_TASKS.items() if any(t in predictor.tasks for t in tasks)}
        # (torch's intra-op thread count is per thread: set it on the thread that runs the model)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtbert-predict",
                                         initializer=set_threads, initargs=(threads,))
        self.waiting: list[tuple[str, list[Example], asyncio.Future]] = []  # (task, examples, its answer)
        self.drainer: asyncio.Task | None = None  # runs the waiting requests while there are any
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # requests per recent predictor call (tests, diagnostics)
        self.calls = self.requests = self.items = 0  # since the start

    def usage(self) -> str:
        per_call = f": {self.requests / self.calls:.1f} requests a call" if self.calls else ""
        return f"answered {self.requests} requests ({self.items} items) in {self.calls} model calls{per_call}"

    def task_for(self, route: str) -> str:
        if route in self.routes:
            return self.routes[route]
        raise HTTPException(404, f"this model was not trained for {route} (no task {' or '.join(ROUTE_TASKS[route])}); "
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
        self.waiting.append((task, examples, answer))
        if self.drainer is None or self.drainer.done():  # (kept referenced, so it is not collected)
            self.drainer = asyncio.create_task(self._drain())
        try:
            out, truncated = await answer
        except Exception as e:  # a failed prediction is this request's 500, never the server's end
            log.error("prediction failed for %s: %s: %s", route, type(e).__name__, e)
            raise HTTPException(500, _cap(f"prediction failed: {type(e).__name__}: {e}", 200)) from e
        return task, out, truncated

    async def _drain(self) -> None:
        """Run the waiting requests, those of all tasks together, until none is left."""
        while self.waiting:
            group, items = [], 0
            for req in self.waiting:
                if group and items + len(req[1]) > self.max_batch_items:
                    break
                group.append(req)
                items += len(req[1])
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
        group = [req for req in group if not req[2].done()]  # (a client that went away cancels its future)
        if not group:
            return True
        by_task: dict[str, list] = {}
        for req in group:
            by_task.setdefault(req[0], []).append(req)
        # requests per predictor call: one call for all of them, or one per task
        self.batch_sizes.extend([len(group)] if self.shared_pass else [len(reqs) for reqs in by_task.values()])
        batches = [(task, [ex for _, exs, _ in reqs for ex in exs]) for task, reqs in by_task.items()]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.worker, self._predict, batches)
        except Exception as e:
            if len(group) == 1 and not group[0][2].done():
                group[0][2].set_exception(e)
            return False
        for reqs, (out, truncated) in zip(by_task.values(), results):
            start = 0
            for _, exs, answer in reqs:  # each request its own slice of the arrays
                end = start + len(exs)
                if not answer.done():
                    answer.set_result(({k: v[start:end] for k, v in out.items()}, truncated[start:end]))
                start = end
        self.calls += 1 if self.shared_pass else len(by_task)
        self.requests += len(group)
        self.items += sum(len(exs) for _, exs, _ in group)
        return True


# ---------------------------------------------------------------- the app

def error_response(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": _cap(detail), **extra}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413 before they are parsed, and
    bodies that do not arrive within `read_timeout` seconds with 408 (a slow client holds no
    request open for long). The body is read here (at most max_bytes of it) and replayed to the app."""

    def __init__(self, app, max_bytes: int, read_timeout: float = 10.0):
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        messages, size, deadline = [], 0, loop.time() + self.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                response = error_response(408, f"request body not received within {self.read_timeout:g} s",
                                          headers={"connection": "close"})
                return await response(scope, receive, send)
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                response = error_response(413, f"request body over {self.max_bytes} bytes")
                return await response(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


class StrictJSONRequest(Request):
    """A request whose JSON body may hold finite numbers only (Python's json accepts NaN, Infinity
    and 1e999 -> inf), and whose every parse failure (bad UTF-8, a 5,000-digit integer, nesting too
    deep) is a JSON decode error, so it becomes a 422 like any other invalid JSON."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
            except json.JSONDecodeError:
                raise
            except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
                raise json.JSONDecodeError(str(e) if not isinstance(e, RecursionError) else "nested too deeply",
                                           "", 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if request.method == "POST" and kind and not (kind == "application/json" or kind.endswith("+json")):
                # (else the body would be validated as if it were JSON and fail with a misleading 422)
                return error_response(415, f"request body must be JSON (Content-Type: application/json), got {_cap(kind, 64)}")
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def _validation_message(errors: list[dict]) -> str:
    """One readable line from pydantic errors, e.g. "texts[1]: Input should be a valid string"."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc.lstrip('.') or 'body'}: {err.get('msg')}")
    return "; ".join(parts)


def _short_errors(errors: list[dict]) -> list[dict]:
    """Pydantic's errors without the offending input (it may be megabytes, bytes or NaN): where,
    what and which kind, each part capped."""
    short = []
    for err in errors[:MAX_ERRORS]:
        item = {"loc": [x if isinstance(x, int) else _cap(str(x), 64) for x in err.get("loc", ())],
                "msg": _cap(str(err.get("msg", "")), 200), "type": str(err.get("type", ""))}
        if "error" in (err.get("ctx") or {}):  # (why the JSON did not parse)
            item["ctx"] = {"error": _cap(str(err["ctx"]["error"]), 200)}
        short.append(item)
    return short


def _route_info(route: str, spec) -> dict:
    task = spec.name
    extra = {"range": list(spec.label_range)} if spec.kind.scores else {"labels": list(spec.label_names or ())}
    return {"path": f"/v1/{route}", "task": task, **extra}


def _new_app(docs: bool, lifespan=None) -> FastAPI:
    """The FastAPI app, with /docs served from the fastapi-offline package's Swagger UI files (no
    CDN), or without /docs where that package is missing or `docs` is False. No /redoc."""
    options = dict(title="mtbert", version=__version__, lifespan=lifespan,
                   description="Every task of a multitask BERT run (/v1/tasks/{task}), and sentiment, paraphrase and similarity routes for the CS224N tasks.")
    if docs:
        try:
            from fastapi_offline import FastAPIOffline
        except ImportError:
            log.warning("/docs is off: install fastapi-offline for API docs that work offline")
        else:
            return FastAPIOffline(redoc_url=None, **options)
    return FastAPI(docs_url=None, redoc_url=None, **options)


def create_app(predictor_or_run_dir: BasePredictor | str | Path, *, max_items: int = 64, max_chars: int = 20_000,
               max_body_bytes: int = 2 * 1024 * 1024, device: str = "auto", precision: str = "auto",
               batch_size: int = 128, max_batch_items: int = 256, threads: int | None = None, read_timeout: float = 10.0,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS, docs: bool = True) -> FastAPI:
    """The FastAPI app serving a predictor, or the run / checkpoint / ensemble directory it loads from.
    `allowed_hosts`: the Host header names answered ("*": any). `threads`: torch intra-op threads
    for the model (None: torch's default, one per core)."""
    if min(max_items, max_chars, max_body_bytes, batch_size, max_batch_items, 1 if threads is None else threads) < 1:
        raise ConfigError("max_items, max_chars, max_body_bytes, batch_size, max_batch_items and threads must be positive")
    if not (math.isfinite(read_timeout) and read_timeout > 0):
        raise ConfigError(f"read_timeout must be a positive number of seconds, got {read_timeout}")
    if isinstance(predictor_or_run_dir, BasePredictor):
        predictor, run_dir = predictor_or_run_dir, None
    else:
        run_dir = Path(predictor_or_run_dir)
        predictor = load_predictor(run_dir, device, precision, batch_size)
    service = ModelService(predictor, max_items, max_chars, max_batch_items, threads)
    run_name = run_dir.resolve().name if run_dir else predictor.name
    info = {"mtbert_version": __version__, "run": _public_name(run_name), "tasks": predictor.tasks,
            **describe(predictor, run_dir)}
    info["routes"] = {route: _route_info(route, predictor.task_spec(task)) for route, task in service.routes.items()}
    info["task_info"] = {t: {**describe_task(predictor.task_spec(t)), "path": f"/v1/tasks/{t}"} for t in predictor.tasks}
    info["limits"] = {"max_items": max_items, "max_batch_items": service.max_batch_items, "max_chars": max_chars,
                      "max_body_bytes": max_body_bytes,
                      "max_tokens": info.pop("max_tokens")}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        print(f"stopping: {service.usage()}", flush=True)  # (how many requests a model call served)

    app = _new_app(docs, lifespan)
    app.router.route_class = StrictJSONRoute  # (for the routes added below)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, read_timeout=read_timeout)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)  # outermost

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = _short_errors(exc.errors())
        return error_response(422, _validation_message(errors), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("mtbert.apps").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def model_info():
        return info

    @app.post("/v1/tasks/{task}", response_model=TaskResponse)
    async def any_task(task: str, body: TaskRequest):
        if task not in predictor.tasks:
            raise HTTPException(404, _cap(f"this model has no task {task!r}; it has {predictor.tasks}"))
        spec = predictor.task_spec(task)
        field, given = ("pairs", body.pairs) if spec.is_pair else ("texts", body.texts)
        other = body.texts if spec.is_pair else body.pairs
        if given is None or other is not None:
            raise HTTPException(422, f"task {task} takes {{\"{field}\": [...]}}"
                                     f" ({'pairs of sentences' if spec.is_pair else 'single sentences'})")
        items = [tuple(p) for p in given] if spec.is_pair else [(t,) for t in given]
        _, out, truncated = await service.predict_task(task, field, items)
        if spec.kind.scores and spec.label_range:  # a regression head can overshoot its declared range
            out = {**out, "pred": np.clip(np.asarray(out["pred"], dtype=np.float64), *spec.label_range)}
        return TaskResponse(task=task, results=[{**rec, "truncated": cut} for rec, cut in
                                                zip(prediction_records(spec, out), truncated)])

    @app.post("/v1/sentiment", response_model=SentimentResponse)
    async def sentiment(body: TextsRequest):
        task, out, truncated = await service.predict("sentiment", "texts", [(t,) for t in body.texts])
        names = predictor.task_spec(task).label_names
        results = []
        for i, cut in enumerate(truncated):
            label, probs = int(out["pred"][i]), [float(p) for p in out["prob"][i]]
            results.append(SentimentResult(label=label, label_name=names[label] if names else str(label),
                                           probability=probs[label], probabilities=probs, truncated=cut))
        return SentimentResponse(task=task, results=results)

    @app.post("/v1/paraphrase", response_model=ParaphraseResponse)
    async def paraphrase(body: PairsRequest):
        task, out, truncated = await service.predict("paraphrase", "pairs", body.pairs)
        return ParaphraseResponse(task=task, results=[
            ParaphraseResult(probability=float(out["prob"][i]), is_paraphrase=bool(out["pred"][i]), truncated=cut)
            for i, cut in enumerate(truncated)])

    @app.post("/v1/similarity", response_model=SimilarityResponse)
    async def similarity(body: PairsRequest):
        task, out, truncated = await service.predict("similarity", "pairs", body.pairs)
        lo, hi = predictor.task_spec(task).label_range
        # a regression head can overshoot the gold range; clip to the scale the API promises
        scores = np.clip(np.asarray(out["score"], dtype=np.float64), lo, hi)
        return SimilarityResponse(task=task, results=[SimilarityResult(score=float(s), truncated=cut)
                                                      for s, cut in zip(scores, truncated)])

    return app


# ---------------------------------------------------------------- the server

def trusted_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host header names to answer: the loopback names, the address served on (unless it is a
    wildcard: then clients on other machines name the server, and those names must be in `extra`),
    and `extra` (names, comma-separated lists, '*.example.com', or '*' for any)."""
    def literal(name: str) -> str:  # a Host header writes an IPv6 address in brackets
        return f"[{name}]" if ":" in name and not name.startswith("[") else name

    hosts = list(LOOPBACK_HOSTS) + ([literal(host)] if host not in WILDCARD_ADDRESSES else [])
    for part in (p.strip() for name in extra for p in str(name).split(",")):
        if part and ("*" in part[1:] or (part.startswith("*") and part != "*" and not part.startswith("*."))):
            raise ConfigError(f"allowed host {part!r}: a wildcard must be '*' or like '*.example.com'")
        if part == "*":
            return ["*"]
        if part:
            hosts.append(literal(part))
    return list(dict.fromkeys(hosts))


def read_deadline_protocol(read_timeout: float) -> type:
    """uvicorn's HTTP protocol, closing a connection that has not sent a complete request head within
    `read_timeout` seconds of connecting or of its last response. (uvicorn's keep-alive timer
    restarts on every byte received, so a client sending its head a byte at a time would hold the
    connection for ever; the body has BodyLimit's deadline.)"""
    class ReadDeadlineProtocol(AutoHTTPProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a complete head: the request is the app's now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return ReadDeadlineProtocol


def server_config(app: FastAPI, *, read_timeout: float = 10.0, keep_alive_timeout: float = 5.0,
                  max_connections: int = 100, log_level: str = "info"):
    """uvicorn's settings against slow and numerous clients."""
    if not all(math.isfinite(t) and t > 0 for t in (read_timeout, keep_alive_timeout)):
        raise ConfigError("read_timeout and keep_alive_timeout must be positive numbers of seconds")
    if max_connections < 1:
        raise ConfigError(f"max_connections must be at least 1, got {max_connections}")
    return uvicorn.Config(app, http=read_deadline_protocol(read_timeout), timeout_keep_alive=keep_alive_timeout,
                          limit_concurrency=max_connections, log_level=log_level, server_header=False)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (an OSError, e.g. address in use, before the model loads)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {port}")
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, allowed_hosts: Sequence[str] = (),
          read_timeout: float = 10.0, keep_alive_timeout: float = 5.0, max_connections: int = 100,
          **app_options) -> None:
    """Load the model, then serve it with uvicorn until interrupted."""
    hosts = trusted_hosts(host, allowed_hosts)
    sock = bind_socket(host, port)
    try:
        app = create_app(run_dir, read_timeout=read_timeout, allowed_hosts=hosts, **app_options)
        config = server_config(app, read_timeout=read_timeout, keep_alive_timeout=keep_alive_timeout,
                               max_connections=max_connections)
        port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {run_dir} on http://{shown}:{port}/  (API docs: /docs; answering Host "
              f"{', '.join(hosts)})", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
