"""HTTP JSON API and a small web page over a trained run: `mtbert serve RUN_DIR`.

Routes: GET / (web page), GET /health, GET /v1/info, POST /v1/tasks/{task} (any task of the run),
and the route aliases that task definitions declare (`route:` in builtin_tasks.yaml: POST
/v1/sentiment, /v1/paraphrase, /v1/similarity, each a thin adapter over its task that keeps its
own response shape). OpenAPI schema at /openapi.json, interactive docs at /docs.

The parts, one module each: `schemas` (request and response bodies, the route adapters),
`worker` (where the model runs: a worker process of its own, or a thread), `batching` (the model
service: requests batched across clients and tasks, one call at a time to the model),
`hardening` (limits, strict JSON, hostile clients, the uvicorn settings) and `app` (the routes on
an APIRouter that reads the service from the app's state, and `serve`).

Workers: the model is loaded by worker processes that alone hold it (`workers`, by default one
single-threaded worker per CPU core, at most 4, or one on a GPU; `threads` torch threads each), so
the event loop, on its own GIL, stays free to parse, validate and answer while the model works.
`--worker thread`, and a predictor object given to create_app, run one model on a dedicated thread
instead. If a worker process dies, the requests of its call are answered 503 (never run twice), a
new worker loads the model, and /health answers 503 {"status": "restarting"} while none can answer.

Batching: each worker runs one call at a time, so requests queue instead of racing on the model.
While the workers are busy, arriving requests wait; when one is free, all waiting requests (up to
`max_batch_items` items, whatever their task) go to it in one call. A single model (Predictor)
tokenises each task's examples once (the `truncated` flags come from that encoding) and runs every
sequence of every task through the shared encoder together (Predictor.predict_encoded_many:
length-sorted passes of at most `batch_size` sequences, split where padding costs more than
another pass), then each task's head; an ensemble predicts task by task, each member encoding once
(EnsemblePredictor.predict_flagged). Each request gets its own slice of the result. Nothing waits
for a batch to fill, so a lone request is answered at once. The predictor runs under
torch.inference_mode.

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

from mtbert.apps.serve.app import create_app, serve
from mtbert.apps.serve.batching import ModelService
from mtbert.apps.serve.hardening import server_config, trusted_hosts
from mtbert.apps.serve.schemas import ROUTE_ADAPTERS, is_blank
from mtbert.apps.serve.worker import ProcessModel, ThreadModel, describe

__all__ = ["ROUTE_ADAPTERS", "ModelService", "ProcessModel", "ThreadModel", "create_app", "describe", "is_blank",
           "serve", "server_config", "trusted_hosts"]
