"""The admission point the load goes through: Quantrol's own router, started in the Job with the policy's bounds and
one arm behind it, as production traffic meets it. Its 429s are the backpressure regime (iii) measures, and its
queue-wait histogram the queue age every rate is judged on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantrol_worker.contracts import AdmissionBounds
from quantrol_worker.router.config import AdmissionLimits, ArmConfig, RouterConfig, dump_config

QUEUE_WAIT = "quantrol_router_queue_wait_seconds"
READY_TIMEOUT_S = 60.0
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
Buckets = dict[float, float]  # upper bound → cumulative count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def router(arm_url: str, bounds: AdmissionBounds, work: Path) -> Iterator[str]:
    """A router on 127.0.0.1 in front of `arm_url` alone; yields its base URL, stops it (and waits) after."""
    config = RouterConfig(version=1, arms={"stable": ArmConfig(url=arm_url, weight=100, admission=AdmissionLimits(
        max_in_flight=bounds.max_in_flight, max_queue=bounds.max_queue,
        max_queue_wait_s=bounds.max_queue_wait_seconds))})
    path = work / "admission-router.json"
    path.write_text(dump_config(config))
    port = _free_port()
    log = (work / "admission-router.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "quantrol_worker.cli", "route", "--config", str(path),
                             "--host", "127.0.0.1", "--port", str(port), "--shutdown-grace", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the admission router exited with {proc.returncode}")
        try:
            with _HTTP.open(f"{url}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the admission router did not answer within {READY_TIMEOUT_S:.0f} s")


def queue_wait_buckets(url: str) -> Buckets:
    """The router's queue-wait histogram (all traffic), as cumulative counts per upper bound."""
    from prometheus_client.parser import text_string_to_metric_families

    with _HTTP.open(f"{url}/metrics", timeout=10) as response:
        text = response.read(8 * 1024 * 1024).decode()
    out: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != QUEUE_WAIT:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                out[bound] = out.get(bound, 0.0) + sample.value
    return out


def p99_between(before: Buckets, after: Buckets) -> float | None:
    """p99 queue wait of the requests between two snapshots: the smallest bucket bound holding 99% of them."""
    delta = {bound: after.get(bound, 0.0) - before.get(bound, 0.0) for bound in after}
    total = delta.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for bound in sorted(delta):
        if delta[bound] >= 0.99 * total:
            return bound if bound != float("inf") else max((b for b in delta if b != float("inf")), default=None)
    return None
