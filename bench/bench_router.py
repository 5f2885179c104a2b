"""Router overhead: the same requests sent directly to an engine stand-in and through the router, side by side.

Three processes, as in production (the load generator is the fleet: GuideLLM, quantrol_dev.fleet; router and backend
are subprocesses too), all on 127.0.0.1;
the backend is the tests' ENGINE STAND-IN (quantrol_dev/standin.py, not vLLM). For each concurrency and mode
(non-streamed "whole", streamed "stream"), rounds of direct and routed load alternate so that drift on a shared
machine hits both alike; each figure is over all rounds. Figures, never pass/fail. Target (issue 5): ≤ 1 ms p50
and ≤ 5 ms p99 added.

    .venvs/dev/bin/python bench/bench_router.py                     # full run, about a minute
    .venvs/dev/bin/python bench/bench_router.py --quick             # a smoke run, a few seconds
    .venvs/dev/bin/python bench/bench_router.py [--requests 300] [--rounds 3] [--max-tokens 16]
        [--concurrency 1,16,100] [--paced-token-ms 20] [--paced-waves 5] [--paced-concurrency 16,100]
        [--router-python "$QUANTROL_SERVE_PYTHON"]       # the router in the serving image's environment (uvloop)

Two sections:

1. Zero-latency engine (1, 16, 100 concurrent): what is measured is the proxies' own cost. At 1 concurrent the three
   processes take turns, so "+p50" is the router's path latency. At 16 and 100 the closed loop keeps every core busy
   (column `busy`: CPU used by the router and the engine stand-in over the cores the machine has; the load
   generator's and other load on the machine come on top), so a request's latency is mostly its wait for a core: the
   routed loop has a third process to feed, and its added latency grows like concurrency x router CPU per request /
   cores, whatever the router's path costs. There the figure that does not depend on saturation is the router's CPU
   per request (`rtr us/req`, from /proc; the backend stand-in's own is `eng us/req`, for scale).
2. Paced engine (`--paced-token-ms` per output token, streamed or not, at 16 and 100 concurrent): like a GPU
   engine, the backend spends its time waiting rather than on the router's cores, so the cores are not saturated
   and "+p50"/"+p99" is the router's added latency under concurrent load. The clients' first requests are spread
   over one answer's duration, as independent users arrive (clients started together stay in step and hit the
   single-threaded router in bursts of `concurrency`). Every token is relayed on its own here, so `rtr us/req`
   for streams is the per-token cost x tokens. On a machine shared with other work, each extra process hop also
   waits for a core: compare rows of one run, and mind `busy` and the load average printed on top.
3. Compared requests (`--compare-requests`, sampled at temperature 0.8, 16 concurrent): the same load through a
   router that mirrors nothing and through one that mirrors and compares every request (the candidate's mirrored
   answer, its teacher-forced scoring of the stable answer, the comparison, their metrics). The difference in the
   router's CPU per request is what one compared request adds; the candidate's prefilled tokens per compared
   request are the engine-side cost.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from quantrol_dev.fleet import FleetProcess
from quantrol_worker.fleet import Mix, Prompt

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (Prompt("the quick brown fox"),)


def start_backend(token_latency_s: float) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "quantrol_dev.standin", "--port", "0", "--model", "m",
                             "--token-latency", str(token_latency_s)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
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


def start_router(backend_port: int, workdir: Path, python: str, candidate_port: int | None = None,
                 mirror_fraction: float = 0.0) -> tuple[subprocess.Popen[bytes], int]:
    admission = {"max_in_flight": 1000, "max_queue": 1000}
    arms: dict[str, Any] = {"stable": {"url": f"http://127.0.0.1:{backend_port}", "weight": 100,
                                       "admission": admission}}
    if candidate_port is not None:
        arms["candidate"] = {"url": f"http://127.0.0.1:{candidate_port}", "weight": 0, "admission": admission}
    config = {"version": 1, "arms": arms, "mirror_fraction": mirror_fraction,
              "compare": {"max_concurrent_mirrors": 1000}}
    path = workdir / f"router-{backend_port}-{mirror_fraction}.json"
    path.write_text(json.dumps(config))
    port = free_port()
    log = (workdir / f"router-{backend_port}-{mirror_fraction}.log").open("wb")
    proc = subprocess.Popen(
        [python, "-m", "quantrol_worker.cli", "route", "--config", str(path), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "ERROR"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT / "worker")},
    )
    return proc, port


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process (all its threads) has run: the scheduler's nanosecond count in
    /proc/PID/task/*/schedstat, else /proc/PID/stat in clock ticks (10 ms: coarse for a short run), else 0 (not
    Linux: the CPU columns then read 0)."""
    try:
        return sum(int(p.read_text().split()[0]) for p in Path(f"/proc/{pid}/task").glob("*/schedstat")) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, concurrency: int, requests: int, stream: bool, max_tokens: int, spread_s: float = 0.0,
               temperature: float = 0.0) -> tuple[list[float], float]:
    """`concurrency` clients of the fleet (GuideLLM, quantrol_dev.fleet), each sending its next request when its
    last one is answered, `requests` in all; with `spread_s`, their first requests are spread over that many seconds
    (see the paced section). Returns every request's latency and the run's wall time (first sent to last answered:
    GuideLLM's own start-up is not in it)."""
    mix = Mix(sampled_every=1 if temperature else 0, sampled_temperature=temperature or Mix.sampled_temperature,
              unstreamed_every=0 if stream else 1)
    fleet = FleetProcess([url], "m", PROMPTS, seconds=600, max_tokens=max_tokens, clients=concurrency,
                         requests=requests, mix=mix, rampup=spread_s)
    result = await asyncio.to_thread(fleet.run, 660)
    if result.failed or result.ok < requests:
        raise SystemExit(f"{url}: {result.failed} of {len(result.answers)} requests failed: {fleet.log()[-1500:]}")
    return [a.latency for a in result.answers if a.latency is not None], result.wall


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Side:
    """One target's figures over all rounds of a cell; CPU seconds per process over those rounds."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: dict[str, float] = field(default_factory=lambda: {"router": 0.0, "backend": 0.0})

    def per_request_us(self, name: str) -> float:
        return self.cpu[name] / len(self.latencies) * 1e6

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed

    @property
    def busy(self) -> float:
        return sum(self.cpu.values()) / self.elapsed / (os.cpu_count() or 1)


HEADER = (f"{'conc':>4} {'mode':>6} | {'direct p50':>10} {'p99':>8} {'req/s':>6} | {'router p50':>10} {'p99':>8} "
          f"{'req/s':>6} | {'+p50 ms':>7} {'+p99 ms':>7} {'p50 x':>5} {'thr x':>5} | {'rtr us/req':>10} "
          f"{'eng us/req':>10} {'busy':>4}")


def row(concurrency: int, stream: bool, d: Side, r: Side) -> str:
    d50, d99, r50, r99 = pct(d.latencies, 0.5), pct(d.latencies, 0.99), pct(r.latencies, 0.5), pct(r.latencies, 0.99)
    mode = "stream" if stream else "whole"
    return (f"{concurrency:>4} {mode:>6} | {d50 * 1e3:>8.2f}ms {d99 * 1e3:>6.2f}ms {d.throughput:>6.0f} | "
            f"{r50 * 1e3:>8.2f}ms {r99 * 1e3:>6.2f}ms {r.throughput:>6.0f} | {(r50 - d50) * 1e3:>7.2f} "
            f"{(r99 - d99) * 1e3:>7.2f} {r50 / d50:>5.2f} {r.throughput / d.throughput:>5.2f} | "
            f"{r.per_request_us('router'):>10.0f} {d.per_request_us('backend'):>10.0f} {r.busy:>4.2f}")


async def section(title: str, token_latency_s: float, cells: list[tuple[int, int]], args: argparse.Namespace,
                  workdir: Path) -> dict[tuple[int, bool], tuple[Side, Side]]:
    """Start a backend and a router in front of it, run every (concurrency, requests per round) cell in both modes,
    print one row per cell; return the figures."""
    backend, backend_port = start_backend(token_latency_s)
    router, router_port = start_router(backend_port, workdir, args.router_python)
    rounds, max_tokens = args.rounds, args.max_tokens
    # Paced: one answer's duration. Clients that all start at once stay in step (every answer takes the same time),
    # so the router would see bursts of `concurrency` requests and then `concurrency` tokens at once, each burst
    # served one after the other by its single thread; users arrive independently, so the clients start spread.
    spread_s = token_latency_s * max_tokens
    pids = {"router": router.pid, "backend": backend.pid}
    results: dict[tuple[int, bool], tuple[Side, Side]] = {}
    try:
        direct_url, router_url = f"http://127.0.0.1:{backend_port}", f"http://127.0.0.1:{router_port}"
        await wait_ready(router_url + "/healthz")
        for url in (direct_url, router_url):  # warm-up: code paths
            for stream in (False, True):
                await load(url, 16, 16 if token_latency_s else 200, stream, max_tokens)
        print(f"\n{title}\n{HEADER}\n{'-' * len(HEADER)}")
        for concurrency, requests in cells:
            for stream in (False, True):
                sides = {"direct": Side(), "router": Side()}
                for _ in range(rounds):
                    for name, url in (("direct", direct_url), ("router", router_url)):
                        before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                        latencies, took = await load(url, concurrency, requests, stream, max_tokens, spread_s)
                        side = sides[name]
                        side.latencies += latencies
                        side.elapsed += took
                        for k, pid in pids.items():
                            side.cpu[k] += cpu_seconds(pid) - before[k]
                results[(concurrency, stream)] = (sides["direct"], sides["router"])
                print(row(concurrency, stream, sides["direct"], sides["router"]), flush=True)
    finally:
        for proc in (router, backend):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


async def router_counter(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def compare_section(args: argparse.Namespace, workdir: Path) -> None:
    """Section 3: the router's added CPU per compared request (see the module docstring)."""
    stable, stable_port = start_backend(0.0)
    candidate, candidate_port = start_backend(0.0)
    routers = {mirror: start_router(stable_port, workdir, args.router_python, candidate_port, mirror)
               for mirror in (0.0, 1.0)}
    n, concurrency = args.compare_requests, 16
    print(f"\n3. compared requests: {n} sampled requests (temperature 0.8) per mode, {concurrency} concurrent, "
          f"through a router that mirrors none and one that mirrors and compares all")
    positions = "quantrol_router_compare_positions_total"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for stream in (False, True):
                per_request: dict[float, float] = {}
                for mirror, (proc, port) in routers.items():
                    url = f"http://127.0.0.1:{port}"
                    await wait_ready(url + "/healthz")
                    target = await router_counter(session, url, positions) + n * 0.9 * args.max_tokens
                    before = cpu_seconds(proc.pid)
                    await load(url, concurrency, n, stream, args.max_tokens, temperature=0.8)
                    deadline = time.monotonic() + 60  # mirrors and scorings finish after the client's answer
                    while mirror and time.monotonic() < deadline:
                        if await router_counter(session, url, positions) >= target:
                            break
                        await asyncio.sleep(0.2)
                    per_request[mirror] = (cpu_seconds(proc.pid) - before) / n * 1e6
                prefill = await router_counter(session, f"http://127.0.0.1:{routers[1.0][1]}",
                                               "quantrol_router_score_prefill_tokens_total")
                mode = "streamed" if stream else "whole"
                print(f"router CPU per {mode} request: {per_request[0.0]:.0f} us not compared, {per_request[1.0]:.0f}"
                      f" us compared: +{per_request[1.0] - per_request[0.0]:.0f} us per compared request (mirror, "
                      f"scoring, comparison); candidate prefill so far {prefill:.0f} tokens", flush=True)
    finally:
        for proc in (*(p for p, _ in routers.values()), stable, candidate):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def run(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    paced = [int(c) for c in args.paced_concurrency.split(",")] if args.paced_token_ms > 0 else []
    print(f"router overhead vs direct (engine stand-in, {args.max_tokens} tokens per answer, {args.rounds} rounds "
          f"per cell, cpus={os.cpu_count()}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
          f"router on {args.router_python})")
    with tempfile.TemporaryDirectory() as tmp:
        sections: dict[str, dict[tuple[int, bool], tuple[Side, Side]]] = {}
        sections["zero-latency"] = await section(
            f"1. zero-latency engine, {args.requests} requests per round per target", 0.0,
            [(c, args.requests) for c in concurrencies], args, Path(tmp),
        )
        if paced:
            sections["paced"] = await section(
                f"2. paced engine, {args.paced_token_ms:g} ms per output token, {args.paced_waves} x concurrency "
                f"requests per round per target", args.paced_token_ms / 1e3,
                [(c, c * args.paced_waves) for c in paced], args, Path(tmp),
            )
        if args.compare_requests > 0:
            await compare_section(args, Path(tmp))
    print()
    for name, results in sections.items():
        for stream in (False, True):
            cells = [(c, d, r) for (c, s), (d, r) in results.items() if s == stream]
            print(f"router CPU per {'streamed' if stream else 'whole'} request ({args.max_tokens} tokens), {name}: "
                  + ", ".join(f"{r.per_request_us('router'):.0f} us at {c}" for c, _, r in cells)
                  + " (engine stand-in: " + ", ".join(f"{d.per_request_us('backend'):.0f}" for _, d, _ in cells)
                  + " us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="zero-latency section: requests per round per "
                        "target")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", default="1,16,100", help="zero-latency section: comma-separated")
    parser.add_argument("--paced-token-ms", type=float, default=20.0, help="paced section: engine milliseconds per "
                        "output token (0: skip the section)")
    parser.add_argument("--paced-waves", type=int, default=5, help="paced section: requests per round per target, "
                        "in multiples of the concurrency")
    parser.add_argument("--paced-concurrency", default="16,100", help="paced section: comma-separated")
    parser.add_argument("--compare-requests", type=int, default=300, help="compared section: sampled requests per "
                        "mode and router (0: skip the section)")
    parser.add_argument("--router-python", default=sys.executable, help="the router's interpreter (default: this "
                        "one); $QUANTROL_SERVE_PYTHON is the serving image's environment, which has uvloop")
    parser.add_argument("--quick", action="store_true", help="a smoke run: --requests 100 --rounds 1 "
                        "--paced-waves 3")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.paced_waves, args.compare_requests = 100, 1, 3, 100
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
