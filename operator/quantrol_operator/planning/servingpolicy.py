"""ServingPolicy: from spec, status, the arms' state, the candidate's kernels and the SLO analysis to the
children, the router config and the next status. Pure: the handler gathers the facts and applies the plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from quantrol_operator.api.common import ConditionStatus, is_digest_pinned
from quantrol_operator.api.servingpolicy import (
    NO_JUDGEMENT_ADVICE,
    NoJudgement,
    ServingPolicySpec,
    ServingPolicyStatus,
)
from quantrol_operator.api.servingpolicy import RolloutPhase as P
from quantrol_operator.children import monitoring, router, serving
from quantrol_operator.conditions import iso, set_condition
from quantrol_operator.planning import Event, Plan
from quantrol_operator.rollout.analysis import Counters, Judgement, decide, window_verdict
from quantrol_operator.rollout.statemachine import Decision, Facts, Reason, step, weights_for
from quantrol_operator.rollout.statemachine import Weights as StepWeights
from quantrol_operator.validation import field_error
from quantrol_worker.contracts import KernelVerdict
from quantrol_worker.router.config import dump_config

ANNOTATION_PAUSED = "quantrol.io/paused"
ANNOTATION_RETRY = "quantrol.io/retry"
ANNOTATION_ROLLBACK = "quantrol.io/rollback"
HISTORY_LIMIT = 20
CANDIDATE_PHASES = {P.PENDING, P.SHADOW, P.CANARY, P.PAUSED}


@dataclass(frozen=True)
class Window:
    """One analysis window, already judged per SLO by the analysis module."""

    judgements: list[Judgement]
    newest: datetime | None
    seconds: int
    no_judgement: NoJudgement | None = None  # why it judged nothing, when it did not


@dataclass(frozen=True)
class SpObserved:
    obj: dict[str, Any]
    quantized_model: dict[str, Any] | None = None
    deployments: list[dict[str, Any]] = field(default_factory=list)  # owned: arms and router
    candidate_kernels: dict[str, Any] | None = None  # the launcher's report: verdict, kernels, message
    candidate_failed: str | None = None  # why the candidate arm cannot run (e.g. fetch refused the digest)
    window: Window | None = None  # None: no analysis this pass (not in Shadow/Canary, or not due)
    router_token: str = ""
    now: datetime = field(default_factory=datetime.now)


@dataclass
class SpPlan(Plan):
    router_config: str | None = None  # the config document to push to the routers' admin endpoint
    rollback: dict[str, Any] | None = None


def _desired_candidate(observed: SpObserved, spec: ServingPolicySpec) -> tuple[str | None, str, KernelVerdict | None]:
    """(digest-pinned candidate or None, why not, a kernel refusal decided before serving)."""
    if spec.candidate.artifact is not None:
        return spec.candidate.artifact, "", None
    ref = spec.candidate.quantized_model_ref
    assert ref is not None
    qm = observed.quantized_model
    if qm is None:
        return None, f"QuantizedModel {ref.name} not found in this namespace", None
    status = qm.get("status") or {}
    ready = {c["type"]: c for c in status.get("conditions", [])}
    if status.get("observedGeneration") != qm["metadata"].get("generation"):
        return None, f"QuantizedModel {ref.name} is being calibrated for its latest spec", None
    if status.get("phase") == "Rejected" and ready.get("Ready", {}).get("reason") == "KernelIncompatible":
        return None, f"QuantizedModel {ref.name}: {status.get('message', 'no kernel')}", KernelVerdict.NONE
    qualified = ready.get("QualityQualified", {}).get("status") == "True"
    artifact = (status.get("artifact") or {}).get("ref")
    if status.get("phase") != "Ready" or not qualified or not artifact:
        return None, f"QuantizedModel {ref.name} is {status.get('phase', 'Pending')}, not Ready and qualified", None
    return f"oci://{artifact}", "", None


def _arm_ready(deployments: list[dict[str, Any]], policy: str, ref: str | None) -> bool:
    """Ready means the current template is rolled out: observedGeneration and updatedReplicas, not readyReplicas."""
    if ref is None:
        return False
    name = serving.arm_name(policy, ref)
    d = next((d for d in deployments if d["metadata"]["name"] == name), None)
    if d is None:
        return False
    want = d["spec"].get("replicas", 1)
    st = d.get("status") or {}
    return bool(
        want > 0 and st.get("observedGeneration", 0) >= d["metadata"].get("generation", 1)
        and st.get("updatedReplicas", 0) >= want and st.get("readyReplicas", 0) >= want
    )


def _kernel(report: dict[str, Any] | None) -> KernelVerdict:
    verdict = (report or {}).get("verdict", "unknown")
    return KernelVerdict(verdict) if verdict in KernelVerdict._value2member_map_ else KernelVerdict.UNKNOWN


def plan(observed: SpObserved, images: tuple[str, str], pod_monitor_labels: Mapping[str, str] | None = None) -> SpPlan:
    """`images`: (serving image, router image) defaults of this installation. `pod_monitor_labels`: None where this
    installation writes no PodMonitor (QUANTROL_POD_MONITORS), else the extra labels its PodMonitors carry."""
    obj, now = observed.obj, observed.now
    meta = obj["metadata"]
    policy, generation = meta["name"], int(meta.get("generation", 1))
    before = dict(obj.get("status") or {})
    status = {k: v for k, v in before.items() if v is not None}
    status["observedGeneration"] = generation
    result = SpPlan()
    try:
        spec = ServingPolicySpec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        errors = "; ".join(f"spec.{e}" for e in map(field_error, exc.errors()))
        # Nothing is deleted or re-weighted: whatever serves keeps serving until the spec is fixed.
        return _invalid(result, status, before, now, generation, f"the spec is invalid, nothing changed: {errors}")
    if spec.candidate.artifact is not None and not is_digest_pinned(spec.candidate.artifact):
        return _invalid(result, status, before, now, generation,
                        "spec.candidate.artifact must be pinned by digest (oci://repo@sha256:…): a tag can move")

    stable = status.get("stableArtifact") or spec.baseline.artifact
    status.setdefault("stableArtifact", stable)
    phase = P(status.get("phase", P.PENDING.value))
    index: int | None = status.get("step")
    desired, why_not, refused = _desired_candidate(observed, spec)
    pinned: str | None = status.get("candidateArtifact")
    if desired is not None and desired != stable and pinned != desired and (pinned is None or phase is P.PENDING):
        # Nothing serves the old pin yet: re-pin without a transition (its arm is withdrawn below).
        if pinned is not None:
            message = f"candidate changed before it took traffic: now {serving.short_digest(desired)}"
            result.events.append(Event("Normal", Reason.NEW_CANDIDATE.value, message))
        pinned = desired
    handled = dict(status.get("handledAnnotations") or {})
    annotations = meta.get("annotations") or {}
    retry, rollback = annotations.get(ANNOTATION_RETRY), annotations.get(ANNOTATION_ROLLBACK)
    counters = _read_counters(status.get("counters") or {})
    decision = Decision.HOLD
    started = _parse(status.get("phaseSince"))
    if observed.window is not None and phase in (P.SHADOW, P.CANARY):
        verdict = window_verdict(observed.window.judgements)
        after_step = started is None or now - timedelta(seconds=observed.window.seconds) >= started
        decision, counters = decide(verdict, observed.window.newest, counters, spec.analysis, after_step)
        status["lastAnalysis"] = {
            "time": iso(now), "windowSeconds": observed.window.seconds, "verdict": verdict.value,
            "noJudgement": observed.window.no_judgement.value if observed.window.no_judgement else None,
            "metrics": [{k: v for k, v in {"slo": j.slo, "value": j.candidate, "stableValue": j.stable,
                                           "limit": j.limit, "verdict": j.verdict.value, "message": j.message}.items()
                         if v is not None} for j in observed.window.judgements],
        }
    kernel = refused or _kernel(observed.candidate_kernels)
    if observed.candidate_kernels:
        status["candidateKernels"] = observed.candidate_kernels
    since = started or now
    facts = Facts(
        now=now, phase_since=since, steps=tuple(s.weight for s in spec.rollout.canary_steps),
        shadow_seconds=spec.rollout.shadow.duration_seconds,
        dwell_seconds=tuple(s.min_dwell_seconds for s in spec.rollout.canary_steps),
        candidate_pinned=pinned is not None, stable_ready=_arm_ready(observed.deployments, policy, stable),
        candidate_ready=_arm_ready(observed.deployments, policy, pinned),
        candidate_failed=observed.candidate_failed is not None, kernel=kernel,
        enforce_kernels=spec.kernel_policy.value == "enforce", decision=decision,
        paused_annotation=annotations.get(ANNOTATION_PAUSED, "").lower() in ("true", "1", "yes"),
        paused_from=P(status["pausedFrom"]) if status.get("pausedFrom") else None,
        paused_by_user=bool(status.get("pausedFrom")),
        retry_requested=retry is not None and retry != handled.get("retry"),
        rollback_requested=rollback is not None and rollback != handled.get("rollback"),
        new_candidate=desired is not None and pinned is not None and desired != pinned and desired != stable,
        spec_changed=before.get("observedGeneration") is not None and int(before["observedGeneration"]) < generation,
    )
    moved = step(phase, index, facts)
    if moved.reason is not None:
        doc = moved.doc
        why = observed.window.no_judgement if observed.window else None
        if moved.reason is Reason.ANALYSIS_CANNOT_JUDGE and why is not None:
            doc = f"{doc}; {why.value}: {NO_JUDGEMENT_ADVICE[why]}"
        _transition(result, status, phase, moved.phase, moved.step, moved.reason, doc, facts, now)
        handled.update({k: v for k, v in (("retry", retry), ("rollback", rollback)) if v is not None})
        if moved.reason is Reason.PROMOTED and pinned:
            status["rollbackTarget"], status["stableArtifact"] = stable, pinned
            stable = pinned
        if moved.reason in (Reason.NEW_CANDIDATE, Reason.RETRY, Reason.SPEC_CHANGED):
            pinned = desired  # None when the new candidate has no digest (refused, or still calibrating)
        if moved.phase is P.ROLLED_BACK:
            result.rollback = _rollback_record(moved.reason, status.get("lastAnalysis"), observed, pinned, now,
                                               refused_by=why_not if refused else "")
            status["rollback"] = result.rollback
        counters = Counters()
        phase, index = moved.phase, moved.step
    status["handledAnnotations"] = handled
    status["counters"] = _write_counters(counters)
    status["candidateArtifact"] = pinned
    if pinned is None and phase is P.PENDING:
        status["message"] = f"waiting for a candidate: {why_not}"
    weights = weights_for(phase, index, facts.steps, spec.rollout.shadow.mirror_fraction,
                          held=_held(status.get("weights")))
    _children(result, obj, spec, images, stable, pinned, phase, status, weights, now, observed.router_token)
    if pod_monitor_labels is not None:
        result.apply.append(monitoring.pod_monitor(obj, spec, pod_monitor_labels))
    _withdraw_stale_arms(result, observed.deployments)
    _status_fields(status, phase, index, stable, pinned, weights, facts, before, now, generation)
    result.status = _as_declared(status)
    return result


def _as_declared(status: dict[str, Any]) -> dict[str, Any]:
    """The status through its model: what the API server would keep after pruning, so re-reads compare equal."""
    return ServingPolicyStatus.model_validate({k: v for k, v in status.items() if v is not None}).to_wire()


_COUNTER_KEYS = {"failures": "consecutiveFailures", "successes": "consecutiveSuccesses",
                 "inconclusive": "consecutiveInconclusive", "errors": "consecutiveErrors"}


def _read_counters(stored: dict[str, Any]) -> Counters:
    values = {attr: int(stored.get(key, 0)) for attr, key in _COUNTER_KEYS.items()}
    return Counters(**values, newest=_parse(stored.get("newestSampleTime")))


def _write_counters(counters: Counters) -> dict[str, Any]:
    out: dict[str, Any] = {key: getattr(counters, attr) for attr, key in _COUNTER_KEYS.items()}
    if counters.newest is not None:
        out["newestSampleTime"] = iso(counters.newest)
    return out


def _invalid(result: SpPlan, status: dict[str, Any], before: dict[str, Any], now: datetime, generation: int,
             message: str) -> SpPlan:
    status["message"] = message
    status["conditions"] = set_condition(list(status.get("conditions", [])), "Progressing", ConditionStatus.FALSE,
                                         "InvalidSpec", message, now=now, generation=generation)
    if before.get("message") != message:
        result.events.append(Event("Warning", "InvalidSpec", message))
    result.status = _as_declared(status)
    return result


def _transition(result: SpPlan, status: dict[str, Any], src: P, dst: P, step_index: int | None, reason: Reason,
                doc: str, facts: Facts, now: datetime) -> None:
    where = f"{dst.value}" + (f" step {step_index} ({facts.steps[step_index]}%)" if step_index is not None else "")
    message = f"{src.value} → {where}: {doc}"
    history = list(status.get("history", []))[-(HISTORY_LIMIT - 1):]
    entry: dict[str, Any] = {"time": iso(now), "from": src.value, "to": dst.value, "reason": reason.value,
                             "message": message}
    if step_index is not None:
        entry["step"] = step_index
    status["history"] = [*history, entry]
    status["phaseSince"] = iso(now)
    status["pausedFrom"] = src.value if reason is Reason.PAUSED_BY_USER else None
    warn = dst in (P.ROLLED_BACK, P.PAUSED, P.FAILED)
    result.events.append(Event("Warning" if warn else "Normal", reason.value, message))


def _rollback_record(reason: Reason, analysis: dict[str, Any] | None, observed: SpObserved, candidate: str | None,
                     now: datetime, refused_by: str = "") -> dict[str, Any]:
    """`refused_by`: why the candidate was refused before it had a digest (its QuantizedModel's kernel pre-check)."""
    mapping = {Reason.SLO_BREACH: "SloBreach", Reason.MANUAL_ROLLBACK: "Manual",
               Reason.KERNEL_UNAVAILABLE: "KernelUnavailable", Reason.KERNEL_FALLBACK: "KernelFallback",
               Reason.CANDIDATE_FAILED: "CandidateFailed"}
    record: dict[str, Any] = {"reason": mapping.get(reason, "Manual"), "time": iso(now),
                              "candidateArtifact": candidate}
    failing = [m for m in (analysis or {}).get("metrics", []) if m.get("verdict") == "fail"]
    if reason is Reason.SLO_BREACH and failing:
        worst = failing[0]
        record.update(slo=worst["slo"], failingSlos=[m["slo"] for m in failing],
                      candidateValue=worst.get("value"), stableValue=worst.get("stableValue"),
                      limit=worst.get("limit"), windowSeconds=(analysis or {}).get("windowSeconds"),
                      message=worst.get("message", ""))
    elif reason in (Reason.KERNEL_UNAVAILABLE, Reason.KERNEL_FALLBACK):
        record["message"] = ((observed.candidate_kernels or {}).get("message", "") or refused_by
                             or "refused by the kernel check")
    elif reason is Reason.CANDIDATE_FAILED:
        record["message"] = observed.candidate_failed or ""
    return {k: v for k, v in record.items() if v is not None}


def _held(weights: dict[str, Any] | None) -> StepWeights | None:
    if not weights:
        return None
    return StepWeights(int(weights.get("stable", 100)), int(weights.get("candidate", 0)),
                       float(weights.get("mirrorFraction", 0.0)))


def _children(result: SpPlan, obj: dict[str, Any], spec: ServingPolicySpec, images: tuple[str, str], stable: str,
              candidate: str | None, phase: P, status: dict[str, Any], weights: StepWeights, now: datetime,
              token: str) -> None:
    meta = obj["metadata"]
    policy, namespace = meta["name"], meta["namespace"]
    serving_image, router_image = images
    replicas = spec.serving.replicas
    result.apply.append(serving.arm_deployment(obj, spec, stable, serving_image, replicas))
    result.apply.append(serving.arm_service(obj, stable))
    candidate_live = candidate is not None and candidate != stable and phase in CANDIDATE_PHASES
    if candidate is not None and candidate != stable:
        # A rolled-back candidate is scaled to zero, not deleted: its Deployment stays as evidence.
        result.apply.append(serving.arm_deployment(obj, spec, candidate, serving_image,
                                                   replicas if candidate_live else 0))
        result.apply.append(serving.arm_service(obj, candidate))
    target = status.get("rollbackTarget")
    if target and target not in (stable, candidate):
        since = _parse(status.get("phaseSince")) or now
        grace_over = now - since >= timedelta(seconds=spec.rollout.promotion_grace_seconds)
        result.apply.append(serving.arm_deployment(obj, spec, target, serving_image, 0 if grace_over else replicas))
    config = router.router_config(policy, namespace, spec, stable, candidate if candidate_live else None,
                                  weights.stable if candidate_live else 100, weights.candidate if candidate_live else 0,
                                  weights.mirror_fraction, version=0)
    # The version moves only when the content does, so routers and status agree on what "newer" means.
    digest = hashlib.sha256(dump_config(config).encode()).hexdigest()[:16]
    state = dict(status.get("router") or {})
    changed = state.get("configHash") != digest
    if changed:
        state.update(version=int(state.get("version", 0)) + 1, configHash=digest)
    config = config.model_copy(update={"version": int(state["version"])})
    if changed:
        result.router_config = dump_config(config)
    status["router"] = state
    result.apply.append(router.router_config_map(obj, config))
    result.apply.append(router.router_deployment(obj, spec, router_image))
    result.apply.append(router.router_service(obj))
    if token:
        result.apply.append(router.admin_secret(obj, token))


def _withdraw_stale_arms(result: SpPlan, deployments: list[dict[str, Any]]) -> None:
    """Arms of candidates that are no longer stable, candidate nor rollback target are removed with their Service."""
    keep = {o["metadata"]["name"] for o in result.apply if o["kind"] == "Deployment"}
    for d in deployments:
        meta = d["metadata"]
        if serving.LABEL_ARM in (meta.get("labels") or {}) and meta["name"] not in keep:
            for kind, api_version in (("Deployment", "apps/v1"), ("Service", "v1")):
                result.delete.append({"apiVersion": api_version, "kind": kind, "namespace": meta["namespace"],
                                      "name": meta["name"]})


def _status_fields(status: dict[str, Any], phase: P, index: int | None, stable: str, candidate: str | None,
                   weights: StepWeights, facts: Facts, before: dict[str, Any], now: datetime, generation: int) -> None:
    status["phase"] = phase.value
    status["step"] = index
    status["weights"] = {"stable": weights.stable, "candidate": weights.candidate,
                         "mirrorFraction": weights.mirror_fraction}
    status["stableShortDigest"] = serving.short_digest(stable)
    status["candidateShortDigest"] = serving.short_digest(candidate) if candidate else None
    status.setdefault("phaseSince", iso(now))
    if "message" not in status or before.get("phase") != phase.value:
        # Before the conditions, which quote it: a condition one pass behind would be one more write.
        history = status.get("history") or []
        status["message"] = history[-1]["message"] if history else status.get("message", phase.value)
    conditions = list(status.get("conditions", []))

    def cond(type_: str, ok: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, ok, reason, message, now=now, generation=generation)

    cond("StableReady", facts.stable_ready, "ArmReady" if facts.stable_ready else "ArmNotReady",
         f"stable arm {serving.short_digest(stable)}")
    cond("CandidateReady", facts.candidate_ready, "ArmReady" if facts.candidate_ready else "ArmNotReady",
         f"candidate arm {serving.short_digest(candidate)}" if candidate else "no candidate pinned")
    cond("Progressing", phase in (P.PENDING, P.SHADOW, P.CANARY), phase.value, status.get("message") or phase.value)
    cond("Promoted", phase is P.PROMOTED, phase.value, f"stable is {serving.short_digest(stable)}")
    paused_reason, paused_message = _paused(phase, status)
    cond("Paused", phase is P.PAUSED, paused_reason, paused_message)
    rollback = status.get("rollback") or {}
    cond("RolledBack", phase is P.ROLLED_BACK, rollback.get("reason", "NotRolledBack") if phase is P.ROLLED_BACK
         else "NotRolledBack", rollback.get("message", "") if phase is P.ROLLED_BACK else "")
    status["conditions"] = conditions


def _paused(phase: P, status: dict[str, Any]) -> tuple[str, str]:
    """The Paused condition's (reason, message): a user's hold, or why the analysis could not judge (NoJudgement,
    from the window that paused it), so an alert can tell "nothing scraped" from "nobody sends traffic"."""
    if phase is not P.PAUSED:
        return "NotPaused", ""
    if status.get("pausedFrom"):
        return Reason.PAUSED_BY_USER.value, "the quantrol.io/paused annotation holds the current weights"
    why = str((status.get("lastAnalysis") or {}).get("noJudgement"))
    if why in NoJudgement._value2member_map_:
        return why, f"{why}: {NO_JUDGEMENT_ADVICE[NoJudgement(why)]}"
    return Reason.ANALYSIS_CANNOT_JUDGE.value, status.get("message") or "the analysis could not judge"


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
