"""The launcher's own small HTTP port: `/metrics` (Prometheus), `/kernels` (JSON), `/healthz`, and `/ready` (the
pod's readiness: vLLM answers its /health and the kernels it loaded are verified, never `none`).

Separate from vLLM's port so that it answers while vLLM is still loading (the operator reads a `none` verdict
before any readiness probe would pass) and after vLLM died (until the pod is gone). stdlib `http.server` in a
daemon thread: three tiny read-only endpoints do not justify an event loop beside the log pump.

The info metric is built at scrape time from the current assessment (a custom collector), so a series never
lingers with stale labels after the verdict changes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from quantrol_worker.serve.verify import Assessment

INFO_METRIC = "quantrol_engine_kernel_info"
VERIFIED_METRIC = "quantrol_engine_kernel_verified"
MISMATCH_METRIC = "quantrol_engine_kernel_mismatch"
INFO_LABELS = ("scheme", "family", "kernel", "verdict", "kv_cache_dtype")


def assessment_json(a: Assessment) -> dict[str, Any]:
    return {
        "scheme": a.scheme,
        "target": a.target,
        "kvCacheDtype": a.kv_cache_dtype,
        "phase": a.phase,
        "verdict": a.verdict.value if a.verdict else None,
        "verified": a.verified,
        "family": a.family,
        "kernels": [
            {"kernel": k.kernel, "subject": k.subject, "family": k.family, "verdict": k.verdict.value}
            for k in a.kernels
        ],
        "mismatches": [{"reason": r.value, "detail": d} for r, d in a.mismatches],
        "message": a.message,
        "engine": a.engine,
        "flags": list(a.flags),
    }


class KernelCollector(Collector):
    def __init__(self, current: Callable[[], Assessment]) -> None:
        self._current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        a = self._current()
        info = GaugeMetricFamily(
            INFO_METRIC, "Kernels the engine actually uses, with the shared table's verdict (1 per kernel).",
            labels=INFO_LABELS,
        )
        if a.verdict is not None:
            if a.kernels:
                for k in a.kernels:
                    info.add_metric([a.scheme, k.family, k.kernel, k.verdict.value, a.kv_cache_dtype], 1)
            else:
                # `none` (no kernel found) and the unquantized baseline have no kernel line; still one series.
                info.add_metric([a.scheme, a.family, "", a.verdict.value, a.kv_cache_dtype], 1)
        yield info
        verified = GaugeMetricFamily(
            VERIFIED_METRIC, "1 when the loaded kernels are what the scheme promises and nothing mismatches.",
        )
        verified.add_metric([], 1.0 if a.verified else 0.0)
        yield verified
        mismatch = GaugeMetricFamily(MISMATCH_METRIC, "1 per reason the engine breaks the artifact's promise.",
                                     labels=("reason",))
        for reason, _ in a.mismatches:
            mismatch.add_metric([reason.value], 1)
        yield mismatch


Readiness = Callable[[], tuple[bool, str]]


def _handler(registry: CollectorRegistry, current: Callable[[], Assessment],
             ready: Readiness | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/kernels":
                self._send(200, "application/json", json.dumps(assessment_json(current())).encode())
            elif path == "/healthz":
                self._send(200, "text/plain", b"ok\n")
            elif path == "/ready" and ready is not None:
                ok, why = ready()
                self._send(200 if ok else 503, "text/plain", f"{why}\n".encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Scrapes every few seconds would drown vLLM's log, which is the one an operator reads.
            return

    return Handler


class StatusServer:
    def __init__(self, host: str, port: int, current: Callable[[], Assessment], ready: Readiness | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(KernelCollector(current))
        self._server = ThreadingHTTPServer((host, port), _handler(self.registry, current, ready))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="quantrol-status", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
