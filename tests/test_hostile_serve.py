"""Hostile clients of `mtbert serve`: bad text and numbers, fuzzed bodies, a poisoned request among
good ones, slow and numerous connections, foreign Host headers, offline docs, short errors.
Loopback only; every loop is bounded in count and time."""
import asyncio
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtbert.apps.serve import create_app, server_config, trusted_hosts
from mtbert.core.config import load_config
from mtbert.data.readers import Example
from mtbert.inference.predictor import BasePredictor, Predictor
from mtbert.modeling.checkpoint import build_model
from tests.conftest import TINY_YAML, uvicorn_in_thread, wait_until

GOOD = ["A gripping, funny and moving film.", "Dull."]
PAIR = ["How do I learn Python?", "What is the best way to learn Python?"]
LOCAL = "http://localhost"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def predictor():
    """A tiny random model in memory, named by an absolute path that must never be shown."""
    torch.manual_seed(0)
    model, tok = build_model(load_config(TINY_YAML))
    return Predictor(model.eval(), tok, name="/secret/place/run/best")


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, max_items=8), base_url=LOCAL) as c:
        yield c


def sentiment_of(predictor, texts):
    return predictor.predict("sst", [Example(str(i), (t,), None) for i, t in enumerate(texts)])["prob"]


def assert_still_answers(client, predictor):
    r = client.post("/v1/sentiment", json={"texts": GOOD})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([x["probabilities"] for x in r.json()["results"]], sentiment_of(predictor, GOOD),
                               atol=1e-6)


# ---------------------------------------------------------------- bad text and numbers: 422, alone

@pytest.mark.parametrize("body, message", [
    ('{"texts": ["\\ud800 hello"]}', "texts[0] is not valid Unicode"),
    ('{"pairs": [["fine", "\\udfff"]]}', "pairs[0][1] is not valid Unicode"),
    ('{"texts": [NaN]}', "not a finite number"),
    ('{"texts": ["x"], "extra": Infinity}', "not a finite number"),
    ('{"texts": ["x"], "extra": -Infinity}', "not a finite number"),
    ('{"texts": ["x"], "n": 1e999}', "out of range"),
    ('{"texts": ["x"], "n": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"\\ud800": 1}', "body"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_bad_text_and_numbers_are_422(client, predictor, body, message):
    r = client.post("/v1/sentiment" if "pairs" not in body else "/v1/paraphrase", content=body.encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert_still_answers(client, predictor)


@pytest.mark.parametrize("content, ctype", [(b"\xff\xfe\x00garbage", "application/json"),
                                            (b"\xff not utf-8", "text/plain"), (b"texts=a", "")])
def test_undecodable_and_non_json_bodies_are_4xx(client, content, ctype):
    r = client.post("/v1/sentiment", content=content, headers={"content-type": ctype} if ctype else {})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["detail"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"])
def test_a_body_that_is_not_declared_json_is_415_saying_so(client, predictor, ctype):
    """A valid JSON body sent as text/plain used to get a 422 about fields it had."""
    r = client.post("/v1/sentiment", content=b'{"texts": ["fine"]}', headers={"content-type": ctype})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"], r.text
    ok = client.post("/v1/sentiment", content=b'{"texts": ["fine"]}',
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text
    assert_still_answers(client, predictor)


def test_error_details_are_capped_and_never_echo_the_input(client):
    huge = "q" * 1_500_000
    for body in ({"texts": [huge, 7]}, {"texts": ["x"], huge[:100_000]: 1}, {"texts": {"a": huge}}):
        r = client.post("/v1/sentiment", json=body)
        assert r.status_code in (413, 422), r.text[:300]
        assert len(r.content) < 5_000 and "q" * 200 not in r.text


def test_info_shows_no_absolute_path(client):
    info = client.get("/v1/info")
    assert info.status_code == 200
    assert "/secret" not in info.text and info.json()["run"] == "best"


def test_docs_work_offline_or_are_off(predictor):
    with TestClient(create_app(predictor), base_url=LOCAL) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert "cdn." not in page.text and "https://" not in page.text.replace("https://fastapi", "")
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert c.get(f"/static-offline-docs/{asset}").status_code == 200
        assert c.get("/redoc").status_code == 404
    with TestClient(create_app(predictor, docs=False), base_url=LOCAL) as c:
        assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 200


# ---------------------------------------------------------------- DNS rebinding: trusted hosts only

def test_foreign_host_header_is_refused(predictor):
    with TestClient(create_app(predictor), base_url="http://evil.example") as c:
        assert c.get("/health").status_code == 400
        assert c.post("/v1/sentiment", json={"texts": GOOD}).status_code == 400
    for base in ("http://localhost:8000", "http://127.0.0.1:9", "http://[::1]:8000"):
        with TestClient(create_app(predictor), base_url=base) as c:
            assert c.get("/health").status_code == 200, base
    with TestClient(create_app(predictor, allowed_hosts=trusted_hosts("0.0.0.0", ["mt.example,*.lan"])),
                    base_url="http://box.lan") as c:
        assert c.get("/health").status_code == 200
    assert trusted_hosts("10.1.2.3") == ["localhost", "127.0.0.1", "[::1]", "10.1.2.3"]
    assert trusted_hosts("::", ["fe80::1"]) == ["localhost", "127.0.0.1", "[::1]", "[fe80::1]"]
    assert trusted_hosts("0.0.0.0", ["*"]) == ["*"]
    with pytest.raises(ValueError, match="wildcard"):
        trusted_hosts("127.0.0.1", ["a.*.com"])


# ---------------------------------------------------------------- property-based fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(["\ud800", "x\udfff", "", "  ", "\x00", "é" * 30]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12)
texts = st.lists(st.text(max_size=40) | st.sampled_from(["\ud800", "ok \udbff", "fine"]), min_size=0, max_size=10)
bodies = st.one_of(json_values, st.fixed_dictionaries({"texts": texts}),
                   st.fixed_dictionaries({"pairs": st.lists(st.lists(st.text(max_size=20), max_size=3), max_size=4)}),
                   st.fixed_dictionaries({"texts": texts}, optional={"x": json_values}))
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(route=st.sampled_from(["sentiment", "paraphrase", "similarity", "nope"]), body=bodies)
def test_fuzzed_json_bodies_never_get_a_500(client, route, body):
    raw = json.dumps(body)  # (allow_nan: NaN and Infinity go out as the bare words)
    r = client.post(f"/v1/{route}", content=raw.encode("utf-8", "surrogatepass"),
                    headers={"content-type": "application/json"})
    assert r.status_code in (200, 404, 413, 422), (r.status_code, r.text[:300])
    assert r.json()["detail"] if r.status_code != 200 else r.json()["results"] is not None


@FUZZ
@given(data=st.binary(max_size=300), ctype=st.sampled_from(["application/json", "text/plain", ""]))
def test_fuzzed_raw_bodies_never_get_a_500(client, data, ctype):
    r = client.post("/v1/similarity", content=data, headers={"content-type": ctype} if ctype else {})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


def test_server_answers_correctly_after_fuzzing(client, predictor):
    # (runs after the fuzz tests above, on the same app)
    assert_still_answers(client, predictor)
    r = client.post("/v1/similarity", json={"pairs": [PAIR]})
    assert r.status_code == 200 and 0.0 <= r.json()["results"][0]["score"] <= 5.0


# ---------------------------------------------------------------- one poisoned request among good ones

class Picky(BasePredictor):
    """Fails any call that holds the word POISON, like a model that chokes on one input; otherwise
    similarity = number of words. Its first call blocks, so that requests pile up into one batch."""
    name = "picky"

    def __init__(self):
        self.release, self.entered, self.calls = threading.Event(), threading.Event(), []

    @property
    def tasks(self):
        return ["sts"]

    def predict(self, task_name, examples):
        self.calls.append(len(examples))
        self.entered.set()
        assert self.release.wait(30)
        if any("POISON" in t for ex in examples for t in ex.texts):
            raise RuntimeError("cannot handle this input")
        words = np.array([float(len(ex.texts[0].split())) for ex in examples])
        return {"pred": words, "score": words, "prob": words}


def test_a_poisoned_request_fails_alone_in_a_merged_batch():
    model = Picky()
    app = create_app(model, max_batch_items=64)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOCAL) as c:
            def sim(text):
                return c.post("/v1/similarity", content=json.dumps({"pairs": [[text, "x"]]}).encode(), headers=JSON)
            first = asyncio.create_task(sim("one"))
            await wait_until(lambda: model.entered.is_set())  # until the model is busy with the first request
            words = ["a b", "a b c", "POISON here", "a b c d", "a b c d e", "\ud800 lone", "a"]
            rest = [asyncio.create_task(sim(w)) for w in words]
            await wait_until(lambda: len(app.state.service.waiting) >= 6)  # the valid ones wait together (the lone surrogate never joins)
            model.release.set()
            return await asyncio.gather(first, *rest)

    first, *rest = asyncio.run(scenario())
    assert first.status_code == 200
    statuses = [r.status_code for r in rest]
    assert statuses == [200, 200, 500, 200, 200, 422, 200]
    assert [r.json()["results"][0]["score"] for r in rest if r.status_code == 200] == [2.0, 3.0, 4.0, 5.0, 1.0]
    assert "prediction failed" in rest[2].json()["detail"] and "not valid Unicode" in rest[5].json()["detail"]
    assert model.calls[:2] == [1, 6]  # the merged batch of 6 failed ...
    assert sorted(model.calls[2:]) == [1] * 6  # ... and each of its requests was answered on its own


def test_poisoned_unicode_among_concurrent_requests_on_the_real_model(predictor):
    app = create_app(predictor, max_batch_items=64)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOCAL) as c:
            bodies = [{"texts": [t]} for t in GOOD] + [{"texts": ["\ud800 hello"]}] + [{"texts": [t]} for t in GOOD]
            return await asyncio.gather(*(c.post("/v1/sentiment", content=json.dumps(b).encode(), headers=JSON) for b in bodies))

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200, 200, 422, 200, 200]
    expected = sentiment_of(predictor, GOOD * 2)
    got = [r.json()["results"][0]["probabilities"] for r in responses if r.status_code == 200]
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ---------------------------------------------------------------- slow and numerous clients

READ_TIMEOUT = 0.5


@pytest.fixture
def hardened_server(predictor):
    """uvicorn with serve's settings (short read deadline, 3 connections at most) on a free loopback port."""
    app = create_app(predictor, read_timeout=READ_TIMEOUT)
    with uvicorn_in_thread(server_config(app, read_timeout=READ_TIMEOUT, keep_alive_timeout=1.0, max_connections=3,
                                         log_level="warning")) as address:
        yield address


def closed_within(conn: socket.socket, seconds: float, drip: bytes = b"") -> tuple[bool, bytes]:
    """Send `drip` a byte at a time every 0.1 s until the server closes the connection or
    `seconds` pass; -> (closed, what the server sent)."""
    conn.settimeout(0.1)
    received, end, i = b"", time.time() + seconds, 0
    while time.time() < end:
        if i < len(drip):
            try:
                conn.sendall(drip[i:i + 1])
            except OSError:
                return True, received
            i += 1
        try:
            chunk = conn.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def test_slow_clients_are_cut_off_and_connections_capped(hardened_server):
    address = hardened_server
    url = f"http://127.0.0.1:{address[1]}"
    # a head sent a byte every 0.1 s (each byte would restart uvicorn's own keep-alive timer)
    with socket.create_connection(address, timeout=5) as slow_head:
        start = time.time()
        closed, _ = closed_within(slow_head, 3.0, drip=b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40)
        assert closed and time.time() - start < READ_TIMEOUT + 1.5
    # a body that never arrives in full: 408, then the connection closes
    with socket.create_connection(address, timeout=5) as slow_body:
        slow_body.sendall(b"POST /v1/sentiment HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"texts\": [")
        closed, received = closed_within(slow_body, 3.0)
        assert received.startswith(b"HTTP/1.1 408") and closed
    # connection cap: two idle connections and a third request fill the 3 places -> 503
    idle = [socket.create_connection(address, timeout=5) for _ in range(2)]
    try:
        time.sleep(0.1)
        assert httpx.get(url + "/health", headers={"host": "localhost"}, timeout=5).status_code == 503
        for conn in idle:  # the idle ones are cut at the read deadline ...
            assert closed_within(conn, 3.0)[0]
    finally:
        for conn in idle:
            conn.close()
    time.sleep(0.1)
    # ... and the server answers again
    r = httpx.post(url + "/v1/sentiment", json={"texts": GOOD}, timeout=10)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
