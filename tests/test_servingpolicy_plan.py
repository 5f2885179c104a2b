"""The ServingPolicy planner as a pure function: children, router config, phases, rollback record."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from quantrol_operator.api.servingpolicy import KernelReport, SloLimit, Verdict
from quantrol_operator.children import serving
from quantrol_operator.kube import merge_patch
from quantrol_operator.planning.servingpolicy import Images, SpObserved, SpPlan, plan, read_spec
from quantrol_operator.rollout.analysis import Sample, TargetHealth
from quantrol_operator.rollout.queries import Observation
from quantrol_worker.contracts import (
    ArmQualification,
    ArmRole,
    GoldenSlice,
    QualificationConfig,
    QualificationReason,
    QualificationReport,
    Regime,
    RegimeFigures,
)

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
CANDIDATE = "oci://registry.example.com/models/llama-w4a16@sha256:" + "c" * 64
IMAGES = Images("serve:test", "router:test", "tools:test")


def policy(status: dict[str, Any] | None = None, annotations: dict[str, str] | None = None,
           **spec: Any) -> dict[str, Any]:
    obj = yaml.safe_load((ROOT / "e2e/samples/servingpolicy-llama-8b.yaml").read_text())
    obj["metadata"].update(uid="uid-sp", generation=1, annotations=annotations or {})
    obj["spec"]["rollout"]["shadow"]["durationSeconds"] = 60
    obj["spec"]["rollout"]["canarySteps"] = [{"weight": w, "minDwellSeconds": 60} for w in (5, 25, 50, 100)]
    obj["spec"]["analysis"]["successStreak"] = 2
    obj["spec"].update(spec)
    obj["status"] = status or {}
    return obj


def qm(phase: str = "Ready", reason: str = "Succeeded", name: str = "llama-3-1-8b-w4a16") -> dict[str, Any]:
    return {"metadata": {"name": name, "generation": 1},
            "status": {"phase": phase, "observedGeneration": 1,
                       "artifact": {"ref": CANDIDATE.removeprefix("oci://")} if phase == "Ready" else {},
                       "conditions": [{"type": "QualityQualified", "status": "True" if phase == "Ready" else "False",
                                       "reason": reason},
                                      {"type": "Ready", "status": "True" if phase == "Ready" else "False",
                                       "reason": reason}],
                       "message": "W8A16 has no kernel on cpu-x86"}}


def ready(deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in deployments:
        d = copy.deepcopy(d)
        n = d["spec"]["replicas"]
        d["metadata"]["generation"] = 1
        d["status"] = {"observedGeneration": 1, "replicas": n, "readyReplicas": n, "updatedReplicas": n}
        out.append(d)
    return out


def deployments(p: SpPlan) -> list[dict[str, Any]]:
    return [o for o in p.apply if o["kind"] == "Deployment"]


# Router samples that the sample policy's ttftP99 SLO (max 1.5 s, ≤ 1.2 × stable; 50 requests) judges as each verdict.
_JUDGED_AS = {Verdict.PASS: (1.0, 1.0), Verdict.FAIL: (3.1, 1.0), Verdict.OVERLOAD: (3.1, 3.0),
              Verdict.INCONCLUSIVE: (None, 1.0)}


def window(verdict: Verdict, newest: datetime, value: float | None = None) -> Observation:
    """One observed window whose only SLO, ttftP99, the planner will judge `verdict` (the candidate's p99 `value`)."""
    candidate, stable = _JUDGED_AS[verdict]
    sample = Sample("ttftP99", value if value is not None else candidate, stable, 100, 100, newest=newest)
    limit = SloLimit(max=1.5, max_relative_to_stable=1.2)
    return Observation([(sample, limit)], newest, TargetHealth(1, 1))


def run(obj: dict[str, Any], candidate_kernels: dict[str, Any] | None = None, **kw: Any) -> SpPlan:
    kernels = KernelReport.model_validate(candidate_kernels) if candidate_kernels else None
    return plan(SpObserved(obj=obj, spec=read_spec(obj), candidate_kernels=kernels, **kw), IMAGES)


def advance(obj: dict[str, Any], result: SpPlan) -> dict[str, Any]:
    """What the next pass reads: the same object with the status just written."""
    nxt = copy.deepcopy(obj)
    nxt["status"] = result.status
    return nxt


def test_waits_for_a_qualified_candidate_while_the_stable_arm_serves() -> None:
    result = run(policy(), quantized_model=qm("Calibrating"), now=T0)
    assert result.status["phase"] == "Pending" and "candidateArtifact" not in result.status
    assert "not Ready and qualified" in result.status["message"]
    names = [d["metadata"]["name"] for d in deployments(result)]
    assert names == [serving.arm_name("llama-3-1-8b", policy()["spec"]["baseline"]["artifact"]), "llama-3-1-8b-router"]
    router_cm = next(o for o in result.apply if o["kind"] == "ConfigMap")
    config = json.loads(router_cm["data"]["router.yaml"])
    assert set(config["arms"]) == {"stable"} and config["arms"]["stable"]["weight"] == 100


def test_arm_deployment_carries_the_batch_budget_and_fetches_by_digest() -> None:
    result = run(policy(), quantized_model=qm(), now=T0)
    candidate = next(d for d in deployments(result) if d["metadata"]["name"].endswith("cccccccccccc"))
    pod = candidate["spec"]["template"]["spec"]
    args = pod["containers"][0]["command"]
    assert args[args.index("--max-num-seqs") + 1] == "64" and args[args.index("--max-num-batched-tokens") + 1] == "8192"
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch")
    assert fetch["command"][:4] == ["quantrol-worker", "fetch", "--ref", CANDIDATE]
    assert candidate["metadata"]["ownerReferences"][0]["uid"] == "uid-sp"
    assert result.status["candidateArtifact"] == CANDIDATE and result.status["candidateShortDigest"] == "c" * 12


def test_a_steady_state_pass_changes_nothing() -> None:
    first = run(policy(), quantized_model=qm(), now=T0)
    again = run(advance(policy(), first), quantized_model=qm(), now=T0 + timedelta(seconds=5))
    assert merge_patch(first.status, again.status) == {} and again.router_config is None and again.events == []


KERNELS = {"verdict": "native", "kernels": ["MarlinLinearKernel"], "message": ""}


def _to_qualifying(**spec: Any) -> tuple[dict[str, Any], SpPlan]:
    obj = policy(**spec)
    first = run(obj, quantized_model=qm(), now=T0)
    qualifying = run(advance(obj, first), quantized_model=qm(), deployments=ready(deployments(first)),
                     candidate_kernels=KERNELS, now=T0 + timedelta(seconds=5))
    return advance(obj, qualifying), qualifying


def report(reason: QualificationReason = QualificationReason.QUALIFIED, message: str = "qualified",
           **fields: Any) -> QualificationReport:
    floor = RegimeFigures(regime=Regime.FLOOR, passed=True, ttft_p50_seconds=0.1, ttft_p99_seconds=0.2, requests=8)
    arms = [ArmQualification(arm=ArmRole.CANDIDATE, regimes=[floor]), ArmQualification(arm=ArmRole.STABLE)]
    return QualificationReport(reason=reason, message=message, tool="guidellm 0.8.1", arms=arms, **fields)


def finished(obj: dict[str, Any], qualifying: SpPlan, result: QualificationReport | None, now: datetime,
             job_status: dict[str, Any] | None = None) -> SpPlan:
    """A pass that finds the qualification Job ended (the Job controller's and kubelet's part, played here)."""
    job = {"metadata": {"name": obj["status"]["qualification"]["jobName"]}, "status": job_status or {}}
    terminated = {"exitCode": 0 if result else 1, "message": result.to_message() if result else "Traceback: boom"}
    pod = {"metadata": {"creationTimestamp": "2026-11-23T12:00:05Z"},
           "status": {"containerStatuses": [{"name": "qualify", "state": {"terminated": terminated}}]}}
    return run(obj, quantized_model=qm(), deployments=ready(deployments(qualifying)), candidate_kernels=KERNELS,
               qualification_job=job, qualification_pods=[pod], now=now)


def _to_shadow() -> tuple[dict[str, Any], SpPlan]:
    obj, qualifying = _to_qualifying()
    shadow = finished(obj, qualifying, report(), T0 + timedelta(seconds=10))
    return advance(obj, shadow), shadow


def test_ready_arms_with_verified_kernels_are_qualified_before_any_traffic() -> None:
    _obj, qualifying = _to_qualifying()
    assert qualifying.status["phase"] == "Qualifying"
    router_cm = next(o for o in qualifying.apply if o["kind"] == "ConfigMap" and "router.yaml" in o.get("data", {}))
    config = json.loads(router_cm["data"]["router.yaml"])
    assert config["arms"]["candidate"]["weight"] == 0 and config["mirror_fraction"] == 0  # no traffic, not mirrored
    q = qualifying.status["qualification"]
    assert q["state"] == "Running" and q["attempt"] == 1 and q["candidateArtifact"] == CANDIDATE
    job = next(o for o in qualifying.apply if o["kind"] == "Job")
    assert job["metadata"]["name"] == q["jobName"] == "llama-3-1-8b-qualify-cccccccc-1"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:2] == ["quantrol-worker", "qualify"] and pod["restartPolicy"] == "Never"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]} and pod["securityContext"]["runAsNonRoot"]
    cm = next(o for o in qualifying.apply if o["kind"] == "ConfigMap" and o["metadata"]["name"] == q["jobName"])
    config = QualificationConfig.model_validate_json(cm["data"]["config.json"])
    assert [a.arm for a in config.arms] == [ArmRole.CANDIDATE, ArmRole.STABLE]
    assert config.arms[0].url == f"http://{serving.arm_name('llama-3-1-8b', CANDIDATE)}.llm-serving.svc:8000"
    assert (config.limits.ttft_seconds, config.limits.itl_seconds) == (1.5, 0.08)  # the policy's SLOs
    assert config.admission.max_in_flight == 128 and config.prompts_artifact == CANDIDATE
    assert job["spec"]["activeDeadlineSeconds"] >= 2 * config.regimes.seconds_per_rate * config.regimes.sweep_rates


def test_a_passed_qualification_goes_to_shadow_with_mirroring_and_keeps_its_figures() -> None:
    _obj, shadow = _to_shadow()
    assert shadow.status["phase"] == "Shadow"
    config = json.loads(shadow.router_config or "{}")
    assert config["mirror_fraction"] == 0.1 and config["arms"]["candidate"]["weight"] == 0
    assert config["version"] == 2  # bumped because the content changed (mirroring starts)
    assert shadow.status["history"][-1]["reason"] == "Qualified"
    q = shadow.status["qualification"]
    assert q["state"] == "Passed" and q["tool"] == "guidellm 0.8.1"
    assert q["arms"][0]["regimes"][0] == {"regime": "floor", "passed": True, "failed": [], "requests": 8,
                                          "ttftP50Seconds": 0.1, "ttftP99Seconds": 0.2}
    assert {c["type"]: c["status"] for c in shadow.status["conditions"]}["Qualified"] == "True"
    assert not any(o["kind"] == "Job" for o in shadow.apply), "a finished Job is not applied again"


def test_a_golden_output_mismatch_is_refused_naming_the_slice() -> None:
    obj, qualifying = _to_qualifying()
    golden = [GoldenSlice(slice="code", passed=False, mean_kl=0.9, reference_mean_kl=0.01,
                          failed=["meanKl: 0.9 > 0.01 + 0.05"]), GoldenSlice(slice="prose", passed=True)]
    result = finished(obj, qualifying, report(QualificationReason.GOLDEN_OUTPUT_MISMATCH,
                                              "the candidate engine does not reproduce calibration's quality on "
                                              "slice code (meanKl: 0.9 > 0.01 + 0.05)", golden=golden),
                      T0 + timedelta(seconds=10))
    assert result.status["phase"] == "RolledBack"
    record = result.status["rollback"]
    assert record["reason"] == "GoldenOutputMismatch" and record["failingSlos"] == ["golden/code"]
    assert "slice code" in record["message"] and record["candidateArtifact"] == CANDIDATE
    assert result.status["qualification"]["state"] == "Refused"
    candidate = next(d for d in deployments(result) if d["metadata"]["name"].endswith("cccccccccccc"))
    assert candidate["spec"]["replicas"] == 0
    assert set(json.loads(result.router_config or "{}")["arms"]) == {"stable"}


def test_a_candidate_over_its_latency_slo_one_request_at_a_time_is_refused() -> None:
    obj, qualifying = _to_qualifying()
    slow = report(QualificationReason.QUALIFICATION_FAILED,
                  "regime floor (one request at a time): ttftP99: 7.2 s > 1.5 s")
    slow.arms[0].regimes[0] = RegimeFigures(regime=Regime.FLOOR, passed=False, ttft_p99_seconds=7.2,
                                            failed=["ttftP99: 7.2 s > 1.5 s"])
    result = finished(obj, qualifying, slow, T0 + timedelta(seconds=10))
    assert result.status["phase"] == "RolledBack"
    record = result.status["rollback"]
    assert record["reason"] == "QualificationFailed" and record["slo"] == "candidate/floor"
    assert "ttftP99" in record["message"] and "floor" in record["message"]


def test_a_qualification_job_without_a_report_holds_and_a_retry_measures_again() -> None:
    obj, qualifying = _to_qualifying()
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}
    result = finished(obj, qualifying, None, T0 + timedelta(seconds=10), job_status=failed)
    assert result.status["phase"] == "Paused" and result.status["history"][-1]["reason"] == "QualificationIncomplete"
    q = result.status["qualification"]
    assert q["state"] == "Error" and "Traceback" in q["message"]
    obj = advance(obj, result)
    obj["metadata"]["annotations"] = {"quantrol.io/retry": "1"}
    pending = run(obj, quantized_model=qm(), deployments=ready(deployments(qualifying)), candidate_kernels=KERNELS,
                  now=T0 + timedelta(seconds=20))
    again = run(advance(obj, pending), quantized_model=qm(), deployments=ready(deployments(qualifying)),
                candidate_kernels=KERNELS, now=T0 + timedelta(seconds=25))
    assert again.status["phase"] == "Qualifying" and again.status["qualification"]["attempt"] == 2
    assert any(o["kind"] == "Job" and o["metadata"]["name"].endswith("-2") for o in again.apply)


def test_qualification_may_be_skipped_and_status_says_so() -> None:
    _obj, result = _to_qualifying(qualification={"enabled": False})
    assert result.status["phase"] == "Shadow" and result.status["history"][-1]["reason"] == "QualificationSkipped"
    assert result.status["qualification"]["state"] == "Skipped"
    assert "unmeasured" in result.status["qualification"]["message"]
    assert not any(o["kind"] == "Job" for o in result.apply)


def test_slo_failures_up_to_the_limit_roll_back_with_a_record() -> None:
    obj, shadow = _to_shadow()
    deps = ready(deployments(shadow))
    now = T0 + timedelta(seconds=20)
    result = shadow
    for i in range(3):
        now += timedelta(seconds=5)
        result = run(obj, quantized_model=qm(), deployments=deps, window=window(Verdict.FAIL, now, value=3.1),
                     candidate_kernels={"verdict": "native"}, now=now)
        obj = advance(obj, result)
        assert result.status["phase"] == ("RolledBack" if i == 2 else "Shadow")
    record = result.status["rollback"]
    assert record["reason"] == "SloBreach" and record["slo"] == "ttftP99" and record["candidateValue"] == 3.1
    assert record["failingSlos"] == ["ttftP99"]
    assert result.rollback is not None and result.rollback.to_wire() == record
    config = json.loads(result.router_config or "{}")
    assert set(config["arms"]) == {"stable"}  # all live traffic on stable at once
    candidate = next(d for d in deployments(result) if d["metadata"]["name"].endswith("cccccccccccc"))
    assert candidate["spec"]["replicas"] == 0  # scaled down, kept as evidence


def test_passing_windows_walk_the_steps_to_promotion_and_swap_the_stable_arm() -> None:
    obj, shadow = _to_shadow()
    deps = ready(deployments(shadow))
    now = T0 + timedelta(seconds=10)
    phases = []
    for _ in range(40):
        now += timedelta(seconds=31)
        result = run(obj, quantized_model=qm(), deployments=deps, window=window(Verdict.PASS, now),
                     candidate_kernels={"verdict": "native"}, now=now)
        obj = advance(obj, result)
        phases.append((result.status["phase"], result.status.get("step")))
        if result.status["phase"] == "Promoted":
            break
    seen = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    assert seen == [("Shadow", None), ("Canary", 0), ("Canary", 1), ("Canary", 2), ("Canary", 3), ("Promoted", None)]
    status = obj["status"]
    assert status["stableArtifact"] == CANDIDATE and status["rollbackTarget"].startswith("oci://registry.example.com")
    assert status["weights"] == {"stable": 100, "candidate": 0, "mirrorFraction": 0.0}


def test_passing_windows_that_overlap_the_previous_step_do_not_advance() -> None:
    obj, shadow = _to_shadow()
    began = _parse_time(shadow.status["phaseSince"])
    for i in range(1, 5):  # until 60 s after Shadow began, the window (60 s) still reaches into Pending
        now = began + timedelta(seconds=12 * i)
        result = run(obj, quantized_model=qm(), deployments=ready(deployments(shadow)),
                     candidate_kernels={"verdict": "native"}, window=window(Verdict.PASS, now), now=now)
        assert result.status["phase"] == "Shadow" and result.status["counters"]["consecutiveSuccesses"] == 0, i
        obj = advance(obj, result)
    for i in range(1, 3):
        now = began + timedelta(seconds=60 + 5 * i)
        result = run(obj, quantized_model=qm(), deployments=ready(deployments(shadow)),
                     candidate_kernels={"verdict": "native"}, window=window(Verdict.PASS, now), now=now)
        obj = advance(obj, result)
    assert result.status["phase"] == "Canary"  # two whole windows after Shadow began: the streak of 2


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_a_candidate_without_a_kernel_is_refused_before_it_takes_traffic() -> None:
    result = run(policy(), quantized_model=qm("Rejected", "KernelIncompatible"), now=T0)
    assert result.status["phase"] == "RolledBack"
    assert result.status["rollback"]["reason"] == "KernelUnavailable"
    # The record says why, in the QuantizedModel's words: what a person needs to pick another scheme.
    assert "W8A16 has no kernel on cpu-x86" in result.status["rollback"]["message"]
    assert not deployments(result) or all(CANDIDATE not in json.dumps(d) for d in deployments(result))


def test_a_spec_edit_after_a_rollback_starts_again_without_a_retry_annotation() -> None:
    """Git says something new (here: another candidate, refused before it has a digest): judged again."""
    obj, _shadow = _to_shadow()
    obj["metadata"]["annotations"] = {"quantrol.io/rollback": "oncall-1"}
    obj = advance(obj, run(obj, quantized_model=qm(), now=T0 + timedelta(seconds=30)))
    assert obj["status"]["phase"] == "RolledBack"
    assert run(obj, quantized_model=qm(), now=T0 + timedelta(seconds=40)).status["phase"] == "RolledBack"
    obj["metadata"]["generation"] = 2  # the API server's answer to a spec edit
    obj["spec"]["candidate"]["quantizedModelRef"]["name"] = "llama-3-1-8b-w8a16"
    w8a16 = qm("Rejected", "KernelIncompatible", name="llama-3-1-8b-w8a16")
    restarted = run(obj, quantized_model=w8a16, now=T0 + timedelta(seconds=50))
    assert restarted.status["phase"] == "Pending" and restarted.status["history"][-1]["reason"] == "SpecChanged"
    refused = run(advance(obj, restarted), quantized_model=w8a16, now=T0 + timedelta(seconds=51))
    assert refused.status["phase"] == "RolledBack" and refused.status["rollback"]["reason"] == "KernelUnavailable"
    assert "candidateArtifact" not in refused.status["rollback"]  # not the previous candidate's digest
    assert refused.status.get("candidateArtifact") is None
    settled = run(advance(advance(obj, restarted), refused), quantized_model=w8a16, now=T0 + timedelta(seconds=60))
    assert settled.status["phase"] == "RolledBack" and settled.status == refused.status  # no loop


def test_a_fallback_kernel_is_refused_under_enforce() -> None:
    obj = policy()
    first = run(obj, quantized_model=qm(), now=T0)
    result = run(advance(obj, first), quantized_model=qm(), deployments=ready(deployments(first)),
                 candidate_kernels={"verdict": "fallback", "message": "FP8 weight-only Marlin fallback"}, now=T0)
    assert result.status["phase"] == "RolledBack" and result.status["rollback"]["reason"] == "KernelFallback"
    assert "Marlin" in result.status["rollback"]["message"]


def test_rolled_back_stays_until_the_retry_annotation_and_records_it() -> None:
    obj, _shadow = _to_shadow()
    obj["metadata"]["annotations"] = {"quantrol.io/rollback": "oncall-1"}
    rolled = run(obj, quantized_model=qm(), now=T0 + timedelta(seconds=30))
    assert rolled.status["phase"] == "RolledBack" and rolled.status["rollback"]["reason"] == "Manual"
    obj = advance(obj, rolled)
    again = run(obj, quantized_model=qm(), now=T0 + timedelta(seconds=60))
    assert again.status["phase"] == "RolledBack"
    obj["metadata"]["annotations"]["quantrol.io/retry"] = "1"
    retried = run(obj, quantized_model=qm(), now=T0 + timedelta(seconds=90))
    assert retried.status["phase"] == "Pending"
    assert retried.status["handledAnnotations"] == {"rollback": "oncall-1", "retry": "1"}


def test_an_invalid_spec_changes_nothing_that_serves() -> None:
    obj, _shadow = _to_shadow()
    obj["spec"]["rollout"]["canarySteps"] = [{"weight": 50}, {"weight": 25}]
    result = run(obj, now=T0 + timedelta(seconds=30))
    assert result.apply == [] and result.router_config is None
    assert result.status["phase"] == "Shadow" and "strictly increasing" in result.status["message"]
    assert result.events[0].reason == "InvalidSpec"


def test_a_tag_instead_of_a_digest_is_refused() -> None:
    obj = policy(candidate={"artifact": "oci://registry.example.com/models/llama:latest"})
    result = run(obj, now=T0)
    assert result.apply == [] and "pinned by digest" in result.status["message"]


def test_a_new_candidate_digest_mid_rollout_withdraws_the_current_one() -> None:
    obj, shadow = _to_shadow()
    newer = "oci://registry.example.com/models/llama-w4a16@sha256:" + "d" * 64
    obj["spec"]["candidate"] = {"artifact": newer}
    result = run(obj, deployments=ready(deployments(shadow)), now=T0 + timedelta(seconds=30))
    withdrawn = serving.arm_name("llama-3-1-8b", CANDIDATE)
    assert {(d["kind"], d["name"]) for d in result.delete} == {("Deployment", withdrawn), ("Service", withdrawn)}
    assert result.status["phase"] == "Pending" and result.status["candidateArtifact"] == newer
    assert result.events[0].reason == "NewCandidate"
    config = json.loads(result.router_config or "{}")
    assert config["arms"]["candidate"]["weight"] == 0 and config["mirror_fraction"] == 0.0


def _promoted() -> tuple[dict[str, Any], list[dict[str, Any]], datetime]:
    obj, shadow = _to_shadow()
    deps = ready(deployments(shadow))
    now = T0 + timedelta(seconds=10)
    for _ in range(40):
        now += timedelta(seconds=31)
        result = run(obj, quantized_model=qm(), deployments=deps, window=window(Verdict.PASS, now),
                     candidate_kernels={"verdict": "native"}, now=now)
        obj = advance(obj, result)
        if result.status["phase"] == "Promoted":
            # The pass that promotes already keeps the previous stable arm warm (it was once scaled to zero for
            # that one pass, status.phase still saying Canary, and brought back up at the next).
            previous = serving.arm_name("llama-3-1-8b", result.status["rollbackTarget"])
            replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in deployments(result)}
            assert replicas[previous] == obj["spec"]["serving"]["replicas"], replicas
            return obj, ready(deployments(result)), now
    raise AssertionError("never promoted")


def test_a_promotion_is_guarded_and_a_breach_returns_traffic_to_the_warm_previous_stable() -> None:
    obj, deps, promoted_at = _promoted()
    status = obj["status"]
    previous = status["rollbackTarget"]
    grace = obj["spec"]["rollout"]["promotionGraceSeconds"]
    assert _parse_time(status["guardUntil"]) == promoted_at + timedelta(seconds=grace)
    now = promoted_at
    for i in range(3):  # the failure limit
        now += timedelta(seconds=5)
        result = run(obj, quantized_model=qm(), deployments=deps, window=window(Verdict.FAIL, now, value=3.1), now=now)
        obj = advance(obj, result)
        if i < 2:
            # Guarded: the promoted arm takes all live traffic as the router's `candidate`; the previous stable arm
            # stays warm as `stable` with none, so the analysis goes on on the same series.
            assert result.status["phase"] == "Promoted" and result.status["counters"]["consecutiveFailures"] == i + 1
            arms = {d["metadata"]["name"]: d["spec"]["replicas"] for d in deployments(result)}
            assert arms[serving.arm_name("llama-3-1-8b", previous)] == obj["spec"]["serving"]["replicas"]
            config = json.loads(next(o for o in result.apply if o["kind"] == "ConfigMap")["data"]["router.yaml"])
            assert {a: c["weight"] for a, c in config["arms"].items()} == {"stable": 0, "candidate": 100}
            promoted_arm = serving.arm_name("llama-3-1-8b", CANDIDATE)
            assert config["arms"]["candidate"]["url"].startswith(f"http://{promoted_arm}.")
    assert result.status["phase"] == "RolledBack" and result.status["stableArtifact"] == previous
    assert result.status["rollback"]["reason"] == "SloBreach" and result.status["rollback"]["cause"] == "scheduling"
    assert result.status["rollback"]["candidateArtifact"] == CANDIDATE
    config = json.loads(result.router_config or "{}")
    assert set(config["arms"]) == {"stable"} and config["arms"]["stable"]["url"].startswith(
        f"http://{serving.arm_name('llama-3-1-8b', previous)}.")


def test_the_rollback_annotation_during_the_guard_returns_traffic_and_after_it_does_nothing() -> None:
    obj, deps, promoted_at = _promoted()
    previous = obj["status"]["rollbackTarget"]
    rolled = copy.deepcopy(obj)
    rolled["metadata"]["annotations"] = {"quantrol.io/rollback": "1"}
    result = run(rolled, quantized_model=qm(), deployments=deps, now=promoted_at + timedelta(seconds=5))
    assert result.status["phase"] == "RolledBack" and result.status["stableArtifact"] == previous
    # The guard's time is up: recorded once, the previous arm scaled down, and a rollback no longer applies.
    grace = obj["spec"]["rollout"]["promotionGraceSeconds"]
    later = promoted_at + timedelta(seconds=grace + 1)
    result = run(obj, quantized_model=qm(), deployments=deps, now=later)
    assert result.status["history"][-1]["reason"] == "GuardPassed" and "guardUntil" not in result.status
    arms = {d["metadata"]["name"]: d["spec"]["replicas"] for d in deployments(result)}
    assert arms[serving.arm_name("llama-3-1-8b", previous)] == 0
    obj = advance(obj, result)
    obj["metadata"]["annotations"] = {"quantrol.io/rollback": "2"}
    after = run(obj, quantized_model=qm(), deployments=deps, now=later + timedelta(seconds=5))
    assert after.status["phase"] == "Promoted" and after.status["stableArtifact"] == CANDIDATE


def test_the_router_gets_deadlines_from_the_latency_slos_and_admission_split_across_its_replicas() -> None:
    obj = policy(routerReplicas=3)
    obj["spec"]["serving"].pop("admission", None)
    obj["spec"]["serving"]["replicas"] = 2
    config = json.loads(next(o for o in run(obj, quantized_model=qm(), now=T0).apply
                             if o["kind"] == "ConfigMap")["data"]["router.yaml"])
    assert config["goodput_deadlines"] == [{"name": "interactive", "ttft_s": 1.5, "tpot_s": 0.08}]
    # No more in flight than the engines can run (maxNumSeqs 64 × 2 replicas), a third per router replica.
    assert config["arms"]["stable"]["admission"]["max_in_flight"] == 43


def test_probes_take_the_artifacts_prompts_and_status_says_when_quality_rests_on_live_comparison_alone() -> None:
    obj, shadow = _to_shadow()
    config = json.loads(next(o for o in shadow.apply if o["kind"] == "ConfigMap")["data"]["router.yaml"])
    # The router logs in as the arms' fetch step does: the QuantizedModel's registry Secret, mounted.
    assert config["probes"] == {"artifact": CANDIDATE, "insecure": False, "directory": None, "rate_per_second": 0.5,
                                "max_tokens": 16, "registry_config": "/etc/quantrol/registry/config.json"}
    router_pod = next(o for o in shadow.apply if o["kind"] == "Deployment" and o["metadata"]["name"].endswith(
        "router"))["spec"]["template"]["spec"]
    assert {"name": "registry-credentials", "mountPath": "/etc/quantrol/registry", "readOnly": True} in \
        router_pod["containers"][0]["volumeMounts"]
    assert shadow.status["probes"]["source"] == "artifact"
    conditions = {c["type"]: c for c in shadow.status["conditions"]}
    assert conditions["QualityProbes"]["status"] == "Unknown"  # until the routers report what they hold
    now = T0 + timedelta(seconds=30)
    deps = ready(deployments(shadow))
    for counts, status, reason in (({}, "False", "NoProbePrompts"), ({"code": 4.0}, "True", "ProbePrompts")):
        observed = window(Verdict.PASS, now)
        observed = Observation(observed.samples, observed.newest, observed.targets, probe_prompts=counts)
        result = run(obj, quantized_model=qm(), deployments=deps, window=observed, now=now)
        condition = next(c for c in result.status["conditions"] if c["type"] == "QualityProbes")
        assert (condition["status"], condition["reason"]) == (status, reason), condition
        assert ("live comparison alone" in condition["message"]) == (not counts)
    # A ConfigMap named instead: mounted (optional: a missing one never stops the router), read from there.
    named = policy(rollout={**obj["spec"]["rollout"], "probes": {"configMapRef": {"name": "probe-prompts"}}})
    result = run(named, quantized_model=qm(), now=T0)
    router_pod = next(d for d in deployments(result) if d["metadata"]["name"].endswith("-router"))["spec"]["template"]
    assert {"name": "probes", "configMap": {"name": "probe-prompts", "optional": True}} in router_pod["spec"]["volumes"]
    assert result.status["probes"]["source"] == "configMap"


def test_each_arm_keeps_what_its_engine_reported_once_read() -> None:
    """Issue 19 item 6: the serving-side envelope sits with each arm in status.arms (settings as built, the engine's
    own report once it started); later passes, which no longer read the launchers, keep it."""
    from quantrol_operator.api.servingpolicy import EngineReport

    obj, shadow = _to_shadow()
    stable = obj["spec"]["baseline"]["artifact"]
    read = {stable: EngineReport(version="0.32.0", device="cpu", image="sha256:abc", flags=["--max-num-seqs", "64"],
                                 settings={"dtype": "bf16"}),
            CANDIDATE: EngineReport(version="0.32.0", device="cuda", image="sha256:def")}
    now = T0 + timedelta(seconds=30)
    result = run(obj, quantized_model=qm(), deployments=ready(deployments(shadow)), engine_reports=read, now=now)
    arms = {a["artifact"]: a for a in result.status["arms"]}
    assert arms[stable]["engine"]["device"] == "cpu" and arms[stable]["engine"]["settings"] == {"dtype": "bf16"}
    assert arms[CANDIDATE]["engine"]["device"] == "cuda" and arms[CANDIDATE]["shortDigest"] == "c" * 12
    again = run(advance(obj, result), quantized_model=qm(), deployments=ready(deployments(shadow)),
                now=now + timedelta(seconds=5))
    assert again.status["arms"] == result.status["arms"]
    unread = run(obj, quantized_model=qm(), deployments=ready(deployments(shadow)), now=now)
    assert all("engine" not in a for a in unread.status["arms"])  # nothing is claimed before an engine reported


def test_a_name_no_service_can_carry_creates_nothing_and_says_why() -> None:
    """A policy admitted before the CRD carried the name rule: its router Service could not exist on a real server,
    so nothing is created and status names the field (instead of every pass failing with a 422 on the Service)."""
    obj = policy()
    obj["metadata"]["name"] = "llama-3.1-8b"
    result = run(obj, now=T0)
    assert result.apply == [] and result.router_config is None
    assert result.status["message"].startswith("metadata.name must be a DNS-1035 label")
    assert result.events[0].reason == "InvalidSpec"
