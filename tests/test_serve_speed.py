"""The server's fast path: truncation flags from the predictor's own encoding, one shared encoder
pass for the waiting requests of all tasks (predict_datasets, length_batches), and cross-task
batches that still isolate a failing request."""
import asyncio
import threading

import httpx
import numpy as np
import pytest
import torch

from mtbert.apps.serve import create_app
from mtbert.core.config import load_config
from mtbert.data.readers import Example
from mtbert.inference.predictor import (
    EnsemblePredictor,
    Predictor,
    length_batches,
    shares_encoder,
)
from mtbert.modeling.checkpoint import build_model
from tests.conftest import TINY_YAML, wait_until

SHORT = ["A gripping, funny and moving film.", "Dull.", "Why is the sky blue?"]
# 64-token model: about 30 tokens each, so a pair of two is cut, each alone is not; and one far too long
MEDIUM = "a charming and often hilarious story about growing up in a small town by the sea " * 2
LONG = "an endlessly long and winding sentence " * 40


def predictor_with(pair_encoding: dict) -> Predictor:
    torch.manual_seed(0)
    cfg = load_config(TINY_YAML, [f"model.pair_encoding.{t}={m}" for t, m in pair_encoding.items()])
    model, tok = build_model(cfg)
    return Predictor(model.eval(), tok, batch_size=4)


def examples(items):
    return [Example(str(i), tuple(texts), None) for i, texts in enumerate(items)]


PAIRS = [(SHORT[0], SHORT[1]), (MEDIUM, MEDIUM), (LONG, SHORT[2]), (SHORT[2], LONG), (MEDIUM, SHORT[0])]


@pytest.mark.parametrize("mode", ["cross", "bi", "cross+cos"])
def test_truncation_flags_come_from_each_models_encoding(mode):
    predictor = predictor_with({"qqp": mode, "sts": mode})
    singles = examples([(t,) for t in SHORT + [MEDIUM, LONG]])
    out, flags = predictor.predict_flagged("sst", singles)
    assert predictor.encode("sst", singles).truncated == flags == [False, False, False, False, True]
    np.testing.assert_allclose(out["prob"], predictor.predict("sst", singles)["prob"], atol=1e-6)
    pairs = examples(PAIRS)
    flags = predictor.encode("qqp", pairs).truncated
    assert flags == predictor.predict_flagged("qqp", pairs)[1]
    # cross-encoded, two medium texts do not fit together; bi-encoded, each fits alone
    assert flags == {"cross": [False, True, True, True, False], "bi": [False, False, True, True, False],
                     "cross+cos": [False, True, True, True, False]}[mode]


class CountingPredictor(Predictor):
    def __init__(self, base: Predictor):
        super().__init__(base.model, base.tokenizer, batch_size=base.batch_size)
        self.encodes = 0

    def encode(self, task_name, examples):
        self.encodes += 1
        return super().encode(task_name, examples)


def test_an_ensemble_flags_what_any_member_cuts_and_each_member_encodes_once():
    cross, bi = CountingPredictor(predictor_with({"qqp": "cross"})), CountingPredictor(predictor_with({"qqp": "bi"}))
    ensemble = EnsemblePredictor({"cross": cross, "bi": bi}, {"qqp": ["cross", "bi"], "sst": ["bi"]})
    pairs = examples(PAIRS)
    out, flags = ensemble.predict_flagged("qqp", pairs)
    assert (cross.encodes, bi.encodes) == (1, 1)
    # the cross-encoder cuts the two medium texts together; the bi-encoder alone would not
    assert flags == [False, True, True, True, False] != bi.encode("qqp", pairs).truncated
    np.testing.assert_allclose(out["prob"], ensemble.predict("qqp", pairs)["prob"], atol=1e-6)
    singles = examples([(SHORT[0],), (LONG,)])
    assert ensemble.predict_flagged("sst", singles)[1] == [False, True]
    assert cross.encodes == 2  # (the predict above) and sst asked the bi member only


@pytest.mark.parametrize("mode", ["cross", "cross+cos", "bi"])
def test_one_shared_encoder_pass_gives_each_tasks_own_predictions(mode):
    predictor = predictor_with({"qqp": mode, "sts": mode})
    assert shares_encoder(predictor.model)
    requests = [("sst", examples([(t,) for t in SHORT + [LONG]])), ("qqp", examples(PAIRS)),
                ("sts", examples(PAIRS[:2])), ("sst", examples([(SHORT[1],)]))]
    datasets = [predictor.encode(task, exs) for task, exs in requests]
    shared = predictor.predict_encoded_many(datasets)
    for ds, out in zip(datasets, shared):
        alone = predictor.predict_encoded(ds)
        assert out.keys() == alone.keys()
        for key in alone:
            np.testing.assert_allclose(out[key], alone[key], atol=1e-5, err_msg=f"{ds.task.name} {key}")


def test_a_model_whose_heads_read_tokens_runs_task_by_task():
    torch.manual_seed(0)
    model, tok = build_model(load_config(TINY_YAML, ["model.pair_encoding.qqp=bi", "model.bi_head=attention"]))
    assert not shares_encoder(model)
    predictor = Predictor(model.eval(), tok)
    ds = predictor.encode("qqp", examples(PAIRS))
    np.testing.assert_allclose(predictor.predict_encoded_many([ds])[0]["prob"], predictor.predict_encoded(ds)["prob"])


def test_length_batches_keep_short_sentences_apart_from_long_pairs():
    assert length_batches([10] * 26 + [22] * 10, 128, call_cost=48) == [(0, 26), (26, 36)]
    assert length_batches([10, 11, 12, 12], 128, call_cost=48) == [(0, 4)]  # padding 3 tokens < one more call
    assert length_batches([3] * 5, 2) == [(0, 2), (2, 4), (4, 5)]  # never over the batch size
    assert length_batches([], 8) == []
    spans = length_batches(sorted(np.random.default_rng(0).integers(3, 128, 300).tolist()), 32)
    assert spans[0][0] == 0 and spans[-1][1] == 300 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 < e - s <= 32 for s, e in spans)


class PoisonedPredictor(Predictor):
    """A real tiny model whose first call blocks until released, and which fails any call holding
    the text POISON (as a model might on some input), whatever the task."""

    def __init__(self, base: Predictor):
        super().__init__(base.model, base.tokenizer, batch_size=base.batch_size)
        self.release, self.entered, self.calls = threading.Event(), threading.Event(), []

    def predict_encoded_many(self, datasets):
        self.calls.append(sorted(ds.task.name for ds in datasets))
        self.entered.set()
        assert self.release.wait(30)
        if any("POISON" in t for ds in datasets for ex in ds.examples for t in ex.texts):
            raise RuntimeError("cannot handle this input")
        return super().predict_encoded_many(datasets)


def test_requests_of_all_tasks_share_one_call_and_a_failing_one_fails_alone():
    base = predictor_with({"qqp": "cross+cos", "sts": "cross+cos"})
    model = PoisonedPredictor(base)
    app = create_app(model, max_batch_items=64)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            first = asyncio.create_task(c.post("/v1/sentiment", json={"texts": [SHORT[0]]}))
            await wait_until(lambda: model.entered.is_set())  # until the model is busy with the first request
            bodies = [("sentiment", {"texts": [SHORT[1]]}), ("paraphrase", {"pairs": [PAIRS[0]]}),
                      ("similarity", {"pairs": [["POISON here", "x"]]}), ("similarity", {"pairs": [PAIRS[1]]}),
                      ("sentiment", {"texts": [LONG, SHORT[2]]})]
            rest = [asyncio.create_task(c.post(f"/v1/{route}", json=body)) for route, body in bodies]
            await wait_until(lambda: len(app.state.service.waiting) >= len(bodies))
            model.release.set()
            return await asyncio.gather(first, *rest)

    first, *rest = asyncio.run(scenario())
    assert first.status_code == 200
    assert [r.status_code for r in rest] == [200, 200, 500, 200, 200]
    assert "prediction failed: RuntimeError" in rest[2].json()["detail"]
    # the merged call of all three tasks failed; then each request on its own
    assert model.calls[1] == ["qqp", "sst", "sts"] and len(model.calls) == 2 + len(rest)
    # (the count the server prints when it stops: answered calls only, the failed merged one not)
    assert app.state.service.usage() == "answered 5 requests (6 items) in 5 model calls: 1.0 requests a call"
    # the answers are the model's own, each request its own slice, truncation flagged
    sst = base.predict("sst", examples([(SHORT[1],), (LONG,), (SHORT[2],)]))
    np.testing.assert_allclose([rest[0].json()["results"][0]["probabilities"]] +
                               [r["probabilities"] for r in rest[4].json()["results"]], sst["prob"], atol=1e-5)
    assert [r["truncated"] for r in rest[4].json()["results"]] == [True, False]
    sts = base.predict("sts", examples([PAIRS[1]]))
    assert rest[3].json()["results"][0]["score"] == pytest.approx(float(np.clip(sts["score"][0], 0, 5)), abs=1e-5)
    qqp = base.predict("qqp", examples([PAIRS[0]]))
    assert rest[1].json()["results"][0]["probability"] == pytest.approx(float(qqp["prob"][0]), abs=1e-5)


def test_threads_sets_the_model_threads_on_the_worker_only(tmp_path, capsys):
    from mtbert.apps.cli import main
    before = torch.get_num_threads()
    app = create_app(predictor_with({}), threads=1)
    assert app.state.service.model.executor.submit(torch.get_num_threads).result() == 1
    assert app.state.service.facts.threads == 1  # (read on that thread)
    assert torch.get_num_threads() == before  # the event loop's thread keeps its own
    with pytest.raises(ValueError, match="threads must be positive"):
        create_app(predictor_with({}), threads=0)
    assert main(["serve", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads: must be at least 1" in capsys.readouterr().err
