# ruff: noqa: F811  (fixtures imported from tests.test_bounded_http are taken by name)
"""The install policy against a tenant (issue 20): each attack refused, naming the field and the rule, with nothing
created and the stable arm serving; Prometheus answers bounded like every other tenant-controlled read.

Planner tests are pure; the Prometheus tests use real sockets on 127.0.0.1 (an endless body, a drip, a redirect, an
error page echoing a secret), from tests/test_bounded_http.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from quantrol_operator.api.servingpolicy import NoJudgement
from quantrol_operator.observe.prometheus import PrometheusSource
from quantrol_operator.planning.quantizedmodel import QmObserved
from quantrol_operator.planning.quantizedmodel import plan as plan_qm
from quantrol_operator.planning.servingpolicy import SpObserved, read_spec
from quantrol_operator.planning.servingpolicy import plan as plan_sp
from quantrol_operator.policy import InstallPolicy, ReadBounds
from quantrol_operator.rollout.queries import QueryError, custom_query_refusal
from tests.test_bounded_http import dripping, endless, redirecting, serve_answers  # noqa: F401  (fixtures)
from tests.test_quantizedmodel_plan import IMAGE, NOW, qm
from tests.test_servingpolicy_plan import IMAGES, T0, _to_shadow, deployments, policy, ready

STRICT = InstallPolicy.model_validate({
    "prometheus": {"allowedAddresses": ["http://prometheus.monitoring.svc:9090"]},
    "workloads": {"imagePrefixes": ["ghcr.io/quantrol/", "vllm/vllm-openai:"], "serviceAccounts": ["default"],
                  "tolerations": False, "nodeSelectors": False},
})
DEFAULT_PROMETHEUS = "http://prometheus.monitoring.svc:9090"


def sp_run(obj: dict[str, Any], install: InstallPolicy, **observed: Any) -> Any:
    return plan_sp(SpObserved(obj=obj, spec=read_spec(obj, install, DEFAULT_PROMETHEUS), **observed), IMAGES)


def test_a_calibration_job_in_a_foreign_image_under_any_account_on_tainted_nodes_is_refused() -> None:
    obj = qm(job__image="evil.example.com/miner:1", job__serviceAccountName="admin")
    result = plan_qm(QmObserved(obj=obj, now=NOW), IMAGE, STRICT)
    assert result.apply == []  # no Job, no ConfigMap
    assert result.status["phase"] == "Failed"
    ready_condition = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready_condition["reason"] == "RefusedByInstallPolicy"
    for field in ("spec.job.image", "spec.job.serviceAccountName", "spec.job.tolerations", "spec.job.nodeSelector"):
        assert field in result.status["message"], field
    # The same spec under the permissive built-in policy (no chart): the Job is created.
    assert any(o["kind"] == "Job" for o in plan_qm(QmObserved(obj=obj, now=NOW), IMAGE, InstallPolicy()).apply)


def test_a_serving_image_no_longer_allowed_keeps_stable_and_withdraws_the_candidate() -> None:
    """The install policy changes under running arms: the candidate's traffic goes back to stable at once, nothing
    is deleted or re-imaged (the stable arm keeps serving as it is), and status names the field and the rule."""
    obj, shadow = _to_shadow()
    obj["spec"]["serving"]["image"] = "registry.evil.example.com/vllm:latest"
    obj["spec"]["serving"].pop("nodeSelector", None)
    result = sp_run(obj, STRICT, deployments=ready(deployments(shadow)), now=T0 + timedelta(seconds=30))
    assert result.delete == []
    assert [o["kind"] for o in result.apply] == ["ConfigMap"]  # the router config only: no arm touched
    config = json.loads(result.router_config or "{}")
    assert set(config["arms"]) == {"stable"} and config["arms"]["stable"]["weight"] == 100
    assert result.status["weights"] == {"stable": 100, "candidate": 0, "mirrorFraction": 0.0}
    assert "spec.serving.image" in result.status["message"]
    progressing = next(c for c in result.status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "RefusedByInstallPolicy"


def test_a_prometheus_the_install_does_not_list_is_refused_before_any_query() -> None:
    obj = policy()
    obj["spec"]["analysis"]["prometheus"] = {"address": "http://169.254.169.254/latest"}
    obj["spec"]["serving"] = {"image": "vllm/vllm-openai:v0.11.0"}
    read = read_spec(obj, STRICT, DEFAULT_PROMETHEUS)
    assert [r.field for r in read.refused] == ["spec.analysis.prometheus.address"]
    result = sp_run(obj, STRICT, now=T0)
    assert result.apply == [] and "allowedAddresses" in result.status["message"]


@pytest.mark.parametrize(("query", "allowed"), [
    ('sum(rate(quantrol_router_requests_total{namespace="$namespace",arm="$arm"}[$window]))', True),
    ('sum(rate(x{namespace="team-a"}[5m])) / sum(rate(y{namespace="$namespace"}[5m]))', True),
    ("sum(rate(quantrol_router_requests_total[5m]))", False),  # every tenant's series
    ('sum(rate(x{namespace="team-b"}[5m]))', False),  # another tenant's
    ('sum(rate(x{namespace=~"team-.*"}[5m]))', False),  # a regular expression is not "this namespace"
    ('x{namespace="$namespace"} or on() y', False),  # one selector of two
    ('x{namespace="$namespace" or job="y"}', False),  # one alternative of two
    ('{__name__=~".+"}', False),
    ("sum(", False),  # not PromQL
])
def test_custom_promql_must_stay_in_the_policys_namespace(query: str, allowed: bool) -> None:
    assert (custom_query_refusal(query, "team-a") is None) == allowed


def test_a_custom_slo_reading_other_tenants_refuses_the_rollout_naming_it() -> None:
    obj = policy()
    obj["metadata"]["namespace"] = "team-a"
    obj["spec"]["slos"]["custom"] = [{"name": "spy", "query": "sum(rate(quantrol_router_requests_total[1m]))",
                                      "max": 1}]
    result = sp_run(obj, InstallPolicy(), now=T0)
    assert result.apply == []
    assert "spec.slos.custom[0].query: custom SLO 'spy'" in result.status["message"]


# --- Prometheus answers, bounded -----------------------------------------------------------------------------------


@pytest.fixture
def echoing() -> Iterator[str]:
    def answer(conn: Any) -> None:
        conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 34\r\n\r\n"
                     b"aws_secret_access_key=AKIAEXAMPLE42")

    yield from serve_answers(answer)


def base(url: str) -> str:
    return url.removesuffix("/kernels")


def test_an_endless_prometheus_answer_is_cut_at_the_byte_bound(endless: str) -> None:
    source = PrometheusSource(base(endless), ReadBounds(max_bytes=256 << 10, total_seconds=5))
    began = time.monotonic()
    with pytest.raises(QueryError) as failed:
        source.scalar("up")
    assert failed.value.reason is NoJudgement.METRICS_UNREACHABLE and time.monotonic() - began < 5


def test_a_dripping_prometheus_is_cut_at_the_time_bound(dripping: str) -> None:
    source = PrometheusSource(base(dripping), ReadBounds(total_seconds=1.5))
    began = time.monotonic()
    with pytest.raises(QueryError) as failed:
        source.scalar("up")
    assert failed.value.reason is NoJudgement.METRICS_UNREACHABLE and time.monotonic() - began < 3


def test_a_redirect_is_not_followed_and_an_error_page_never_reaches_status(redirecting: str, echoing: str) -> None:
    with pytest.raises(QueryError) as failed:
        PrometheusSource(base(redirecting)).scalar("up")
    assert failed.value.reason is NoJudgement.QUERY_FAILED
    with pytest.raises(QueryError) as failed:
        PrometheusSource(base(echoing)).scalar("up")
    assert failed.value.reason is NoJudgement.QUERY_FAILED and "AKIA" not in str(failed.value)


# --- plain-HTTP registries and engine flags (issue 14) ------------------------------------------------------------


def test_without_the_chart_only_the_safe_registry_and_engine_choices_are_allowed() -> None:
    from quantrol_operator.policy import DEFAULT_ENGINE_FLAGS

    policy = InstallPolicy.from_env({})
    assert policy.registries.plain_http == () and not policy.allows_plain_http("registry.ci.svc")
    assert policy.workloads.engine_flags == DEFAULT_ENGINE_FLAGS
    assert "--trust-remote-code" not in DEFAULT_ENGINE_FLAGS and "--download-dir" not in DEFAULT_ENGINE_FLAGS


def test_plain_http_registries_and_engine_flags_are_read_and_checked() -> None:
    import json

    policy = InstallPolicy.from_env({"QUANTROL_INSTALL_POLICY": json.dumps({
        "registries": {"plainHttp": ["registry.ci.svc"]}, "workloads": {"engineFlags": ["--enforce-eager"]}})})
    assert policy.allows_plain_http("registry.ci.svc:5000") and not policy.allows_plain_http("ghcr.io")
    assert policy.refused_engine_args(["--enforce-eager", "--seed", "3"]) == [(1, "--seed")]
    for bad in ({"registries": {"plainHttp": ["http://registry"]}}, {"workloads": {"engineFlags": ["seed"]}},
                {"registries": {"plainHTTP": []}}):
        with pytest.raises(ValueError):  # the operator does not start on it, naming the key
            InstallPolicy.from_env({"QUANTROL_INSTALL_POLICY": json.dumps(bad)})


def test_flag_values_are_not_flags() -> None:
    policy = InstallPolicy()
    assert policy.refused_engine_args(["--gpu-memory-utilization", "0.9", "--swap-space=8"]) == []
    assert policy.refused_engine_args(["--enforce-eager", "--download-dir", "/tmp"]) == [(1, "--download-dir")]


def test_affinity_picks_nodes_like_a_node_selector() -> None:
    obj = policy()
    obj["spec"]["serving"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["h100"]}]}]}}}
    read = read_spec(obj, STRICT, DEFAULT_PROMETHEUS)
    assert "spec.serving.affinity" in [r.field for r in read.refused]
