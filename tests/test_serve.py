"""`mtbert serve`: the JSON API (TestClient), its refusals, the web page in a real browser, the CLI."""
import os
import re
import shutil
import threading

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from mtbert.apps.cli import main
from mtbert.apps.serve import create_app
from mtbert.core.errors import ConfigError
from mtbert.core.tasks import get_task
from mtbert.data.readers import Example
from mtbert.inference.loading import load_predictor
from mtbert.inference.predictor import BasePredictor
from tests.conftest import TINY_YAML, uvicorn_in_thread

TEXTS = ["A gripping, funny and moving film.", "Dull.", "The plot never quite comes together, sadly."]
PAIRS = [["How do I learn Python?", "What is the best way to learn Python?"],
         ["A man is playing a guitar.", "A woman is slicing an onion."]]
LONG = "an endlessly long and winding sentence " * 40  # far past the tiny model's 64 tokens
MAX_ITEMS = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_data_dir):
    run = tmp_path_factory.mktemp("serve") / "run"
    assert main(["train", "--config", str(TINY_YAML), "--out", str(run), "--data-dir", str(synthetic_data_dir),
                 "--set", "train.max_steps=4"]) == 0
    return run


@pytest.fixture(scope="module")
def client(run_dir):
    with TestClient(create_app(run_dir, max_items=MAX_ITEMS, device="cpu"), base_url="http://localhost") as c:
        yield c


@pytest.fixture(scope="module")
def reference(run_dir):
    """The same run loaded directly: the API must give its predictions."""
    return load_predictor(run_dir, device="cpu")


def examples(items):
    return [Example(str(i), tuple(texts), None) for i, texts in enumerate(items)]


def test_routes_return_the_predictors_values(client, reference):
    r = client.post("/v1/sentiment", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    direct = reference.predict("sst", examples([(t,) for t in TEXTS]))
    names = get_task("sst").label_names
    assert body["task"] == "sst" and len(body["results"]) == len(TEXTS)
    for res, label, probs in zip(body["results"], direct["pred"], direct["prob"]):
        assert res["label"] == int(label) and res["label_name"] == names[res["label"]]
        assert len(res["probabilities"]) == 5 and sum(res["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(res["probabilities"], probs, atol=1e-6)
        assert res["probability"] == pytest.approx(max(res["probabilities"]))
        assert res["truncated"] is False

    r = client.post("/v1/paraphrase", json={"pairs": PAIRS})
    assert r.status_code == 200, r.text
    direct = reference.predict("qqp", examples(PAIRS))
    for res, label, prob in zip(r.json()["results"], direct["pred"], direct["prob"]):
        assert 0.0 <= res["probability"] <= 1.0
        assert res["probability"] == pytest.approx(float(prob), abs=1e-6)
        assert res["is_paraphrase"] is bool(label) and res["is_paraphrase"] is (res["probability"] > 0.5)

    r = client.post("/v1/similarity", json={"pairs": PAIRS})
    assert r.status_code == 200, r.text
    direct = reference.predict("sts", examples(PAIRS))
    scores = [res["score"] for res in r.json()["results"]]
    assert all(0.0 <= s <= 5.0 for s in scores)
    np.testing.assert_allclose(scores, np.clip(direct["score"], 0, 5), atol=1e-5)


def test_info_health_page_and_openapi(client, run_dir):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/v1/info").json()
    assert info["tasks"] == ["sst", "qqp", "sts"] and info["backbone"] == "default"
    assert set(info["dev_metrics"]) == {"sst", "qqp", "sts", "overall"}
    assert info["routes"]["sentiment"]["labels"] == list(get_task("sst").label_names)
    assert info["limits"]["max_items"] == MAX_ITEMS and info["limits"]["max_tokens"] == 64
    assert info["mtbert_version"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/v1/info", "/v1/sentiment", "/v1/paraphrase", "/v1/similarity"} <= set(paths)
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in ("sentence-a", "sentence-b", "submit", "sentiment-result", "paraphrase-result",
                    "similarity-result", "error"):
        assert f'id="{element}"' in page.text


@pytest.mark.parametrize("route, body, status, message", [
    ("sentiment", b'{"texts": ["unclosed', 422, "not valid JSON"),
    ("sentiment", b"{}", 422, "texts: Field required"),
    ("sentiment", b'{"texts": "one string"}', 422, "texts: Input should be a valid list"),
    ("sentiment", b'{"texts": ["fine", 7]}', 422, "texts[1]: Input should be a valid string"),
    ("sentiment", b'{"texts": []}', 422, "at least 1 item"),
    ("sentiment", b'{"texts": ["fine", "   "]}', 422, "texts[1] is empty"),
    ("sentiment", b'{"texts": ["\\u200b\\u0301\\ufeff"]}', 422, "texts[0] is empty"),  # zero-width + combining only
    ("paraphrase", b'{"pairs": [["only one"]]}', 422, "pairs[0][1]: Field required"),
    ("similarity", b'{"pairs": [["a", ""]]}', 422, "pairs[0][1] is empty"),
    ("sentiment", b'{"texts": ["x"], "extra": 1}', 422, "extra: Extra inputs are not permitted"),
    ("sentiment", ('{"texts": [%s]}' % ",".join(['"x"'] * (MAX_ITEMS + 1))).encode(), 413, "the limit is 8"),
    ("sentiment", b'{"texts": ["%s"]}' % (b"y" * 20_001), 413, "texts[0] has 20001 characters"),
    ("sentiment", b'{"texts": ["%s"]}' % (b"z" * 3_000_000), 413, "request body over"),
])
def test_bad_requests_get_a_4xx_with_a_message(client, route, body, status, message):
    r = client.post(f"/v1/{route}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert client.get("/health").status_code == 200


def test_long_texts_are_truncated_and_flagged(client):
    r = client.post("/v1/sentiment", json={"texts": [LONG, "short"]})
    assert [res["truncated"] for res in r.json()["results"]] == [True, False]
    for route in ("paraphrase", "similarity"):
        r = client.post(f"/v1/{route}", json={"pairs": [["short", LONG], PAIRS[0]]})
        assert r.status_code == 200 and [res["truncated"] for res in r.json()["results"]] == [True, False]


def test_serves_an_ensemble_directory(run_dir, tmp_path, data_dir):
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)
    ens = tmp_path / "ens"
    assert main(["ensemble", str(run_dir), str(twin), "--out", str(ens), "--limit", "16",
                 "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    with TestClient(create_app(ens, device="cpu"), base_url="http://localhost") as c:
        info = c.get("/v1/info").json()
        assert info["ensemble"] is True and info["backbone"] == "default" and info["tasks"] == ["sst", "qqp", "sts"]
        r = c.post("/v1/similarity", json={"pairs": PAIRS})
    direct = load_predictor(ens, device="cpu").predict("sts", examples(PAIRS))
    np.testing.assert_allclose([res["score"] for res in r.json()["results"]], np.clip(direct["score"], 0, 5),
                               atol=1e-5)


class PairsOnly(BasePredictor):
    """A model without sentiment whose predictions fail: for the 404 and 500 paths."""
    name = "pairs-only"

    @property
    def tasks(self):
        return ["qqp", "sts"]

    def predict(self, task_name, examples):
        raise RuntimeError("boom")


def test_missing_task_is_404_and_a_failing_model_is_500():
    with TestClient(create_app(PairsOnly()), base_url="http://localhost") as c:
        r = c.post("/v1/sentiment", json={"texts": ["fine"]})
        assert r.status_code == 404 and "not trained for sentiment" in r.json()["detail"]
        assert "sentiment" not in c.get("/v1/info").json()["routes"]
        r = c.post("/v1/similarity", json={"pairs": PAIRS})
        assert r.status_code == 500 and "prediction failed: RuntimeError: boom" in r.json()["detail"]
        assert c.get("/health").status_code == 200


class GatedLengths(BasePredictor):
    """Similarity = number of words (so every answer shows which text it came from); its first call
    blocks until released, so the test can pile requests up behind it."""
    name = "gated"

    def __init__(self):
        self.release, self.entered, self.calls = threading.Event(), threading.Event(), []

    @property
    def tasks(self):
        return ["sst", "sts"]

    def predict(self, task_name, examples):
        self.calls.append((task_name, len(examples)))
        self.entered.set()
        assert self.release.wait(30)
        words = np.array([float(len(ex.texts[0].split())) for ex in examples])
        if task_name == "sst":
            probs = np.eye(5)[np.minimum(words.astype(int), 4)]
            return {"pred": probs.argmax(1), "prob": probs}
        return {"pred": words, "score": words, "prob": words}


def test_concurrent_requests_are_batched_per_task_and_answered_in_their_own_order():
    import asyncio

    import httpx

    model = GatedLengths()
    app = create_app(model, max_items=4, max_batch_items=5)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            def sim(*ns):  # pairs whose first text has n words
                return c.post("/v1/similarity", json={"pairs": [[" ".join(["w"] * n), "x"] for n in ns]})
            first = asyncio.create_task(sim(1))
            while not model.entered.is_set():  # the model is now busy with the first request
                await asyncio.sleep(0.01)
            rest = [asyncio.create_task(sim(2, 3)), asyncio.create_task(c.post("/v1/sentiment", json={"texts": ["a b"]})),
                    asyncio.create_task(sim(4)), asyncio.create_task(sim(5, 1, 2))]
            while len(app.state.service.waiting) < 4:
                await asyncio.sleep(0.01)
            model.release.set()
            return [r.json() for r in await asyncio.gather(first, *rest)]

    first, a, sentiment, b, c = asyncio.run(scenario())
    assert [r["score"] for r in first["results"]] == [1.0]
    assert [r["score"] for r in a["results"]] == [2.0, 3.0]
    assert [r["score"] for r in b["results"]] == [4.0]
    assert [r["score"] for r in c["results"]] == [5.0, 1.0, 2.0]
    assert sentiment["results"][0]["label"] == 2
    # the first alone; then the waiting similarity requests together up to 5 items (2 + 1), the
    # sentiment request in its own call, and the similarity request that did not fit
    assert model.calls == [("sts", 1), ("sts", 3), ("sst", 1), ("sts", 3)]
    assert list(app.state.service.batch_sizes) == [1, 2, 1, 1]


def test_serve_refuses_a_directory_without_a_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "no mtbert checkpoint" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-items", "0"]) == 2
    assert "--max-items: must be at least 1" in capsys.readouterr().err


@pytest.fixture
def live_server(run_dir):
    """uvicorn on a free loopback port in a background thread."""
    with uvicorn_in_thread(uvicorn.Config(create_app(run_dir, device="cpu"), log_level="warning")) as (host, port):
        yield f"http://{host}:{port}"


def test_web_page_in_a_real_browser(live_server, client):
    if os.environ.get("MTBERT_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("MTBERT_SKIP_BROWSER_TESTS=1: the user asked to skip the browser test")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium not found: `make test` installs it (scripts/install.sh --test); or set "
                    "MTBERT_SKIP_BROWSER_TESTS=1 to skip this test")
    from playwright.sync_api import sync_playwright
    sentence_a, sentence_b = PAIRS[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page()
            page.goto(live_server + "/")
            page.fill("#sentence-a", sentence_a)
            page.fill("#sentence-b", sentence_b)
            page.click("#submit")
            page.wait_for_selector('#results[data-state="done"]', timeout=30_000)
            label = page.text_content("#sentiment-result .label")
            decision = page.text_content("#paraphrase-result .decision")
            shown_score = page.text_content("#similarity-result .score")
            assert page.is_hidden("#error")
        finally:
            browser.close()
    assert label in get_task("sst").label_names
    sentiment = client.post("/v1/sentiment", json={"texts": [sentence_a]}).json()["results"][0]
    assert label == sentiment["label_name"]
    paraphrase = client.post("/v1/paraphrase", json={"pairs": [[sentence_a, sentence_b]]}).json()["results"][0]
    assert decision == ("paraphrase" if paraphrase["is_paraphrase"] else "not a paraphrase")
    score = client.post("/v1/similarity", json={"pairs": [[sentence_a, sentence_b]]}).json()["results"][0]["score"]
    assert re.fullmatch(r"\d\.\d\d", shown_score) and shown_score == f"{score:.2f}"


class TopicsAsSentiment(BasePredictor):
    """A model whose own task `mood` declares `route: sentiment` (tasks are data: no task name is
    hard-coded in the server)."""
    name = "moods"

    def __init__(self, route="sentiment", kind="classification"):
        from mtbert.core.tasks import task_from_definition
        label = {"column": "y", "kind": kind}
        if kind == "classification":
            label["names"] = ["sad", "happy"]
        self.spec = task_from_definition("mood", {"files": {"dev": "mood.csv"}, "text": "t", "label": label,
                                                  "route": route})

    @property
    def tasks(self):
        return ["mood"]

    def task_spec(self, task_name):
        return self.spec

    def predict(self, task_name, examples):
        n = len(examples)
        return {"pred": np.ones(n, dtype=np.int64), "prob": np.tile([[0.25, 0.75]], (n, 1))}


def test_a_route_alias_is_declared_by_the_task_not_the_server():
    with TestClient(create_app(TopicsAsSentiment()), base_url="http://localhost") as c:
        r = c.post("/v1/sentiment", json={"texts": ["what a day"]})
        assert r.status_code == 200, r.text
        assert r.json()["task"] == "mood" and r.json()["results"][0]["label_name"] == "happy"
        assert c.get("/v1/info").json()["routes"]["sentiment"]["task"] == "mood"
        assert c.post("/v1/paraphrase", json={"pairs": PAIRS}).status_code == 404


@pytest.mark.parametrize("route, kind, expected", [
    ("similarity", "classification", "cannot carry"),  # a score route over a class task
    ("no_such_route", "classification", "unknown route"),
])
def test_a_route_the_task_cannot_answer_is_refused_at_start(route, kind, expected):
    with pytest.raises(ConfigError, match=expected):
        create_app(TopicsAsSentiment(route, kind))
