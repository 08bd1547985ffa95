"""HTTP JSON API and a small web page over a trained run: `mtbert serve RUN_DIR`.

Routes: GET / (web page), GET /health, GET /v1/info, POST /v1/sentiment, /v1/paraphrase,
/v1/similarity (OpenAPI schema at /openapi.json, interactive docs at /docs).

Batching and concurrency: the model is loaded once and runs on a single dedicated worker thread,
so requests queue for it instead of racing on it, while the event loop stays free to answer
/health and reject bad requests. Requests are batched across clients: while the model works,
arriving requests wait; when it is free, all waiting requests for the same task (up to
`max_batch_items` items) go through the predictor as one call (forward passes of `batch_size`
items sorted by length), and each gets its own slice of the result back. Nothing waits for a batch
to fill, so a lone request is answered at once. The predictor runs under torch.inference_mode
(evaluate.predict_dataset).

Limits: at most `max_items` texts or pairs per request (413), at most `max_chars` characters per
text (413), request bodies of at most `max_body_bytes` (413); empty texts are refused (422).
Texts longer than the model's max_length tokens are truncated as in training and flagged with
`"truncated": true`. Every error is JSON with a readable "detail" string.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mtbert import __version__
from mtbert.core.tasks import get_task
from mtbert.data.readers import Example
from mtbert.inference.ensemble import ENSEMBLE_FILE, is_ensemble_dir
from mtbert.inference.loading import load_predictor
from mtbert.inference.predictor import BasePredictor, EnsemblePredictor, Predictor

log = logging.getLogger("mtbert.serve")

# route -> the model tasks that can answer it, in order of preference
ROUTE_TASKS = {"sentiment": ("sst", "cfimdb"), "paraphrase": ("qqp",), "similarity": ("sts", "sts_bins")}


# ---------------------------------------------------------------- request and response bodies

class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, examples=[["A gripping, funny and moving film."]])


class PairsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[tuple[str, str]] = Field(min_length=1, examples=[[["How do I learn Python?",
                                                                  "What is the best way to learn Python?"]]])


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

def leaf_predictors(predictor: BasePredictor, task: str | None = None) -> list[Predictor]:
    """The single-model predictors inside `predictor` (those an ensemble uses for `task`)."""
    if isinstance(predictor, EnsemblePredictor):
        names = predictor.task_members[task] if task else list(predictor.members)
        return [leaf for m in names for leaf in leaf_predictors(predictor.members[m], task)]
    return [predictor] if isinstance(predictor, Predictor) else []


def truncation_flags(predictor: BasePredictor, task: str, examples: list[Example]) -> list[bool]:
    """Per example: does any model of `predictor` cut it to fit max_length? Mirrors BertTokenizer:
    [CLS] text [SEP] for one text or a bi-encoded side, [CLS] a [SEP] b [SEP] for a cross-encoded pair
    (<s> text </s> and <s> a </s></s> b </s> for RoBERTa and MPNet: the tokenizer's overheads)."""
    flags = [False] * len(examples)
    for leaf in leaf_predictors(predictor, task):
        if leaf.tokenizer is None:
            continue
        tok, mode = leaf.tokenizer, leaf.model.pair_encoding.get(task, "cross")
        columns = [[len(e.ids) for e in tok.tok.encode_batch(list(col), add_special_tokens=False)]
                   for col in zip(*(ex.texts for ex in examples))]
        for i in range(len(examples)):
            sides = [col[i] for col in columns]
            alone = any(n + tok.single_overhead > tok.max_length for n in sides)
            together = sum(sides) + tok.pair_overhead > tok.max_length
            if len(sides) == 1 or mode == "bi":
                flags[i] |= alone
            else:
                flags[i] |= together or (mode == "cross+cos" and alone)
    return flags


def describe(predictor: BasePredictor, run_dir: Path | None) -> dict:
    """Backbone(s), max tokens and dev metrics for /v1/info, read from the checkpoints and run."""
    checkpoints = [Path(leaf.name) for leaf in leaf_predictors(predictor)]  # a Predictor's name is its checkpoint
    if run_dir and is_ensemble_dir(run_dir):  # an ensemble's members are named; ensemble.json has their paths
        members = json.loads((run_dir / ENSEMBLE_FILE).read_text())["members"]
        checkpoints = [Path(m["checkpoint"]) for m in members if m["name"] in predictor.members]
    backbones = [str((yaml.safe_load(c.read_text()) or {}).get("model", {}).get("backbone"))
                 for c in (ckpt / "config.yaml" for ckpt in checkpoints) if c.exists()]
    max_tokens = [leaf.tokenizer.max_length for leaf in leaf_predictors(predictor) if leaf.tokenizer is not None]
    dev = predictor.meta.get("dev")
    summary = run_dir / "summary.json" if run_dir else None
    if dev is None and summary and summary.exists():
        dev = json.loads(summary.read_text()).get("best_dev")
    return {"backbone": backbones[0] if len(set(backbones)) == 1 else backbones,
            "ensemble": isinstance(predictor, EnsemblePredictor),
            "dev_metrics": dev or {}, "max_tokens": min(max_tokens) if max_tokens else None}


class ModelService:
    """The predictor, the request limits and the single worker thread the predictor runs on."""

    def __init__(self, predictor: BasePredictor, max_items: int, max_chars: int, max_batch_items: int = 256):
        self.predictor, self.max_items, self.max_chars = predictor, max_items, max_chars
        self.max_batch_items = max(max_batch_items, max_items)
        # route -> the task answering it, for the routes this model can answer
        self.routes = {route: next(t for t in tasks if t in predictor.tasks)
                       for route, tasks in ROUTE_TASKS.items() if any(t in predictor.tasks for t in tasks)}
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtbert-predict")
        self.waiting: list[tuple[str, list[Example], asyncio.Future]] = []  # (task, examples, its answer)
        self.drainer: asyncio.Task | None = None  # runs the waiting requests while there are any
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # requests per recent predictor call (tests, diagnostics)

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
                if not text.strip():
                    raise HTTPException(422, f"{where} is empty")
                if len(text) > self.max_chars:
                    raise HTTPException(413, f"{where} has {len(text)} characters; the limit is {self.max_chars}")

    def _predict(self, task: str, examples: list[Example]) -> tuple[dict, list[bool]]:
        return self.predictor.predict(task, examples), truncation_flags(self.predictor, task, examples)

    async def predict(self, route: str, field: str, items: list[tuple[str, ...]]) -> tuple[str, dict, list[bool]]:
        task = self.task_for(route)
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
            raise HTTPException(500, f"prediction failed: {type(e).__name__}: {e}") from e
        return task, out, truncated

    async def _drain(self) -> None:
        """Run the waiting requests, those of one task together, until none is left."""
        loop = asyncio.get_running_loop()
        while self.waiting:
            task, group, items = self.waiting[0][0], [], 0
            for req in [r for r in self.waiting if r[0] == task]:
                if group and items + len(req[1]) > self.max_batch_items:
                    break
                group.append(req)
                items += len(req[1])
            taken = {id(r) for r in group}
            self.waiting = [r for r in self.waiting if id(r) not in taken]
            examples = [ex for _, exs, _ in group for ex in exs]
            self.batch_sizes.append(len(group))
            try:
                out, truncated = await loop.run_in_executor(self.worker, self._predict, task, examples)
            except Exception as e:
                for *_, answer in group:
                    if not answer.done():
                        answer.set_exception(e)
                continue
            start = 0
            for _, exs, answer in group:  # each request its own slice of the arrays
                end = start + len(exs)
                if not answer.done():  # (a client that went away cancels its future)
                    answer.set_result(({k: v[start:end] for k, v in out.items()}, truncated[start:end]))
                start = end


# ---------------------------------------------------------------- the app

class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413 before they are parsed.
    The body is read here (at most max_bytes of it) and replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
                return await response(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


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


def _route_info(route: str, task: str) -> dict:
    spec = get_task(task)
    extra = {"range": list(spec.label_range)} if spec.kind.scores else {"labels": list(spec.label_names or ())}
    return {"path": f"/v1/{route}", "task": task, **extra}


def create_app(predictor_or_run_dir: BasePredictor | str | Path, *, max_items: int = 64, max_chars: int = 20_000,
               max_body_bytes: int = 2 * 1024 * 1024, device: str = "auto", precision: str = "auto",
               batch_size: int = 128, max_batch_items: int = 256) -> FastAPI:
    """The FastAPI app serving a predictor, or the run / checkpoint / ensemble directory it loads from."""
    if min(max_items, max_chars, max_body_bytes) < 1:
        raise ValueError("max_items, max_chars and max_body_bytes must be positive")
    if isinstance(predictor_or_run_dir, BasePredictor):
        predictor, run_dir = predictor_or_run_dir, None
    else:
        run_dir = Path(predictor_or_run_dir)
        predictor = load_predictor(run_dir, device, precision, batch_size)
    service = ModelService(predictor, max_items, max_chars, max_batch_items)
    info = {"mtbert_version": __version__, "run": str(run_dir or predictor.name), "tasks": predictor.tasks,
            **describe(predictor, run_dir)}
    info["routes"] = {route: _route_info(route, task) for route, task in service.routes.items()}
    info["limits"] = {"max_items": max_items, "max_batch_items": service.max_batch_items, "max_chars": max_chars,
                      "max_body_bytes": max_body_bytes,
                      "max_tokens": info.pop("max_tokens")}

    app = FastAPI(title="mtbert", version=__version__,
                  description="Sentiment (SST-5), paraphrase (Quora) and similarity (STS-B) from one multitask BERT.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors())
        return JSONResponse({"detail": _validation_message(errors), "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("mtbert.apps").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def model_info():
        return info

    @app.post("/v1/sentiment", response_model=SentimentResponse)
    async def sentiment(body: TextsRequest):
        task, out, truncated = await service.predict("sentiment", "texts", [(t,) for t in body.texts])
        names = get_task(task).label_names
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
        lo, hi = get_task(task).label_range
        # a regression head can overshoot the gold range; clip to the scale the API promises
        scores = np.clip(np.asarray(out["score"], dtype=np.float64), lo, hi)
        return SimilarityResponse(task=task, results=[SimilarityResult(score=float(s), truncated=cut)
                                                      for s, cut in zip(scores, truncated)])

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **app_options) -> None:
    """Load the model, then serve it with uvicorn until interrupted."""
    import uvicorn
    app = create_app(run_dir, **app_options)
    print(f"serving {run_dir} on http://{host}:{port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
