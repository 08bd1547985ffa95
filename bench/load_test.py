"""Load test of `mtbert serve`: throughput, latency percentiles and errors under concurrent requests.

Starts `mtbert serve RUN_DIR` on a free loopback port (or uses --url), waits for /health, then sends
--requests POSTs from --concurrency concurrent clients, cycling over the routes the model answers
(sentiment, paraphrase, similarity), each request carrying --items texts or pairs.

    python bench/load_test.py RUN_DIR [--requests 200] [--concurrency 8] [--items 4]
    python bench/load_test.py --url http://127.0.0.1:8000 [...]     # a server already running

The last line reads `rps=.. items_per_s=.. p50_ms=.. p95_ms=.. p99_ms=.. errors=..`.
"""
from __future__ import annotations

import argparse
import asyncio
import random
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


def make_body(route: str, items: int, rng: random.Random) -> dict:
    if route == "sentiment":
        return {"texts": [rng.choice(SENTENCES) for _ in range(items)]}
    return {"pairs": [rng.sample(SENTENCES, 2) for _ in range(items)]}


async def run_load(url: str, routes: list[str], requests: int, concurrency: int, items: int, seed: int):
    """-> (latencies in seconds, errors, wall seconds)."""
    rng = random.Random(seed)
    jobs = [(routes[i % len(routes)], make_body(routes[i % len(routes)], items, rng)) for i in range(requests)]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", help="run / ensemble directory to serve (not needed with --url)")
    ap.add_argument("--url", help="test a server already running at this base URL instead of starting one")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--items", type=int, default=4, help="texts or pairs per request")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    args = ap.parse_args()
    if not args.url and not args.run_dir:
        ap.error("give RUN_DIR or --url")

    server, log = None, tempfile.TemporaryFile()
    url = args.url.rstrip("/") if args.url else None
    try:
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            server = subprocess.Popen([sys.executable, "-m", "mtbert.cli", "serve", args.run_dir, "--port", str(port),
                                       "--device", args.device], stdout=log, stderr=subprocess.STDOUT)
        wait_for_health(url, server, args.startup_timeout)
        info = httpx.get(f"{url}/v1/info", timeout=10).json()
        routes = list(info["routes"])
        if args.items > info["limits"]["max_items"]:
            raise SystemExit(f"--items {args.items} is over the server's max_items {info['limits']['max_items']}")
        latencies, errors, wall = asyncio.run(
            run_load(url, routes, args.requests, args.concurrency, args.items, args.seed))
    except Exception:
        if server is not None:
            log.seek(0)
            print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    p50, p95, p99 = np.percentile(latencies * 1000, [50, 95, 99])
    rps, items_per_s = len(latencies) / wall, len(latencies) * args.items / wall
    print(f"server {url}  model {info['run']}  routes {', '.join(routes)}")
    print(f"{len(latencies)} requests x {args.items} items, concurrency {args.concurrency}: {wall:.2f}s")
    print(f"throughput {rps:.1f} req/s, {items_per_s:.1f} items/s")
    print(f"latency p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms, max {latencies.max() * 1000:.1f} ms")
    print(f"errors {errors}")
    print(f"rps={rps:.2f} items_per_s={items_per_s:.1f} p50_ms={p50:.1f} p95_ms={p95:.1f} p99_ms={p99:.1f} "
          f"errors={errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
