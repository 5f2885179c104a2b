"""Why no judgement: each diagnosis decided from a real Prometheus' own answers, and shown as the Paused
condition's reason after one window (inconclusiveLimit and errorLimit 1).

Real parts: Debian's Prometheus on 127.0.0.1 with file_sd targets (the stack's own scrape mechanism); the observe
layer's window (the operator's SLO queries and the diagnosis) against it; the pure planner on the result. The
cases are real states of Prometheus, not injected answers: a policy it has no target for, a target on a closed
port (its scrape fails), a target that answers (Prometheus itself) but carries no router series, a Prometheus
address nobody listens on, and a custom SLO whose PromQL Prometheus refuses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from quantrol_dev.localstack.procs import free_port, wait_until
from quantrol_dev.localstack.prometheus import PrometheusServer, TargetGroup, prometheus_binary, start_prometheus
from quantrol_operator.api.servingpolicy import NoJudgement, ServingPolicySpec
from quantrol_operator.observe import analysis
from quantrol_operator.observe.prometheus import PrometheusSource
from tests.plugins.servers import require_binaries
from tests.test_servingpolicy_plan import T0, _to_shadow, advance, qm, run

pytestmark = pytest.mark.stack
NAMESPACE = "llm-serving"


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """One Prometheus for the target cases: policy `down` has a router target on a closed port, policy `up` one
    that answers (Prometheus itself, which exports no router series); policy `none` has no target at all."""
    require_binaries({"prometheus": prometheus_binary()})
    server = start_prometheus(workdir=tmp_path_factory.mktemp("prometheus"))
    try:
        yield _with_targets(server)
    finally:
        server.stop()


def _with_targets(server: PrometheusServer) -> PrometheusServer:
    closed = f"127.0.0.1:{free_port()}"
    itself = server.url.removeprefix("http://")
    server.set_file_sd_targets([TargetGroup([closed], {"namespace": NAMESPACE, "policy": "down"}),
                                TargetGroup([itself], {"namespace": NAMESPACE, "policy": "up"})])

    def both_scraped() -> bool:
        health = {t["labels"].get("policy"): t["health"] for t in server.active_targets()}
        return health.get("down") == "down" and health.get("up") == "up"

    wait_until(both_scraped, timeout=30, interval=0.5, what="both file_sd targets scraped once")
    return server


def _shadow_policy(name: str, address: str, **slos: Any) -> dict[str, Any]:
    obj, _ = _to_shadow()
    obj = copy.deepcopy(obj)
    obj["metadata"]["name"] = name
    obj["spec"]["analysis"].update(prometheus={"address": address}, inconclusiveLimit=1, errorLimit=1)
    obj["spec"]["slos"].update(slos)
    return obj


def _one_window(obj: dict[str, Any]) -> dict[str, Any]:
    """One analysis pass as the operator makes it: the window observed against Prometheus, then the plan."""
    spec = ServingPolicySpec.model_validate(obj["spec"])
    status = obj["status"]
    now = T0 + timedelta(minutes=5)
    assert analysis.due(status, spec, now)
    source = analysis.source_for(spec, "http://unused.invalid:9090")
    window = analysis.window(source, NAMESPACE, obj["metadata"]["name"], status, spec)
    result = run(obj, quantized_model=qm(), window=window, now=now)
    return advance(obj, result)["status"]


def _paused(status: dict[str, Any]) -> dict[str, Any]:
    assert status["phase"] == "Paused", status.get("lastAnalysis")
    condition = next(c for c in status["conditions"] if c["type"] == "Paused")
    assert condition["status"] == "True"
    return condition


@pytest.mark.parametrize(("policy", "reason"), [
    ("none", NoJudgement.NO_TARGETS),
    ("down", NoJudgement.TARGETS_DOWN),
    ("up", NoJudgement.NO_SAMPLES),
])
def test_the_targets_decide_why_no_judgement(scraped: PrometheusServer, policy: str, reason: NoJudgement) -> None:
    status = _one_window(_shadow_policy(policy, scraped.url))
    condition = _paused(status)
    assert condition["reason"] == reason.value, condition
    assert status["lastAnalysis"]["noJudgement"] == reason.value
    assert status["lastAnalysis"]["verdict"] == "inconclusive"
    assert reason.value in status["history"][-1]["message"]


def test_an_unreachable_prometheus_is_metrics_unreachable() -> None:
    status = _one_window(_shadow_policy("up", f"http://127.0.0.1:{free_port()}"))
    condition = _paused(status)
    assert condition["reason"] == NoJudgement.METRICS_UNREACHABLE.value, condition
    assert status["lastAnalysis"]["verdict"] == "error"
    # The class reaches status, never the client library's error text.
    assert all("Connection" not in (m.get("message") or "") for m in status["lastAnalysis"]["metrics"])


def test_a_query_prometheus_refuses_is_query_failed(scraped: PrometheusServer) -> None:
    broken = [{"name": "broken", "query": "sum(rate(x[$window]) by", "max": 1.0}]
    status = _one_window(_shadow_policy("up", scraped.url, custom=broken))
    assert _paused(status)["reason"] == NoJudgement.QUERY_FAILED.value


def test_prometheus_source_classifies_its_errors(scraped: PrometheusServer) -> None:
    from quantrol_operator.rollout.queries import QueryError

    with pytest.raises(QueryError) as refused:
        PrometheusSource(scraped.url).scalar("sum(")
    assert refused.value.reason is NoJudgement.QUERY_FAILED
    with pytest.raises(QueryError) as unreachable:
        PrometheusSource(f"http://127.0.0.1:{free_port()}").scalar("up")
    assert unreachable.value.reason is NoJudgement.METRICS_UNREACHABLE
