"""The app: routes on an APIRouter that reads the model service from the app's state, the
/v1/info description, and `serve`, which binds, loads and runs uvicorn."""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mtbert import __version__
from mtbert.apps.serve.batching import ModelService
from mtbert.apps.serve.hardening import (
    LOOPBACK_HOSTS,
    BodyLimit,
    StrictJSONRoute,
    bind_socket,
    cap,
    error_response,
    server_config,
    short_errors,
    trusted_hosts,
    validation_message,
)
from mtbert.apps.serve.schemas import (
    ROUTE_ADAPTERS,
    RouteAdapter,
    TaskRequest,
    TaskResponse,
)
from mtbert.apps.serve.worker import (
    ProcessModel,
    ThreadModel,
    auto_workers,
    public_name,
)
from mtbert.core.errors import ConfigError
from mtbert.core.runtime import resolve_inference_precision, select_device
from mtbert.inference.api import describe_task
from mtbert.inference.loading import int8_check_passed, load_predictor
from mtbert.inference.outputs import prediction_records
from mtbert.inference.predictor import BasePredictor

log = logging.getLogger("mtbert.serve")


def _route_info(route: str, spec) -> dict:
    extra = {"range": list(spec.label_range)} if spec.kind.scores else {"labels": list(spec.label_names or ())}
    return {"path": f"/v1/{route}", "task": spec.name, **extra}


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


# ---------------------------------------------------------------- routes

router = APIRouter(route_class=StrictJSONRoute)


def _service(request: Request) -> ModelService:
    return request.app.state.service


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return resources.files("mtbert.apps").joinpath("static/index.html").read_text(encoding="utf-8")


@router.get("/health")
async def health(request: Request):
    service = _service(request)  # ok, or a model worker restarting (503 while none can answer)
    return JSONResponse({"status": service.status}, status_code=200 if service.ready else 503)


@router.get("/v1/info")
async def model_info(request: Request):
    return request.app.state.info


@router.post("/v1/tasks/{task}", response_model=TaskResponse)
async def any_task(task: str, body: TaskRequest, request: Request):
    service = _service(request)
    if task not in service.tasks:
        raise HTTPException(404, cap(f"this model has no task {task!r}; it has {service.tasks}"))
    spec = service.task_spec(task)
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


def _alias(adapter: RouteAdapter):
    """POST /v1/{adapter.name}: the adapter's request shape in, its response shape out, over the
    task that declares the route."""
    async def answer(body, request: Request):
        service = _service(request)
        items = [tuple(p) for p in body.pairs] if adapter.field == "pairs" else [(t,) for t in body.texts]
        task, out, truncated = await service.predict(adapter.name, adapter.field, items)
        return adapter.response(task=task, results=adapter.results(service.task_spec(task), out, truncated))
    answer.__name__ = adapter.name
    answer.__annotations__ = {"body": adapter.request, "request": Request}  # (FastAPI reads the body's model here)
    router.add_api_route(f"/v1/{adapter.name}", answer, methods=["POST"], response_model=adapter.response)


for _adapter in ROUTE_ADAPTERS.values():
    _alias(_adapter)


# ---------------------------------------------------------------- the app

def create_app(predictor_or_run_dir: BasePredictor | str | Path, *, max_items: int = 64, max_chars: int = 20_000,
               max_body_bytes: int = 2 * 1024 * 1024, device: str = "auto", precision: str = "auto",
               batch_size: int = 128, max_batch_items: int = 256, threads: int | None = None, read_timeout: float = 10.0,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS, docs: bool = True, worker: str = "process",
               workers: int | None = None) -> FastAPI:
    """The FastAPI app serving a predictor, or the run / checkpoint / ensemble directory it loads from.
    `allowed_hosts`: the Host header names answered ("*": any). `threads`: torch intra-op threads
    for the model (None: torch's default, one per core). `worker`: where a directory's model runs,
    "process" (a worker process of its own, off the server's GIL) or "thread" (a thread of this
    process); a predictor object always runs on a thread. `workers`: how many worker processes,
    each with the whole model and `threads` threads, run calls side by side (None: auto_workers,
    one single-threaded worker per core, at most 4, on a CPU; one on a GPU)."""
    if min(max_items, max_chars, max_body_bytes, batch_size, max_batch_items, 1 if workers is None else workers,
           1 if threads is None else threads) < 1:
        raise ConfigError("max_items, max_chars, max_body_bytes, batch_size, max_batch_items, workers and threads "
                          "must be positive")
    if not (math.isfinite(read_timeout) and read_timeout > 0):
        raise ConfigError(f"read_timeout must be a positive number of seconds, got {read_timeout}")
    if worker not in ("process", "thread"):
        raise ConfigError(f"worker must be process or thread, got {worker!r}")
    if (workers or 1) > 1 and (worker == "thread" or isinstance(predictor_or_run_dir, BasePredictor)):
        raise ConfigError(f"{workers} workers need worker processes: a run directory served with worker=process")
    run_dir = None if isinstance(predictor_or_run_dir, BasePredictor) else Path(predictor_or_run_dir)
    if run_dir is None:
        model = ThreadModel(predictor_or_run_dir, threads)
    elif worker == "thread":
        model = ThreadModel(load_predictor(run_dir, device, precision, batch_size), threads, run_dir)
    else:
        # Device and precision are settled here, so that a precision the hardware cannot run fails the
        # start in one line, and every worker runs the same one.
        resolved = select_device(device)
        precision = resolve_inference_precision(precision, resolved, int8_passed=int8_check_passed(run_dir))
        if workers is None:
            workers, threads = auto_workers(resolved.type, threads)
        model = ProcessModel(run_dir, str(resolved), precision, batch_size, threads, workers)
    service = ModelService(model, max_items, max_chars, max_batch_items)
    facts = model.facts
    run_name = run_dir.resolve().name if run_dir else facts.name
    info = {"mtbert_version": __version__, "run": public_name(run_name), "tasks": facts.tasks, **facts.description}
    info["routes"] = {route: _route_info(route, service.task_spec(task)) for route, task in service.routes.items()}
    info["task_info"] = {t: {**describe_task(service.task_spec(t)), "path": f"/v1/tasks/{t}"} for t in facts.tasks}
    info["limits"] = {"max_items": max_items, "max_batch_items": service.max_batch_items, "max_chars": max_chars,
                      "max_body_bytes": max_body_bytes,
                      "max_tokens": info.pop("max_tokens")}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        print(f"stopping: {service.usage()}", flush=True)  # (how many requests a model call served)
        model.close()

    app = _new_app(docs, lifespan)
    app.state.service, app.state.info = service, info
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, read_timeout=read_timeout)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)  # outermost

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = short_errors(exc.errors())
        return error_response(422, validation_message(errors), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

    return app


# ---------------------------------------------------------------- the server

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
