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
from fastapi.responses import HTMLResponse
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
from mtbert.core.errors import ConfigError
from mtbert.core.io import read_json, read_yaml
from mtbert.core.rundir import RunDir
from mtbert.inference.api import describe_task
from mtbert.inference.ensemble import ENSEMBLE_FILE, is_ensemble_dir
from mtbert.inference.loading import load_predictor
from mtbert.inference.outputs import prediction_records
from mtbert.inference.predictor import BasePredictor, EnsemblePredictor, Predictor

log = logging.getLogger("mtbert.serve")


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
async def health():
    return {"status": "ok"}


@router.get("/v1/info")
async def model_info(request: Request):
    return request.app.state.info


@router.post("/v1/tasks/{task}", response_model=TaskResponse)
async def any_task(task: str, body: TaskRequest, request: Request):
    service = _service(request)
    predictor = service.predictor
    if task not in predictor.tasks:
        raise HTTPException(404, cap(f"this model has no task {task!r}; it has {predictor.tasks}"))
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


def _alias(adapter: RouteAdapter):
    """POST /v1/{adapter.name}: the adapter's request shape in, its response shape out, over the
    task that declares the route."""
    async def answer(body, request: Request):
        service = _service(request)
        items = [tuple(p) for p in body.pairs] if adapter.field == "pairs" else [(t,) for t in body.texts]
        task, out, truncated = await service.predict(adapter.name, adapter.field, items)
        return adapter.response(task=task, results=adapter.results(service.predictor.task_spec(task), out, truncated))
    answer.__name__ = adapter.name
    answer.__annotations__ = {"body": adapter.request, "request": Request}  # (FastAPI reads the body's model here)
    router.add_api_route(f"/v1/{adapter.name}", answer, methods=["POST"], response_model=adapter.response)


for _adapter in ROUTE_ADAPTERS.values():
    _alias(_adapter)


# ---------------------------------------------------------------- the app

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
