"""The errorRate SLO's query against a real Prometheus scraping the router's own metric objects.

Real parts: Debian's Prometheus on 127.0.0.1 (file_sd, the stack's scrape mechanism) and the router's
`RouterMetrics` exported with prometheus_client, counted the way the router's request path counts (`_record`:
a request by its code, 499 for a client that hung up, and an error by its kind). The requests themselves are not
sent: which kind a failure gets is test_router.py's matter; this is the arithmetic of the judgement.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import start_http_server

from quantrol_dev.localstack.procs import free_port, wait_until
from quantrol_dev.localstack.prometheus import PrometheusServer, TargetGroup, prometheus_binary, start_prometheus
from quantrol_operator.observe.prometheus import PrometheusSource
from quantrol_operator.rollout.queries import ARM_SLOS, Scope
from quantrol_worker.router.metrics import RouterMetrics
from tests.plugins.servers import require_binaries

pytestmark = pytest.mark.stack


@pytest.fixture
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    require_binaries({"prometheus": prometheus_binary()})
    server = start_prometheus(workdir=tmp_path_factory.mktemp("prometheus"))
    try:
        yield server
    finally:
        server.stop()


def _count(metrics: RouterMetrics, arm: str, answers: dict[str, int]) -> None:
    """`answers`: requests per outcome, "200" or an error kind, as the router records them."""
    codes = {"upstream_5xx": "500", "admission_queue_timeout": "429", "client_cancelled": "499"}
    series = metrics.series(arm, "live", "default")
    for outcome, n in answers.items():
        series.requests(codes.get(outcome, outcome)).inc(n)
        if outcome in codes:
            metrics.errors.labels(arm, "live", "default", outcome).inc(n)


def test_clients_that_hang_up_are_not_the_arms_errors(prometheus: PrometheusServer) -> None:
    """Users stop streamed answers all the time (a 499 at the router): counted as errors, the candidate's error rate
    would measure its users. Engine errors and the admission bound's 429s stay errors."""
    metrics = RouterMetrics()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        _count(metrics, "candidate", {"200": 0, "upstream_5xx": 0, "client_cancelled": 0})
        _count(metrics, "stable", {"200": 0, "admission_queue_timeout": 0, "client_cancelled": 0})
        prometheus.set_file_sd_targets([TargetGroup([f"127.0.0.1:{port}"], {"namespace": "ns", "policy": "p"})])
        source = PrometheusSource(prometheus.url)
        count = 'count(quantrol_router_requests_total{namespace="ns",policy="p"})'
        wait_until(lambda: source.scalar(count) == 6, timeout=30, interval=0.5, what="the zeroed series scraped")
        _count(metrics, "candidate", {"200": 80, "upstream_5xx": 5, "client_cancelled": 15})
        _count(metrics, "stable", {"200": 60, "admission_queue_timeout": 10, "client_cancelled": 30})
        total = 'sum(quantrol_router_requests_total{namespace="ns",policy="p"})'
        wait_until(lambda: source.scalar(total) == 200, timeout=30, interval=0.5, what="the counts scraped")
        scope = Scope("ns", "p", "60s")
        rates = {arm: source.scalar(ARM_SLOS["errorRate"](scope, arm)) for arm in ("candidate", "stable")}
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert rates["candidate"] == pytest.approx(0.05) and rates["stable"] == pytest.approx(0.10), rates
