import asyncio
import contextlib
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

from mtbert.core.config import load_config, resolve_data_dir
from mtbert.core.runtime import KERNEL_CACHE_LIMITS
from mtbert.modeling.encoder import BertConfig, BertModel
from mtbert.training.techniques import StepContext
from tests.synthetic import make_cs224n_data

TINY_YAML = Path(__file__).parent / "tiny.yaml"
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


async def wait_until(condition, tries: int = 500, interval: float = 0.01) -> None:
    """Poll `condition()` on the running event loop until it holds (or `tries` polls pass)."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(interval)


def error_line(capsys) -> str:
    """A command's error as the user sees it: exactly one line on stderr and no traceback (the
    lines of a `predict` progress bar, which end in \r, aside)."""
    err = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err)
           if line.strip() and not line.startswith("predict ")]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def train_tiny_run(out: Path, data_dir: Path, *sets: str, config: Path = TINY_YAML) -> Path:
    """Train a tiny run into `out` through the CLI (`--set` each of `sets`); returns `out`."""
    from mtbert.apps.cli import main
    assert main(["train", "--config", str(config), "--out", str(out), "--data-dir", str(data_dir),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    return out


def step_context(trainer, **fields) -> StepContext:
    """The StepContext a trainer's techniques see, from its public parts, for calling a technique's
    hook by hand; `fields` set the rest (step=...)."""
    return StepContext(trainer.model, trainer.total_steps, next(trainer.model.parameters()).device,
                       trainer.tokenizer, trainer.train_sets, trainer.cfg.train.seed, out_dir=trainer.out, **fields)


@pytest.fixture
def tiny_cfg():
    return lambda *overrides: load_config(TINY_YAML, list(overrides))


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be another machine: machine(cpu_flags=..., aten_isa=..., cuda_capability=(7, 5),
    mps=True, ...) makes core.hardware.detect() (and so every `auto`) answer for it."""
    from mtbert.core import hardware

    def pretend(cuda_capability=None, **fields) -> hardware.Capabilities:
        fields.setdefault("quantized_engines", ("x86", "fbgemm"))
        if "cpu_flags" in fields:
            fields["cpu_flags"] = frozenset(fields["cpu_flags"])
        cuda = (hardware.CudaDevice("mocked GPU", tuple(cuda_capability)),) if cuda_capability else ()
        caps = hardware.Capabilities(cuda=cuda, **fields)
        monkeypatch.setattr(hardware, "detect", lambda: caps)
        for module in ("mtbert.core.runtime",):
            monkeypatch.setattr(f"{module}.detect", lambda: caps)
        return caps
    return pretend


@pytest.fixture
def tiny_encoder():
    torch.manual_seed(0)
    return BertModel(BertConfig(**TINY)).eval()


# The real CS224N data, where this machine has it: only tests marked `real_data` read it. Every
# other test runs on small synthetic files in the same layout (tests/synthetic.py), so the suite
# passes without ../shared/data.
REAL_DATA = resolve_data_dir(None)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    return make_cs224n_data(tmp_path_factory.mktemp("cs224n-synthetic"))


@pytest.fixture(autouse=True)
def _kernel_cache_variables_restored():
    """A Trainer sets the kernel-cache variables in this process (bound_kernel_caches); the next
    test, and the subprocesses it starts, see the environment as it was."""
    saved = {name: os.environ.get(name) for name in KERNEL_CACHE_LIMITS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _data_for_this_test(request, synthetic_data_dir):
    """MTBERT_DATA (inherited by subprocesses) is the real data for `real_data` tests, else the
    synthetic files. Its own MonkeyPatch: a test's `monkeypatch.undo()` must not reset it."""
    real = request.node.get_closest_marker("real_data") is not None
    if real and not (REAL_DATA / "ids-sst-train.csv").exists():
        pytest.skip(f"real_data test: the CS224N data is not at {REAL_DATA} (set MTBERT_DATA)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTBERT_DATA", str(REAL_DATA if real else synthetic_data_dir))
        yield


@pytest.fixture
def data_dir() -> Path:
    """The data directory this test reads (see _data_for_this_test)."""
    return resolve_data_dir(None)


@contextlib.contextmanager
def uvicorn_in_thread(config):
    """A uvicorn server for `config` (a uvicorn.Config) on a free loopback port, in a background
    thread; yields its (host, port) and stops it afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
