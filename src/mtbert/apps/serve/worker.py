"""Where the model runs: in a worker process of its own (`ProcessModel`, what `mtbert serve` uses), or
on a thread of the server's process (`ThreadModel`, for a predictor object handed to create_app).

Why a process: the model's Python work (tokenising, the small passes of a batched call) and the
event loop's (HTTP parsing, validation, JSON) each need the GIL. On one process they take turns
more than they overlap. The worker process alone loads the model; the server sends it each batched
call over a pipe and gets the outputs back, one call at a time (the batcher never has two in
flight).

If the worker dies (killed, out of memory, a crash in native code), the requests of the call in
flight are answered 503 and never run again, so none is lost or answered twice. A new worker is
started at once; until it has loaded the model, new requests get 503 and /health says
"restarting".
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from mtbert.core.errors import MtbertError
from mtbert.core.io import read_json, read_yaml
from mtbert.core.rundir import RunDir
from mtbert.core.runtime import set_threads
from mtbert.core.tasks import TaskSpec
from mtbert.core.trust import run_code_is_trusted, run_code_trusted
from mtbert.data.readers import Example
from mtbert.inference.ensemble import ENSEMBLE_FILE, is_ensemble_dir
from mtbert.inference.loading import load_predictor
from mtbert.inference.predictor import BasePredictor, EnsemblePredictor, Predictor

log = logging.getLogger("mtbert.serve")

Batches = list[tuple[str, list[Example]]]  # (task, examples) per task of one call
Results = list[tuple[dict, list[bool]]]    # (outputs, truncation flags) per task of one call


class WorkerDied(MtbertError):
    """The model worker process ended while (or before) answering a call."""


class WorkerRestarting(MtbertError):
    """No model worker is ready: one is loading the model after the last one died."""


# ---------------------------------------------------------------- what the server knows of the model

@dataclass
class ModelFacts:
    """What the HTTP side needs of a model it does not hold: its tasks with their definitions, the
    /v1/info description, and the torch threads of the thread that runs it."""
    tasks: list[str]
    specs: dict[str, TaskSpec]
    description: dict
    shared_pass: bool  # one model with its tokenizer: the waiting requests of all tasks in one call
    threads: int = 0
    name: str = ""

    @classmethod
    def of(cls, predictor: BasePredictor, run_dir: Path | None) -> ModelFacts:
        return cls(tasks=list(predictor.tasks), specs={t: predictor.task_spec(t) for t in predictor.tasks},
                   description=describe(predictor, run_dir), shared_pass=shares_one_pass(predictor),
                   threads=torch.get_num_threads(), name=predictor.name)


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
    backbones = [public_name((read_yaml(c) or {}).get("model", {}).get("backbone"))
                 for c in (ckpt / "config.yaml" for ckpt in checkpoints) if c.exists()]
    max_tokens = [leaf.tokenizer.max_length for leaf in leaf_predictors(predictor) if leaf.tokenizer is not None]
    dev = predictor.meta.get("dev")
    if dev is None and run_dir:
        dev = (RunDir(run_dir).read_summary() or {}).get("best_dev")
    return {"backbone": backbones[0] if len(set(backbones)) == 1 else backbones,
            "ensemble": isinstance(predictor, EnsemblePredictor),
            "dev_metrics": dev or {}, "max_tokens": min(max_tokens) if max_tokens else None}


def public_name(value) -> str:
    """A name for responses: a path (a checkpoint used as backbone, a run directory) by its last
    part only, so the server's file system layout is never shown."""
    text = str(value)
    return Path(text).name or text if ("/" in text or "\\" in text) else text


# ---------------------------------------------------------------- one call

def shares_one_pass(predictor: BasePredictor) -> bool:
    return isinstance(predictor, Predictor) and predictor.tokenizer is not None


def predict_batches(predictor: BasePredictor, batches: Batches) -> Results:
    """(outputs, truncation flags) per (task, examples). A single model encodes each task's examples
    once (the flags come from that encoding) and runs all tasks in one shared encoder pass where it
    can; an ensemble predicts task by task."""
    if shares_one_pass(predictor):
        datasets = [predictor.encode(task, examples) for task, examples in batches]
        outs = predictor.predict_encoded_many(datasets)
        return [(out, ds.truncated) for out, ds in zip(outs, datasets)]
    return [predictor.predict_flagged(task, examples) for task, examples in batches]


# ---------------------------------------------------------------- on a thread

class ThreadModel:
    """A predictor object held by the server's process, run on one dedicated thread."""

    status, capacity = "ok", 1

    def __init__(self, predictor: BasePredictor, threads: int | None = None, run_dir: Path | None = None):
        self.predictor = predictor
        # (torch's intra-op thread count is per thread: set it on the thread that runs the model)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtbert-predict",
                                           initializer=set_threads, initargs=(threads,))
        self.facts = self.executor.submit(ModelFacts.of, predictor, run_dir).result()  # (its threads are that thread's)

    async def call(self, batches: Batches) -> Results:
        return await asyncio.get_running_loop().run_in_executor(self.executor, predict_batches, self.predictor,
                                                                batches)

    def close(self) -> None:
        self.executor.shutdown(wait=False)


# ---------------------------------------------------------------- in a process

def worker_main() -> None:
    """The worker process (`python -c ...worker_main()` argv: socket fd, load options as JSON,
    threads): load the model, say what it is, then answer calls until the socket closes."""
    fd, load, threads = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    conn = Connection(socket.socket(fileno=fd).detach())
    set_threads(threads)
    try:
        with run_code_trusted(load["trust_run_code"]):
            predictor = load_predictor(load["run_dir"], load["device"], load["precision"], load["batch_size"])
        facts = ModelFacts.of(predictor, Path(load["run_dir"]))
    except BaseException as e:  # the server's start reports it in one line
        conn.send(("failed", _portable(e)))
        return
    conn.send(("ready", facts))
    with torch.inference_mode():
        while True:
            try:
                batches = conn.recv()
            except (EOFError, OSError):  # the server has gone: so does its worker
                return
            try:
                reply = ("ok", predict_batches(predictor, batches))
            except Exception as e:
                reply = ("error", _portable(e))
            conn.send(reply)


def _portable(e: BaseException) -> BaseException:
    """`e` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class WorkerProcess:
    """One model worker process: it alone loads the model and runs it; the server sends it one
    batched call at a time over a socket. Dead, it is replaced on a thread of its own."""

    def __init__(self, load: dict, threads: int | None, start_timeout_s: float):
        self.load, self.threads, self.start_timeout_s = load, threads, start_timeout_s
        self.lock = threading.Lock()  # guards process, conn and status against the restarting thread
        self.caller = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtbert-worker-pipe")
        self.restarts = 0
        self.status = "starting"  # starting | ok | restarting | failed | stopped
        self.process, self.conn = None, None

    def launch(self) -> None:
        """Start the interpreter: a fresh one (not multiprocessing's spawn, which re-runs the
        caller's main script), talking over a socket pair."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            process = subprocess.Popen(
                [sys.executable, "-c", "from mtbert.apps.serve.worker import worker_main; worker_main()",
                 str(theirs.fileno()), json.dumps(self.load), json.dumps(self.threads)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
            conn = Connection(ours.detach())
        # (theirs is closed here, so that the worker's death reads as EOF on ours)
        with self.lock:
            self.process, self.conn = process, conn

    def ready(self) -> ModelFacts:
        """Wait for the launched worker to load the model -> what it loaded."""
        process, conn = self.process, self.conn
        try:
            if not conn.poll(self.start_timeout_s):
                raise WorkerDied(f"the model worker did not load {self.load['run_dir']} within "
                                 f"{self.start_timeout_s:.0f}s")
            kind, payload = conn.recv()
        except (EOFError, OSError):
            conn.close()
            raise WorkerDied(f"the model worker exited with code {process.wait()} while loading "
                             f"{self.load['run_dir']}") from None
        except BaseException:
            self.close()
            raise
        if kind == "failed":
            conn.close()
            process.wait()
            raise payload
        with self.lock:
            self.status = "ok"
        log.info("model worker %d ready", process.pid)
        return payload

    def _call(self, batches: Batches):
        with self.lock:
            conn, status = self.conn, self.status
        if status != "ok" or conn is None:
            raise WorkerRestarting("the model worker is restarting")
        try:
            conn.send(batches)
            kind, payload = conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerDied(f"the model worker ended during the call ({type(e).__name__})") from None
        if kind == "error":
            raise payload
        return payload

    async def call(self, batches: Batches) -> Results:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.caller, self._call, batches)
        except WorkerDied:
            self.restart()
            raise

    def restart(self) -> None:
        """Replace the dead worker on a thread of its own; its calls get WorkerRestarting meanwhile."""
        with self.lock:
            if self.status in ("restarting", "stopped"):
                return
            self.status, dead, conn = "restarting", self.process, self.conn
            self.conn = None
        if conn is not None:
            conn.close()

        def start_again():
            code = dead.wait() if dead is not None else None
            log.error("the model worker %s died (exit code %s): restarting it", dead.pid if dead else "?", code)
            try:
                self.launch()
                self.ready()
            except BaseException as e:  # (it stays out of service; /health says so)
                log.error("the model worker could not be restarted: %s: %s", type(e).__name__, e)
                with self.lock:
                    self.status = "failed"
                return
            with self.lock:
                self.restarts += 1

        threading.Thread(target=start_again, name="mtbert-worker-restart", daemon=True).start()

    def close(self) -> None:
        with self.lock:
            conn, process, self.conn = self.conn, self.process, None
            self.status = "stopped"
        if conn is not None:
            conn.close()  # (the worker reads EOF and returns)
        if process is not None:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.caller.shutdown(wait=False)


MAX_AUTO_WORKERS = 4  # (each worker holds the whole model: bounded memory on a large CPU)


def auto_workers(device: str, threads: int | None, cores: int | None = None) -> tuple[int, int | None]:
    """(worker processes, torch threads each) when the user names neither count: on a CPU, one
    single-threaded worker per core, at most MAX_AUTO_WORKERS, the cores shared out among them
    (small batches use one thread far better than two: RESULTS.md, the server); on a GPU, one."""
    cores = cores or os.cpu_count() or 1
    if device != "cpu":  # (one model per accelerator)
        return 1, threads
    if threads:
        return max(1, min(MAX_AUTO_WORKERS, cores // threads)), threads
    workers = min(MAX_AUTO_WORKERS, cores)
    return workers, max(1, cores // workers)


class ProcessModel:
    """The model in `workers` worker processes, each with the whole model and `threads` torch
    threads. Up to one call per ready worker runs at once. Several single-threaded workers suit
    a server's small batches better than one worker with every core (RESULTS.md, the server)."""

    def __init__(self, run_dir: str | Path, device: str = "auto", precision: str = "auto", batch_size: int = 128,
                 threads: int | None = None, workers: int = 1, start_timeout_s: float = 600.0):
        # (the user's --trust-run-code travels with the load: a worker is a fresh interpreter)
        load = {"run_dir": str(run_dir), "device": device, "precision": precision, "batch_size": batch_size,
                "trust_run_code": run_code_is_trusted()}
        self.workers = [WorkerProcess(load, threads, start_timeout_s) for _ in range(workers)]
        self.idle: list[WorkerProcess] = []
        try:
            for worker in self.workers:  # (they load the model side by side)
                worker.launch()
            facts = [worker.ready() for worker in self.workers]  # (one that cannot load fails the start)
        except BaseException:
            self.close()
            raise
        self.facts = facts[0]
        self.idle = list(self.workers)
        weakref.finalize(self, ProcessModel._close_all, self.workers)  # (an app dropped without its shutdown)

    @property
    def restarts(self) -> int:
        return sum(worker.restarts for worker in self.workers)

    @property
    def capacity(self) -> int:
        """Calls that can run at once now: one per ready worker."""
        return sum(worker.status == "ok" for worker in self.workers)

    @property
    def status(self) -> str:
        """ok while every worker is ready; else the first other state (restarting, failed...)."""
        return next((w.status for w in self.workers if w.status != "ok"), "ok")

    async def call(self, batches: Batches) -> Results:
        ready = [worker for worker in self.idle if worker.status == "ok"]
        if not ready:
            raise WorkerRestarting("no model worker is ready")
        worker = ready[0]
        self.idle.remove(worker)
        try:
            return await worker.call(batches)
        finally:
            self.idle.append(worker)

    def close(self) -> None:
        self._close_all(self.workers)

    @staticmethod
    def _close_all(workers: list[WorkerProcess]) -> None:
        for worker in workers:
            worker.close()
