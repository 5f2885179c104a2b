"""Router overhead: the same requests sent directly to an engine stand-in and through the router, side by side.

Three processes, as in production (load generator here; router and backend as subprocesses), all on 127.0.0.1:
the backend is the tests' ENGINE STAND-IN (tests/engine_standin.py, not vLLM) in zero-latency mode, so what is
measured is the router's own cost. For each concurrency (1, 16, 100) and mode (non-streamed, streamed), rounds of
direct and routed load alternate so that drift on a shared machine hits both alike; each figure is over all
rounds. Prints p50 / p99 latency, throughput, the added latency and the ratio. Figures, never pass/fail.

    .venvs/dev/bin/python bench/bench_router.py [--requests 300] [--rounds 3] [--max-tokens 16]

Target (issue 5): ≤ 1 ms p50 and ≤ 5 ms p99 added.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def start_backend() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.engine_standin", "--port", "0", "--model", "m"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise SystemExit(f"backend did not start: {line!r}")
    return proc, int(line.split()[1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout_s}s")


def start_router(backend_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    config = {"version": 1, "arms": {"stable": {"url": f"http://127.0.0.1:{backend_port}", "weight": 100,
                                                "admission": {"max_in_flight": 1000, "max_queue": 1000}}}}
    path = workdir / "router.json"
    path.write_text(json.dumps(config))
    port = free_port()
    log = (workdir / "router.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantrol_worker.cli", "route", "--config", str(path), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "WARNING"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT / "worker")},
    )
    return proc, port


async def load(session: aiohttp.ClientSession, url: str, concurrency: int, requests: int, stream: bool,
               max_tokens: int) -> tuple[list[float], float]:
    body = {"model": "m", "prompt": "the quick brown fox", "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"{url} answered {r.status}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend, backend_port = start_backend()
        router, router_port = start_router(backend_port, Path(tmp))
        try:
            direct_url, router_url = f"http://127.0.0.1:{backend_port}", f"http://127.0.0.1:{router_port}"
            await wait_ready(router_url + "/healthz")
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                for url in (direct_url, router_url):  # warm-up: connections, code paths
                    await load(session, url, 16, 200, False, args.max_tokens)
                print(f"router overhead vs direct (engine stand-in, zero latency, {args.max_tokens} tokens per "
                      f"answer, {args.requests} requests x {args.rounds} rounds per cell, cpus={os.cpu_count()})")
                header = (f"{'conc':>4} {'mode':>6} | {'direct p50':>10} {'p99':>8} {'req/s':>7} | {'router p50':>10} "
                          f"{'p99':>8} {'req/s':>7} | {'+p50 ms':>7} {'+p99 ms':>7} {'p50 x':>6} {'thr x':>6}")
                print(header)
                print("-" * len(header))
                for concurrency in (1, 16, 100):
                    for stream in (False, True):
                        samples: dict[str, list[float]] = {"direct": [], "router": []}
                        elapsed = {"direct": 0.0, "router": 0.0}
                        for _ in range(args.rounds):
                            for name, url in (("direct", direct_url), ("router", router_url)):
                                lat, took = await load(session, url, concurrency, args.requests, stream,
                                                       args.max_tokens)
                                samples[name] += lat
                                elapsed[name] += took
                        d, r = samples["direct"], samples["router"]
                        d50, d99, r50, r99 = pct(d, 0.5), pct(d, 0.99), pct(r, 0.5), pct(r, 0.99)
                        dt, rt = len(d) / elapsed["direct"], len(r) / elapsed["router"]
                        mode = "stream" if stream else "whole"
                        print(f"{concurrency:>4} {mode:>6} | {d50 * 1e3:>8.2f}ms {d99 * 1e3:>6.2f}ms {dt:>7.0f} | "
                              f"{r50 * 1e3:>8.2f}ms {r99 * 1e3:>6.2f}ms {rt:>7.0f} | {(r50 - d50) * 1e3:>7.2f} "
                              f"{(r99 - d99) * 1e3:>7.2f} {r50 / d50:>6.2f} {rt / dt:>6.2f}")
                        sys.stdout.flush()
        finally:
            for proc in (router, backend):
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per round per target")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
