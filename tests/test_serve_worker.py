"""The server's model workers (apps/serve/worker.py): a process of their own that alone loads the
model, calls side by side up to one per ready worker, and a dead worker's requests answered 503
once while a new one loads."""
import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mtbert.apps.serve import ModelService, create_app
from mtbert.apps.serve.worker import ModelFacts, auto_workers
from mtbert.core.errors import CheckpointError
from mtbert.data.readers import Example
from mtbert.inference.loading import load_predictor
from tests.conftest import train_tiny_run

TEXTS = ["A gripping, funny and moving film.", "Dull."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_data_dir):
    return train_tiny_run(tmp_path_factory.mktemp("worker") / "run", synthetic_data_dir, "train.max_steps=2")


def wait_for(condition, timeout_s=120.0):
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_the_model_runs_in_a_worker_process_of_its_own(run_dir):
    app = create_app(run_dir, device="cpu", workers=1, threads=1)
    model = app.state.service.model
    with TestClient(app, base_url="http://localhost") as client:
        (worker,) = model.workers
        assert worker.process.pid != os.getpid() and worker.process.poll() is None
        assert model.facts.threads == 1  # --threads reaches the worker's torch
        got = client.post("/v1/tasks/sst", json={"texts": TEXTS}).json()["results"]
        want = load_predictor(run_dir, device="cpu").predict("sst", [Example(str(i), (t,), None)
                                                                    for i, t in enumerate(TEXTS)])
        np.testing.assert_allclose([list(r["probabilities"].values()) for r in got], want["prob"], atol=1e-5)
    assert worker.process.poll() is not None  # the app's shutdown ended its worker


def test_a_dead_worker_answers_its_call_503_once_and_a_new_one_takes_over(run_dir):
    app = create_app(run_dir, device="cpu", workers=1)
    model = app.state.service.model
    (worker,) = model.workers
    with TestClient(app, base_url="http://localhost") as client:
        assert client.post("/v1/tasks/sst", json={"texts": TEXTS}).status_code == 200
        dead = worker.process
        os.kill(dead.pid, signal.SIGSTOP)  # the call below is in flight when the worker dies
        answers = []
        request = threading.Thread(target=lambda: answers.append(client.post("/v1/tasks/sst", json={"texts": TEXTS})))
        request.start()
        wait_for(lambda: not model.idle)  # the call has taken the worker
        time.sleep(0.3)  # (and sent it the request)
        os.kill(dead.pid, signal.SIGKILL)
        request.join(60)
        (answer,) = answers  # answered, and only once
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert "the model worker ended during the call" in answer.json()["detail"]
        health = client.get("/health")  # (503 while no worker can answer; the new one is loading)
        if model.restarts == 0:
            assert health.status_code == 503 and health.json() == {"status": "restarting"}
            assert client.post("/v1/tasks/sst", json={"texts": TEXTS}).status_code == 503
        wait_for(lambda: client.get("/health").status_code == 200)
        assert model.restarts == 1 and worker.process.pid != dead.pid
        assert client.get("/health").json() == {"status": "ok"}
        assert client.post("/v1/tasks/sst", json={"texts": TEXTS}).status_code == 200


class SideBySide:
    """A model with room for two calls at once, recording how many run together."""
    capacity, status = 2, "ok"

    def __init__(self):
        spec = load_spec()
        self.facts = ModelFacts(tasks=["sst"], specs={"sst": spec}, description={}, shared_pass=True)
        self.running = self.most = 0
        self.release = asyncio.Event()

    async def call(self, batches):
        self.running += 1
        self.most = max(self.most, self.running)
        await self.release.wait()
        self.running -= 1
        (task, examples), = batches
        return [({"pred": np.array([int(ex.texts[0]) for ex in examples])}, [False] * len(examples))]


def load_spec():
    from mtbert.core.tasks import get_task
    return get_task("sst")


def test_calls_run_side_by_side_one_per_ready_worker():
    model = SideBySide()
    service = ModelService(model, max_items=2, max_chars=100, max_batch_items=2)  # (a call per request)

    async def scenario():
        asks = [asyncio.create_task(service.predict_task("sst", "texts", [(str(i),), (str(10 + i),)]))
                for i in range(5)]
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert model.most == 2 and len(service.waiting) == 3  # two calls out, the rest wait for a free worker
        model.release.set()
        return await asyncio.gather(*asks)

    answers = asyncio.run(scenario())
    assert model.most == 2
    for i, (task, out, truncated) in enumerate(answers):  # each request its own slice
        assert task == "sst" and out["pred"].tolist() == [i, 10 + i] and truncated == [False, False]


@pytest.mark.parametrize("device, threads, cores, expected", [
    ("cpu", None, 2, (2, 1)),    # one single-threaded worker per core
    ("cpu", None, 16, (4, 4)),   # at most 4 workers, the cores shared out
    ("cpu", 2, 16, (4, 2)),
    ("cpu", 4, 2, (1, 4)),       # --threads over the cores: one worker
    ("cuda", None, 16, (1, None)),  # one model per accelerator
    ("mps", None, 8, (1, None)),
])
def test_auto_workers(device, threads, cores, expected):
    assert auto_workers(device, threads, cores) == expected


def test_a_run_the_worker_cannot_load_fails_the_start_in_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        create_app(tmp_path, device="cpu", workers=1)


def test_several_workers_need_worker_processes(run_dir):
    from mtbert.core.errors import ConfigError
    with pytest.raises(ConfigError, match="2 workers need worker processes"):
        create_app(run_dir, device="cpu", worker="thread", workers=2)


def test_the_users_trust_reaches_the_worker_and_only_then_is_a_plugin_imported(run_dir, tmp_path, monkeypatch):
    import shutil

    import yaml

    from mtbert.core.trust import UntrustedCodeError, run_code_trusted
    name, marker = f"plugin_{abs(hash(tmp_path)) % 10**8}", tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = shutil.copytree(run_dir, tmp_path / "run")
    config = run / "best" / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "plugins": [name]}))
    with pytest.raises(UntrustedCodeError, match="plugin module"):
        create_app(run, device="cpu", workers=1)
    assert not marker.exists()
    with run_code_trusted():  # `mtbert serve --trust-run-code`
        app = create_app(run, device="cpu", workers=1)
    assert marker.exists()  # imported by the worker, which alone loads the model
    app.state.service.model.close()
