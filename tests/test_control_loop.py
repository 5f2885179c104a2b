"""The SLO control loop closed for real: operator (kopf run) → router (real process) → engine stand-ins,
scraped by a real Prometheus at 1 s, judged by the operator, which moves the weights through the router's
admin endpoint. The rig (quantrol_dev.rig) says what it plays openly and why; the faults are real: the stand-in
really answers slower, fails, or answers differently, and the router really measures it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantrol_dev.localstack.kubeapi import KubeAPIServer, OperatorProcess, kopf_watches
from quantrol_dev.localstack.procs import free_port, wait_until
from quantrol_dev.localstack.prometheus import PrometheusServer
from quantrol_dev.rig import CANDIDATE, STABLE, Rig, create_policy, load, open_rig, policy_manifest
from quantrol_worker.fleet import Mix, Prompt

pytestmark = pytest.mark.stack


@pytest.fixture
def rig(kubeapi: KubeAPIServer, kubeconfig: Path, namespace: str, prometheus: PrometheusServer,
        tmp_path: Path) -> Iterator[Rig]:
    with open_rig(kubeapi, kubeconfig, namespace, prometheus, tmp_path) as opened:
        yield opened


@pytest.fixture
def two_router_rig(kubeapi: KubeAPIServer, kubeconfig: Path, namespace: str, prometheus: PrometheusServer,
                   tmp_path: Path) -> Iterator[Rig]:
    with open_rig(kubeapi, kubeconfig, namespace, prometheus, tmp_path, router_replicas=2) as opened:
        yield opened


def test_a_healthy_candidate_with_noisy_latency_is_promoted(rig: Rig, prometheus: PrometheusServer,
                                                          kubeapi: KubeAPIServer) -> None:
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.012)
    with load(rig):
        create_policy(rig, policy_manifest(rig.policy, rig.namespace, prometheus.url))
        rig.wait_phase("Shadow", timeout=30)
        status = rig.wait_phase("Promoted", "RolledBack", "Paused", timeout=90)
    assert status["phase"] == "Promoted", json.dumps(status.get("lastAnalysis"), indent=1)
    assert status["stableArtifact"] == CANDIDATE
    reasons = [h["reason"] for h in status["history"]]
    assert reasons == ["QualificationSkipped", "ShadowPassed", "StepPassed", "Promoted"]
    weights = rig.router_weights()  # the promoted artifact now serves as stable, confirmed by the router
    assert weights["stable"] == 100.0 and weights.get("candidate", 0.0) == 0.0
    # Steady state: the operator keeps polling every second, and writes nothing at all.
    time.sleep(2)
    quiet_since = time.time()
    time.sleep(5)
    operator = ("quantrol-operator", "kopf/")
    writes = [w for w in kubeapi.writes(since=quiet_since) if w["user_agent"].startswith(operator)]
    reads = [r for r in kubeapi.requests(since=quiet_since) if r.get("namespace") == rig.namespace
             and r["verb"] in ("get", "list") and r["user_agent"].startswith("quantrol-operator")]
    assert writes == [] and len(reads) >= 5, writes
    assert rig.operator_metric("quantrol_rollout_phase", phase="Promoted") == 1.0
    assert rig.operator_metric("quantrol_rollbacks_total") == 0.0
    # Half the load was sampled at temperature 0.8 and a quarter not streamed: quality was judged all the same.
    assert rig.operator_metric("quantrol_analysis_verdicts_total", slo="qualityDelta", verdict="pass") >= 2
    assert rig.operator_metric("quantrol_analysis_verdicts_total", slo="agreement", verdict="pass") >= 2


@pytest.mark.parametrize(
    ("fault", "slo", "cause"),
    [
        # A slower engine shows first in time to first token and goodput; ITL p99 sits near its bucket edge; with
        # admission bounded at what the engine can run, the queue builds in the router, where queueTimeP99 sees it.
        ({"token_latency_s": 0.4}, {"ttftP99", "interTokenLatencyP99", "goodput", "queueTimeP99"}, "scheduling"),
        ({"error_rate": 0.5}, {"errorRate"}, "scheduling"),
        # Sampled or greedy, the teacher-forced comparison sees the damage; goodput's quality term too.
        ({"deviation": 0.6}, {"agreement", "qualityDelta"}, "precision"),
        # The candidate's batch budget too small for the load the stable arm carries: its engine queues.
        ({"max_num_seqs": 1, "token_latency_s": 0.05}, {"ttftP99", "engineQueueTimeP99", "interTokenLatencyP99",
                                                        "preemptionRate", "kvCacheUsage", "queueTimeP99",
                                                        "errorRate"}, "scheduling"),
    ],
    ids=["latency", "errors", "quality", "batch-budget"],
)
def test_an_injected_fault_rolls_back_to_stable(rig: Rig, prometheus: PrometheusServer, fault: dict[str, float],
                                               slo: set[str], cause: str, kubeconfig: Path) -> None:
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.01)
    with load(rig):
        # The fault lands during the 50% step, which dwells long enough for an 8 s window to see it: at 100%
        # nothing is left to compare with, so a fault that arrives only then is judged on absolute limits alone.
        create_policy(rig, policy_manifest(rig.policy, rig.namespace, prometheus.url, first_dwell=25, successStreak=3))
        rig.wait_phase("Canary", timeout=60)
        rig.behave("candidate", **fault)
        status = rig.wait_phase("RolledBack", "Promoted", "Paused", timeout=60)
        assert status["phase"] == "RolledBack", status.get("lastAnalysis")
        record = status["rollback"]
        assert record["reason"] == "SloBreach"
        failing = {m["slo"] for m in status["lastAnalysis"]["metrics"] if m["verdict"] == "fail"}
        assert failing and failing <= slo | {"goodput"}, json.dumps(status["lastAnalysis"], indent=1)
        assert record["slo"] in slo | {"goodput"} and set(record["failingSlos"]) == failing
        assert record["cause"] == cause and status["lastAnalysis"]["cause"] == cause
        assert rig.operator_metric("quantrol_analysis_causes_total", cause=cause) >= 1
        assert rig.operator_metric("quantrol_rollbacks_total", reason="SloBreach") == 1.0
        # All live traffic is back on stable, confirmed by the router itself, while requests keep flowing.
        wait_until(lambda: rig.router_weights().get("candidate", 0.0) == 0.0, timeout=5, what="candidate weight 0")
    # Confirmed by the router pod itself (usually already in the RolledBack write; a slow answer, at the next pass).
    wait_until(lambda: _confirmed(rig, 1, status["router"]["version"]), timeout=10, what="the rollback confirmed")
    # The status view a human reads at 3 a.m. names the rollback, the SLO and how to retry.
    view = subprocess.run([sys.executable, "-m", "quantrol_operator.cli", "status", f"sp/{rig.policy}", "-n",
                           rig.namespace, "--kubeconfig", str(kubeconfig)], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert "RolledBack" in view and f"on {record['slo']}" in view and "quantrol.io/retry" in view



def test_a_regression_in_one_slice_rolls_back_naming_it_while_the_aggregate_passes(
        rig: Rig, prometheus: PrometheusServer) -> None:
    """One request in eight has a long prompt (over 256 characters: the router's `len_le_1024` bucket) holding the
    word the stand-in deviates on; the candidate is damaged there alone, little enough that the aggregate passes."""
    prompts = [Prompt(("long context " * 30 + f"marker {i % 7}") if i % 8 == 0 else f"request {i % 50}")
               for i in range(56)]
    mix = Mix(unstreamed_every=0)  # half sampled, all streamed

    rig.behave("candidate", deviation=0.3, deviation_when="marker")
    with load(rig, rps=40, prompts=prompts, mix=mix):
        # Ten comparisons at least: in a window of five, long prompts could be most of them by chance, and the
        # aggregate would then rightly fail too. While the slice has fewer, its figures so far hold the window.
        create_policy(rig, policy_manifest(rig.policy, rig.namespace, prometheus.url, minSampleCount=10,
                                           inconclusiveLimit=30))
        status = rig.wait_phase("RolledBack", "Promoted", "Paused", timeout=90)
    assert status["phase"] == "RolledBack", status.get("lastAnalysis")
    record = status["rollback"]
    assert record.get("slice") == "len_le_1024" and record["slo"] in ("qualityDelta", "agreement"), (
        record, status.get("lastAnalysis"))
    assert record["cause"] == "precision"
    rows = status["lastAnalysis"]["metrics"]
    overall = {m["slo"]: m["verdict"] for m in rows if not m.get("slice") and m["slo"] in ("qualityDelta",
                                                                                           "agreement")}
    failing_slices = {m["slice"] for m in rows if m.get("slice") and m["verdict"] == "fail"}
    assert overall == {"qualityDelta": "pass", "agreement": "pass"} and failing_slices == {"len_le_1024"}, rows


def test_overload_on_both_arms_holds_then_steps_back_never_forward(rig: Rig, prometheus: PrometheusServer) -> None:
    for arm in ("stable", "candidate"):
        rig.behave(arm, token_latency_s=0.01)
    with load(rig, seconds=120):
        # Goodput is judged relative to the stable arm: with both arms saturated it says nothing (the mirrored
        # share makes the candidate's a little worse), so this policy leaves it out.
        create_policy(rig, policy_manifest(rig.policy, rig.namespace, prometheus.url, first_dwell=60,
                                           slos={"goodput": None}, overloadHoldSeconds=6, successStreak=3,
                                           failureLimit=4))
        rig.wait_phase("Canary", timeout=60)
        # Both engines now saturate at the load they carry, the stable arm first and deepest: the candidate must not
        # cross a limit the stable arm has not crossed yet (that is a scheduling problem of the candidate's, which
        # the batch-budget case covers). Changed together, the candidate's queue could fill first: it also serves
        # the mirrored share, and on a busy machine one burst decides which queue times out first (CI saw it).
        rig.behave("stable", max_num_seqs=1, token_latency_s=0.1)
        wait_until(lambda: _stable_value(rig, "queueTimeP99") > 1.0, timeout=30, interval=0.5,
                   what="the stable arm queueing beyond the queue limit (1 s)")
        rig.behave("candidate", max_num_seqs=1, token_latency_s=0.06)
        try:
            wait_until(lambda: any(h["reason"] == "OverloadStepBack" for h in rig.status()["history"]), timeout=90,
                       interval=0.5, what="a step back after the overload hold")
        except TimeoutError as exc:
            status = rig.status()
            raise AssertionError(f"history {status.get('history')}; rollback {status.get('rollback')}; router "
                                 f"failures {rig.router_failures()}") from exc
        status = rig.status()
    back = next(h for h in status["history"] if h["reason"] == "OverloadStepBack")
    assert (back["from"], back["to"]) == ("Canary", "Shadow"), back  # from the first step: back to shadow
    assert "rollback" not in status and status["phase"] in ("Shadow", "Canary")
    assert rig.operator_metric("quantrol_analysis_causes_total", cause="overload") >= 2


def _stable_value(rig: Rig, slo: str) -> float:
    """The stable arm's figure for `slo` in the last analysis window (0 when it has none yet)."""
    rows = (rig.status().get("lastAnalysis") or {}).get("metrics") or []
    return next((float(m.get("stableValue") or 0.0) for m in rows if m["slo"] == slo and not m.get("slice")), 0.0)


def test_a_breach_during_the_promotion_guard_returns_traffic_to_the_previous_stable(
        rig: Rig, prometheus: PrometheusServer) -> None:
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.01)
    with load(rig, seconds=120):
        create_policy(rig, policy_manifest(rig.policy, rig.namespace, prometheus.url, grace=120))
        status = rig.wait_phase("Promoted", "RolledBack", "Paused", timeout=90)
        assert status["phase"] == "Promoted" and status["guardUntil"], status.get("lastAnalysis")
        # Guarded: the promoted artifact serves everything; the previous stable arm is still there to go back to.
        assert rig.router_weights() == {"stable": 0.0, "candidate": 100.0}
        rig.behave("candidate", error_rate=0.5)  # the promoted artifact's engine
        status = rig.wait_phase("RolledBack", timeout=30)
        wait_until(lambda: rig.router_weights().get("stable") == 100.0, timeout=10, what="traffic back on stable")
    assert status["stableArtifact"] == STABLE and status["rollback"]["candidateArtifact"] == CANDIDATE
    assert status["rollback"]["reason"] == "SloBreach" and status["rollback"]["slo"] == "errorRate"
    assert status["history"][-1]["from"] == "Promoted"


def test_a_rollback_reaches_every_router_replica_within_seconds(two_router_rig: Rig,
                                                                prometheus: PrometheusServer) -> None:
    """routerReplicas 2: the operator pushes to each router pod, not through the Service (which would reach one);
    appliedVersion moves only once both pods confirmed, and a hung pod holds it back without stalling the loop."""
    rig = two_router_rig
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.01)
    with load(rig):
        create_policy(rig, policy_manifest(rig.policy, rig.namespace, prometheus.url, first_dwell=25, successStreak=3,
                             router_replicas=2))
        rig.wait_phase("Canary", timeout=60)
        # Both pods run the canary split, each told directly: their config files never change in this rig.
        wait_until(lambda: [rig.router_config(i)[1] for i in (0, 1)] == [{"stable": 50, "candidate": 50}] * 2,
                   timeout=10, what="the 50% split on both router pods")
        wait_until(lambda: _confirmed(rig, 2), timeout=10, what="both router pods confirmed in status")
        rig.behave("candidate", error_rate=0.5)
        status = rig.wait_phase("RolledBack", "Promoted", "Paused", timeout=60)
        seen = time.monotonic()
        assert status["phase"] == "RolledBack", status.get("lastAnalysis")
        # The rollback is on every replica within seconds (a kubelet ConfigMap sync would take a minute or more,
        # and this rig's router files never change): normally already when the status says RolledBack, as the pass
        # pushes before it writes status; the bound leaves room for a push retried at the next pass.
        wait_until(lambda: all(rig.router_config(i) == (status["router"]["version"], {"stable": 100})
                               for i in (0, 1)), timeout=10, interval=0.1, what="100% stable on both router pods")
        assert time.monotonic() - seen < 10
        assert all(rig.router_weights(i).get("candidate", 0.0) == 0.0 for i in (0, 1))
    wait_until(lambda: _confirmed(rig, 2, status["router"]["version"]), timeout=10,
               what="the rollback confirmed by both router pods in status")

    # A hung replica: the next config (a retry puts the candidate back in) reaches the other pod at once, and
    # appliedVersion stays on the version both hold until the hung one answers too.
    rolled_back = status["router"]["version"]
    rig.freeze(1)
    try:
        rig.patch_policy({"metadata": {"annotations": {"quantrol.io/retry": "1"}}})
        wait_until(lambda: rig.status()["router"]["version"] > rolled_back
                   and rig.status()["router"].get("replicas") == {"confirmed": 1, "total": 2},
                   timeout=20, interval=0.2, what="a new router config, confirmed by one pod of two")
        time.sleep(3)  # a few passes, each pushing again to the hung pod (bounded by the push timeout)
        held = rig.status()["router"]
        assert held["appliedVersion"] == rolled_back and held["replicas"] == {"confirmed": 1, "total": 2}, held
        assert rig.router_config(0)[0] >= held["version"]  # the retry may have moved on since
    finally:
        rig.thaw(1)
    wait_until(lambda: _confirmed(rig, 2), timeout=20, interval=0.2, what="both pods confirmed the new config")
    latest = rig.status()["router"]["version"]
    assert latest > rolled_back and all(rig.router_config(i)[0] >= latest for i in (0, 1))


def _confirmed(rig: Rig, replicas: int, version: int | None = None) -> bool:
    """Whether status says every router pod confirmed the current config version (`version`, when given)."""
    state = rig.status()["router"]
    return (state.get("appliedVersion") == state["version"] and version in (None, state["version"])
            and state.get("replicas") == {"confirmed": replicas, "total": replicas})


def test_no_traffic_pauses_and_never_promotes(rig: Rig, prometheus: PrometheusServer) -> None:
    create_policy(rig, policy_manifest(rig.policy, rig.namespace, prometheus.url))
    status = rig.wait_phase("Paused", "Canary", "Promoted", timeout=60)
    assert status["phase"] == "Paused" and status["history"][-1]["reason"] == "AnalysisCannotJudge"
    assert status["lastAnalysis"]["verdict"] == "inconclusive"


def test_prometheus_down_pauses_with_the_stable_arm_untouched(rig: Rig) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with load(rig, seconds=40):
        create_policy(rig, policy_manifest(rig.policy, rig.namespace, dead))
        status = rig.wait_phase("Paused", "Canary", "Promoted", "RolledBack", timeout=60)
    assert status["phase"] == "Paused" and status["lastAnalysis"]["verdict"] == "error"
    assert status["weights"]["stable"] == 100 and "rollback" not in status


def test_an_operator_restart_one_failure_below_the_limit_resumes_the_count(
        rig: Rig, prometheus: PrometheusServer, kubeapi: KubeAPIServer) -> None:
    """Streak counters live in status: a restarted operator resumes them instead of granting a fresh budget."""
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.01)
    with load(rig):
        create_policy(rig, policy_manifest(rig.policy, rig.namespace, prometheus.url, failureLimit=4, intervalSeconds=2,
                             successStreak=3))
        rig.wait_phase("Canary", timeout=60)
        rig.behave("candidate", error_rate=0.5)
        wait_until(lambda: (rig.status().get("counters") or {}).get("consecutiveFailures") == 3, timeout=30,
                   interval=0.1, what="three failing windows, one below the limit")
        assert rig.operator is not None
        old = rig.operator
        # A crash, mid-rollout: after SIGTERM kopf may finish in-flight passes for seconds, and one of them could
        # count the fourth window before the process is gone, which would test the shutdown, not the resume.
        old.kill()
        assert rig.status()["phase"] == "Canary"
        began = time.time()
        rig.operator = OperatorProcess(old.kubeconfig, old.workdir.with_name("operator-restarted"), env=old.env)
        rig.operator.start(ready=lambda: kopf_watches(kubeapi, began, ("servingpolicies",)))
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = rig.status()
            seen.append((status.get("counters") or {}).get("consecutiveFailures"))
            if status["phase"] == "RolledBack":
                break
            time.sleep(0.1)
    assert status["phase"] == "RolledBack", status
    # Never counted again from zero: every observation after the restart is 3 (or 0 once rolled back).
    assert all(v in (3, 0, None) for v in seen), seen
    assert status["rollback"]["reason"] == "SloBreach" and status["rollback"]["slo"] == "errorRate"
