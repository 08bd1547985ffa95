"""Load test of `mtbert serve`: throughput, latency percentiles and errors under concurrent requests,
against the engine behind the server, and the latency of a lone single sentence.

Starts `mtbert serve RUN_DIR --precision P` on a free loopback port (or uses --url), waits for
/health, then sends --requests POSTs from --concurrency concurrent clients, cycling over the routes
the model answers (sentiment, paraphrase, similarity; or --routes), each request carrying --items
texts or pairs. Then --single requests of one SST-style sentence each to /v1/sentiment, one at a
time (concurrency 1): their p50 is the lone-sentence latency. With RUN_DIR it then stops the server
and runs the engine: the same run loaded in this process (load_predictor, same --precision, device,
--batch-size, every core unless --engine-threads), predicting exactly the texts and pairs that were sent, task by task as
`mtbert predict` does (median of --engine-repeats timed runs after one warm-up).

    python bench/load_test.py RUN_DIR --precision fp32 --concurrency 16 --items 1 --requests 400
    python bench/load_test.py RUN_DIR --precision fp32 --concurrency 1 --routes sentiment --items 1
    python bench/load_test.py --url http://127.0.0.1:8000 [...]     # a server already running (no engine)

The last line reads `rps=.. items_per_s=.. p50_ms=.. p95_ms=.. p99_ms=.. errors=..`, followed, where
measured, by `single_p50_ms=.. p50_over_15ms=..` (the lone sentence's p50 over the 15 ms target:
<= 1 meets it) and `engine_items_per_s=.. server_over_engine=..` (the server's items/s over the
engine's on the same items: >= 0.8 is the target). --single 0 and --no-engine skip those parts.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

SENTENCES = [
    "A gripping, funny and moving film.",
    "Dull.",
    "The plot never quite comes together, and the actors seem to know it.",
    "How do I learn Python quickly?",
    "What is the best way to learn Python?",
    "A man is playing a guitar on a crowded street corner while people walk past.",
    "A woman is slicing an onion.",
    "It's a charming, often hilarious story about growing up, even if the last act drags on far too long.",
    "Why is the sky blue?",
    "What makes the sky look blue during the day?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before answering /health")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"no answer from {url}/health within {timeout_s:.0f}s")


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of this process, or of process `pid` and its child
    processes (the server's model workers; Linux /proc)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:  # fields 4, 14, 15: ppid, utime, stime (clock ticks)
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # (a process that ended meanwhile)
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def make_body(route: str, items: int, rng: random.Random) -> dict:
    if route == "sentiment":
        return {"texts": [rng.choice(SENTENCES) for _ in range(items)]}
    return {"pairs": [rng.sample(SENTENCES, 2) for _ in range(items)]}


SINGLE_SENTENCES = [SENTENCES[i] for i in (0, 1, 2, 7)]  # the film reviews (SST-like)
SINGLE_TARGET_MS = 15.0


def make_jobs(routes: list[str], requests: int, items: int, seed: int) -> list[tuple[str, dict]]:
    """(route, request body) per request, round-robin over `routes`."""
    rng = random.Random(seed)
    return [(routes[i % len(routes)], make_body(routes[i % len(routes)], items, rng)) for i in range(requests)]


async def run_load(url: str, routes: list[str], jobs: list[tuple[str, dict]], concurrency: int, items: int,
                   seed: int):
    """-> (latencies in seconds, errors, wall seconds)."""
    rng = random.Random(seed + 1)
    latencies, errors = [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def client_loop(client: httpx.AsyncClient):
        nonlocal errors
        while not queue.empty():
            route, body = queue.get_nowait()
            start = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/{route}", json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        for route in routes:  # warm-up, not counted
            await client.post(f"{url}/v1/{route}", json=make_body(route, items, rng))
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return np.array(latencies), errors, wall


def run_single(url: str, requests: int) -> tuple[np.ndarray, int]:
    """One sentence per request to /v1/sentiment, one request at a time -> (latencies in seconds, errors)."""
    latencies, errors = [], 0
    with httpx.Client(timeout=60) as client:
        for i in range(requests + 5):  # the first 5: warm-up
            body = {"texts": [SINGLE_SENTENCES[i % len(SINGLE_SENTENCES)]]}
            start = time.perf_counter()
            try:
                ok = client.post(f"{url}/v1/sentiment", json=body).status_code == 200
            except httpx.HTTPError:
                ok = False
            if i >= 5:
                latencies.append(time.perf_counter() - start)
                errors += not ok
    return np.array(latencies), errors


def run_engine(run_dir: str, route_tasks: dict[str, str], jobs: list[tuple[str, dict]], device: str,
               precision: str, batch_size: int, repeats: int, threads: int | None = None) -> float:
    """Seconds the engine (the run loaded offline in this process, as `mtbert predict` does) takes
    to predict exactly the items of `jobs`, each task's items in one predict call (median of
    `repeats` runs after a warm-up)."""
    from mtbert.core.runtime import set_threads
    from mtbert.data.readers import Example
    from mtbert.inference.loading import load_predictor

    set_threads(threads)
    predictor = load_predictor(run_dir, device, precision, batch_size)
    per_task: dict[str, list] = {}
    for route, body in jobs:
        items = [(t,) for t in body["texts"]] if "texts" in body else [tuple(p) for p in body["pairs"]]
        examples = per_task.setdefault(route_tasks[route], [])
        examples += [Example(str(len(examples) + i), texts, None) for i, texts in enumerate(items)]

    def once() -> float:
        start = time.perf_counter()
        for task, examples in per_task.items():
            predictor.predict(task, examples)
        return time.perf_counter() - start

    once()
    return float(np.median([once() for _ in range(repeats)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", help="run / ensemble directory to serve (not needed with --url)")
    ap.add_argument("--url", help="test a server already running at this base URL instead of starting one")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--items", type=int, default=4, help="texts or pairs per request")
    ap.add_argument("--routes", help="comma-separated routes to load (default: all the server answers)")
    ap.add_argument("--single", type=int, default=100,
                    help="lone one-sentence /v1/sentiment requests for the single-sentence p50 (0: none)")
    ap.add_argument("--no-engine", dest="engine", action="store_false",
                    help="do not run the engine offline on the same items (it needs RUN_DIR)")
    ap.add_argument("--engine-repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 | ...: the server's and the engine's")
    ap.add_argument("--batch-size", type=int, default=128, help="the server's and the engine's batch size")
    ap.add_argument("--threads", type=int, help="torch intra-op threads of each of the server's model workers "
                                                 "(`mtbert serve --threads`; default: the server's)")
    ap.add_argument("--engine-threads", type=int, help="torch intra-op threads of the engine (default: torch's, "
                                                        "one per core: the machine's best offline)")
    ap.add_argument("--worker", choices=("process", "thread"), default="process",
                    help="where the server's model runs (`mtbert serve --worker`)")
    ap.add_argument("--workers", type=int, help="the server's model worker processes (`mtbert serve --workers`; "
                                                 "default: the server's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    args = ap.parse_args()
    if not args.url and not args.run_dir:
        ap.error("give RUN_DIR or --url")

    server, log, usage = None, tempfile.TemporaryFile(), []
    url = args.url.rstrip("/") if args.url else None
    try:
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            server = subprocess.Popen([sys.executable, "-m", "mtbert.cli", "serve", args.run_dir, "--port", str(port),
                                       "--device", args.device, "--precision", args.precision,
                                       "--batch-size", str(args.batch_size), "--worker", args.worker]
                                      + (["--workers", str(args.workers)] if args.workers else [])
                                      + (["--threads", str(args.threads)] if args.threads else []),
                                      stdout=log, stderr=subprocess.STDOUT)
        wait_for_health(url, server, args.startup_timeout)
        info = httpx.get(f"{url}/v1/info", timeout=10).json()
        routes = list(info["routes"])
        if args.routes:
            wanted = [r.strip() for r in args.routes.split(",") if r.strip()]
            missing = [r for r in wanted if r not in routes]
            if missing or not wanted:
                raise SystemExit(f"--routes {args.routes}: this server answers {', '.join(routes)}")
            routes = wanted
        if args.items > info["limits"]["max_items"]:
            raise SystemExit(f"--items {args.items} is over the server's max_items {info['limits']['max_items']}")
        jobs = make_jobs(routes, args.requests, args.items, args.seed)
        # where the machine's CPU goes during the load: this client (load generator) and the server
        cpu_before = cpu_seconds(), (cpu_seconds(server.pid) if server is not None else None)
        latencies, errors, wall = asyncio.run(run_load(url, routes, jobs, args.concurrency, args.items, args.seed))
        client_cpu = cpu_seconds() - cpu_before[0]
        server_cpu = cpu_seconds(server.pid) - cpu_before[1] if server is not None else None
        single, single_errors = (run_single(url, args.single) if args.single and "sentiment" in info["routes"]
                                 else (None, 0))
    except Exception:
        if server is not None:
            log.seek(0)
            print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
            log.seek(0)
            usage = [line for line in log.read().decode(errors="replace").splitlines() if "model calls" in line]
    engine_s = None
    if args.engine and args.run_dir and not args.url:  # (after the server stopped: nothing else runs)
        route_tasks = {route: info["routes"][route]["task"] for route in routes}
        engine_s = run_engine(args.run_dir, route_tasks, jobs, args.device, args.precision, args.batch_size,
                              args.engine_repeats, args.engine_threads)

    p50, p95, p99 = np.percentile(latencies * 1000, [50, 95, 99])
    rps, items_per_s = len(latencies) / wall, len(latencies) * args.items / wall
    print(f"server {url}  model {info['run']}  routes {', '.join(routes)}"
          + (f"  model worker: {args.worker} x{args.workers or 'auto'}" if server is not None else ""))
    print(f"{len(latencies)} requests x {args.items} items, concurrency {args.concurrency}: {wall:.2f}s")
    print(f"throughput {rps:.1f} req/s, {items_per_s:.1f} items/s")
    print(f"latency p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms, max {latencies.max() * 1000:.1f} ms")
    print(f"errors {errors}")
    if usage:  # (the server's own count, at its shutdown: all requests, the lone sentences included)
        print(f"server {usage[-1]}")
    # (the counts include the warm-up requests; they are few)
    print(f"CPU during the load: client {client_cpu:.2f}s ({client_cpu / wall:.2f} cores, "
          f"{client_cpu / len(latencies) * 1000:.2f} ms a request)"
          + (f", server {server_cpu:.2f}s ({server_cpu / wall:.2f} cores, "
             f"{server_cpu / len(latencies) * 1000:.2f} ms a request)" if server_cpu is not None else ""))
    last = (f"rps={rps:.2f} items_per_s={items_per_s:.1f} p50_ms={p50:.1f} p95_ms={p95:.1f} p99_ms={p99:.1f} "
            f"errors={errors}")
    if single is not None:
        single_p50 = float(np.percentile(single * 1000, 50))
        print(f"lone sentence (/v1/sentiment, 1 text, concurrency 1, {len(single)} requests): p50 {single_p50:.1f} ms, "
              f"p95 {np.percentile(single * 1000, 95):.1f} ms; errors {single_errors}")
        last += f" single_p50_ms={single_p50:.1f} p50_over_15ms={single_p50 / SINGLE_TARGET_MS:.2f}"
    if engine_s is not None:
        engine_rate = len(jobs) * args.items / engine_s
        print(f"engine (load_predictor, precision {args.precision}, same {len(jobs) * args.items} items): "
              f"{engine_s:.2f}s, {engine_rate:.1f} items/s; server/engine {items_per_s / engine_rate:.2f}")
        last += f" engine_items_per_s={engine_rate:.1f} server_over_engine={items_per_s / engine_rate:.2f}"
    print(last)
    return 1 if errors or single_errors else 0


if __name__ == "__main__":
    sys.exit(main())
