"""ServingPolicy: from spec, status, the arms' state, the candidate's kernels and one analysis window to the children,
the router config and the next status. Pure: the handler observes the facts and applies the plan.

Status is built as the typed API model (`ServingPolicyStatus`) and written as its wire form, so every key and every
limit (history length, enum values) comes from `api/servingpolicy.py`, the same source as the CRD.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pydantic import ValidationError

from quantrol_operator.api.common import GPU_RESOURCE, NAME_RULE, ConditionStatus, name_fits_children
from quantrol_operator.api.servingpolicy import (
    HISTORY_LIMIT,
    NO_JUDGEMENT_ADVICE,
    AnalysisCounters,
    AnalysisRun,
    ArmStatus,
    DeletionPolicy,
    EngineReport,
    HandledAnnotations,
    KernelReport,
    KvCacheDtype,
    ProbeSource,
    ProbeStatus,
    QualificationState,
    QualificationStatus,
    RollbackReason,
    RollbackRecord,
    RouterState,
    ServingPolicySpec,
    ServingPolicyStatus,
    TrafficProvider,
    Transition,
    Verdict,
    Weights,
)
from quantrol_operator.api.servingpolicy import RolloutPhase as P
from quantrol_operator.children import monitoring, qualification, router, serving
from quantrol_operator.children.serving import ServingContext
from quantrol_operator.conditions import set_condition
from quantrol_operator.planning import Event, Plan
from quantrol_operator.planning import qualification as qualifying
from quantrol_operator.planning.slices import probe_source, quality_plan, with_counts
from quantrol_operator.policy import InstallPolicy, Refusal, pod_refusals
from quantrol_operator.rollout.analysis import (
    bounded,
    decide,
    judge,
    no_judgement,
    saturated_together,
    window_cause,
    window_verdict,
)
from quantrol_operator.rollout.queries import Observation, custom_query_refusal
from quantrol_operator.rollout.statemachine import Decision, Facts, Qualified, TransitionReason, step, weights_for
from quantrol_operator.validation import field_error
from quantrol_worker.contracts import KernelVerdict
from quantrol_worker.router.config import MAX_BODY_BYTES, CompareConfig, RouterConfig, SliceRule, dump_config

REFUSED_BY_INSTALL_POLICY = "RefusedByInstallPolicy"  # a condition reason and Event: the field and the rule follow
ANNOTATION_PAUSED = "quantrol.io/paused"
ANNOTATION_RETRY = "quantrol.io/retry"
ANNOTATION_ROLLBACK = "quantrol.io/rollback"
CANDIDATE_PHASES = {P.PENDING, P.QUALIFYING, P.SHADOW, P.CANARY, P.PAUSED}


@dataclass(frozen=True)
class SpecRead:
    """The spec, validated once per pass (by the observer, before it asks anything of the world), or why not; and
    what of it the install policy refuses (the observer then asks nothing of a refused endpoint)."""

    spec: ServingPolicySpec | None
    error: str = ""
    refused: tuple[Refusal, ...] = ()


def policy_refusals(spec: ServingPolicySpec, namespace: str, policy: InstallPolicy,
                    default_prometheus: str) -> list[Refusal]:
    """What of `spec` the install policy does not allow: the serving and qualification images, node selectors, the
    Prometheus address, and custom SLO queries that would read beyond the policy's namespace."""
    out = pod_refusals("spec.serving", spec.serving, policy.workloads)
    for index, flag in policy.refused_engine_args(list(spec.serving.engine_args)):
        out.append(Refusal(f"spec.serving.engineArgs[{index}]", f"vLLM flag {flag} is not allowed by the install "
                           f"policy (installPolicy.workloads.engineFlags: {', '.join(policy.workloads.engine_flags)})"))
    out += pod_refusals("spec.qualification", spec.qualification, policy.workloads)
    address = spec.analysis.prometheus.address if spec.analysis.prometheus else None
    if address and not policy.prometheus_allowed(address, default_prometheus):
        out.append(Refusal("spec.analysis.prometheus.address", f"{address!r} is not one of the Prometheus "
                           "addresses the install policy allows (installPolicy.prometheus.allowedAddresses)"))
    for index, custom in enumerate(spec.slos.custom):
        why = custom_query_refusal(custom.query, namespace)
        if why:
            out.append(Refusal(f"spec.slos.custom[{index}].query", f"custom SLO {custom.name!r}: {why}"))
    return out


def read_spec(obj: Mapping[str, Any], policy: InstallPolicy | None = None, default_prometheus: str = "") -> SpecRead:
    if not name_fits_children(obj.get("metadata") or {}):  # created before the CRD carried the rule
        return SpecRead(None, f"{NAME_RULE.message}; nothing was created (recreate it under such a name)")
    try:
        spec = ServingPolicySpec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        errors = "; ".join(f"spec.{e}" for e in map(field_error, exc.errors()))
        return SpecRead(None, f"the spec is invalid, nothing changed: {errors}")
    namespace = str((obj.get("metadata") or {}).get("namespace", ""))
    refused = policy_refusals(spec, namespace, policy, default_prometheus) if policy is not None else []
    return SpecRead(spec, refused=tuple(refused))


class Images(NamedTuple):
    """This installation's default images: the engine, the router, and the tools the arms' init steps run."""

    serving: str
    router: str
    tools: str


@dataclass(frozen=True)
class SpObserved:
    obj: dict[str, Any]
    spec: SpecRead
    quantized_model: dict[str, Any] | None = None
    deployments: list[dict[str, Any]] = field(default_factory=list)  # owned: arms and router
    candidate_kernels: KernelReport | None = None  # the launcher's report
    candidate_failed: str | None = None  # why the candidate arm cannot run (e.g. fetch refused the digest)
    window: Observation | None = None  # None: no analysis this pass (not in Shadow/Canary, or not due)
    qualification_job: dict[str, Any] | None = None  # status.qualification.jobName, while Qualifying
    qualification_pods: list[dict[str, Any]] = field(default_factory=list)
    router_token: str = ""
    engine_reports: dict[str, EngineReport] = field(default_factory=dict)  # newly read, by the arm's artifact
    now: datetime = field(default_factory=datetime.now)
    credentials_problem: str | None = None  # why the arms' registry credentials Secret cannot be used yet
    stable_failed: str | None = None  # why the stable arm's fetch step refused to start it


@dataclass
class SpPlan(Plan):
    router_config: str | None = None  # the config document to push to the routers' admin endpoint
    rollback: RollbackRecord | None = None  # set on the pass that rolls back
    analysis: AnalysisRun | None = None  # set on a pass that judged a window


SETTLED = (P.PROMOTED, P.ROLLED_BACK, P.FAILED)


def previous_stable_warm(phase: P, status: ServingPolicyStatus, now: datetime) -> bool:
    """Whether the arm a promotion replaced is still warm as the rollback target, the promotion guarded (analysis
    on): until `guardUntil` (promotionGraceSeconds after the promotion). `phase` is the phase this pass plans, which
    `status.phase` is not yet during the pass that promotes."""
    return (phase is P.PROMOTED and bool(status.rollback_target) and status.guard_until is not None
            and now < status.guard_until)


def settled(obj: Mapping[str, Any]) -> bool:
    """Whether a policy has nothing left for the timer to watch: its spec observed, Promoted (with the previous
    stable arm scaled down), RolledBack or Failed, and every router pod on the last config. What could change that
    arrives as an event (a spec edit, an annotation), which the event handler takes."""
    status = obj.get("status") or {}
    router_state = status.get("router") or {}
    warm = next((c.get("status") == "True" for c in status.get("conditions") or []
                 if c.get("type") == "PreviousStableWarm"), False)
    return (status.get("observedGeneration") == (obj.get("metadata") or {}).get("generation")
            and status.get("phase") in {p.value for p in SETTLED} and not warm
            and router_state.get("appliedVersion") == router_state.get("version"))


def orphaned_on_delete(spec: ServingPolicySpec) -> bool:
    """Whether deleting the policy leaves its arms, router and config serving, without an owner (deletionPolicy)."""
    return spec.deletion_policy is DeletionPolicy.ORPHAN


def credentials_secret(spec: ServingPolicySpec, quantized_model: Mapping[str, Any] | None) -> str | None:
    """The Secret the arms' fetch step logs in with: the spec's, else the candidate QuantizedModel's push Secret."""
    if spec.serving.artifact_credentials_secret_ref is not None:
        return spec.serving.artifact_credentials_secret_ref.name
    ref = ((quantized_model or {}).get("spec") or {}).get("artifact", {}).get("credentialsSecretRef") or {}
    return str(ref["name"]) if isinstance(ref, dict) and ref.get("name") else None


def _quantization(quantized_model: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return ((quantized_model or {}).get("spec") or {}).get("quantization") or {}


def arm_engine(spec: ServingPolicySpec, quantized_model: Mapping[str, Any] | None, ref: str,
               known: ArmStatus | None = None) -> serving.ArmEngine:
    """The engine settings of the arm that serves `ref`. The baseline artifact runs the baseline's (its own
    tensor-parallel size if it says so, else the candidate's; its own KV cache, `auto` by default); every other
    artifact the candidate's: the spec's, else its QuantizedModel's (tensorParallelSize; an fp8 KV cache when its
    scales were calibrated; the size its manifest gave), else what status recorded when its arm was made (a
    promoted artifact keeps its flags after its QuantizedModel moved on)."""
    quantization = _quantization(quantized_model)
    qm_status = (quantized_model or {}).get("status") or {}
    published = (qm_status.get("artifact") or {}).get("ref")
    own = published is not None and f"oci://{published}" == ref
    common = spec.serving.tensor_parallel_size or int(quantization.get("tensorParallelSize") or 1)
    if ref == spec.baseline.artifact:
        return serving.ArmEngine(ref, "baseline", spec.baseline.tensor_parallel_size or common,
                                 spec.baseline.kv_cache_dtype)
    if own:
        kv = KvCacheDtype.FP8 if quantization.get("kvCacheScheme") == "fp8" else KvCacheDtype.AUTO
        tp, size = common, qm_status.get("artifact", {}).get("sizeBytes")
    elif known is not None:
        kv, tp, size = KvCacheDtype(known.kv_cache_dtype), known.tensor_parallel_size, known.size_bytes
    else:
        kv, tp, size = KvCacheDtype.AUTO, common, None
    return serving.ArmEngine(ref, "candidate", spec.serving.tensor_parallel_size or tp,
                             spec.serving.kv_cache_dtype or kv, size)


def _gpus_disagree(spec: ServingPolicySpec, engines: list[serving.ArmEngine]) -> str:
    """Why the spec's GPU limit cannot hold an arm's tensor-parallel size ('' when it can): admission checks the
    sizes the spec states, this the ones it leaves to a QuantizedModel."""
    limit = spec.serving.resources.limits.get(GPU_RESOURCE) if spec.serving.resources else None
    for engine in engines:
        if limit is not None and serving.gpus(spec, engine) and str(limit) != str(engine.tensor_parallel_size):
            return (f"spec.serving.resources.limits['{GPU_RESOURCE}'] is {limit}, but the {engine.settings} arm's "
                    f"tensor-parallel size is {engine.tensor_parallel_size} (one GPU per rank): set "
                    "spec.serving.tensorParallelSize, or leave the GPU count out")
    return ""


def plan(observed: SpObserved, images: Images, pod_monitor_labels: Mapping[str, str] | None = None,
         policy: InstallPolicy | None = None) -> SpPlan:
    """`images`: this installation's default images. `pod_monitor_labels`: None where this installation writes no
    PodMonitor (QUANTROL_POD_MONITORS), else the extra labels its PodMonitors carry. `policy`: what this installation
    lets tenants choose (the routers' request body bound, plain-HTTP registries; its refusals arrive in
    `observed.spec`)."""
    obj = observed.obj
    now = observed.now.replace(microsecond=0)  # the API server keeps times to the second: re-reads compare equal
    meta = obj["metadata"]
    name, generation = meta["name"], int(meta.get("generation", 1))
    install = policy or InstallPolicy()
    before = ServingPolicyStatus.model_validate({k: v for k, v in (obj.get("status") or {}).items() if v is not None})
    status = before.model_copy(deep=True)
    status.observed_generation = generation
    result = SpPlan()
    spec = observed.spec.spec
    if spec is None:
        # Nothing is deleted or re-weighted: whatever serves keeps serving until the spec is fixed.
        return _invalid(result, status, before, now, generation, observed.spec.error)
    if observed.spec.refused:
        return _refused(result, obj, spec, status, before, now, generation, observed.spec.refused)
    arms = _ArmBuilder(obj, spec, observed.quantized_model, before.arms, ServingContext(
        images.serving, images.tools, install, credentials_secret(spec, observed.quantized_model)),
        observed.engine_reports)
    stable = status.stable_artifact or spec.baseline.artifact
    status.stable_artifact = stable
    phase, index = status.phase, status.step
    desired, why_not, refused = _desired_candidate(observed, spec)
    pinned = status.candidate_artifact
    if desired is not None and desired != stable and pinned != desired and (pinned is None or phase is P.PENDING):
        # Nothing serves the old pin yet: re-pin without a transition (its arm is withdrawn below).
        if pinned is not None:
            message = f"candidate changed before it took traffic: now {serving.short_digest(desired)}"
            result.events.append(Event("Normal", TransitionReason.NEW_CANDIDATE.value, message))
        pinned = desired
    gpus = _gpus_disagree(spec, [arms.engine(r) for r in (stable, pinned) if r])
    if gpus:
        return _invalid(result, status, before, now, generation, f"nothing changed: {gpus}")
    annotations = meta.get("annotations") or {}
    retry, rollback = annotations.get(ANNOTATION_RETRY), annotations.get(ANNOTATION_ROLLBACK)
    guarding = phase is P.PROMOTED and status.guard_until is not None and now < status.guard_until
    decision, counters = _analyse(result, status, observed, spec, phase in (P.SHADOW, P.CANARY) or guarding, now)
    qualified = _qualification_result(status, observed, phase, now)
    if observed.candidate_kernels:
        status.candidate_kernels = observed.candidate_kernels
    facts = Facts(
        now=now, phase_since=status.phase_since or now, steps=tuple(s.weight for s in spec.rollout.canary_steps),
        shadow_seconds=spec.rollout.shadow.duration_seconds,
        dwell_seconds=tuple(s.min_dwell_seconds for s in spec.rollout.canary_steps),
        candidate_pinned=pinned is not None, stable_ready=_arm_ready(observed.deployments, name, stable),
        candidate_ready=_arm_ready(observed.deployments, name, pinned),
        candidate_failed=observed.candidate_failed is not None,
        kernel=refused or (observed.candidate_kernels.verdict if observed.candidate_kernels else KernelVerdict.UNKNOWN),
        enforce_kernels=spec.kernel_policy.value == "enforce", decision=decision,
        qualify=spec.qualification.enabled, qualified=qualified,
        paused_annotation=annotations.get(ANNOTATION_PAUSED, "").lower() in ("true", "1", "yes"),
        paused_from=status.paused_from, paused_by_user=status.paused_from is not None,
        retry_requested=retry is not None and retry != status.handled_annotations.retry,
        rollback_requested=rollback is not None and rollback != status.handled_annotations.rollback,
        new_candidate=desired is not None and pinned is not None and desired != pinned and desired != stable,
        spec_changed=before.observed_generation is not None and before.observed_generation < generation,
        guarding=guarding, guard_over=phase is P.PROMOTED and status.guard_until is not None and not guarding,
    )
    moved = step(phase, index, facts)
    if moved.reason is not None:
        doc = moved.doc
        why = status.last_analysis.no_judgement if status.last_analysis else None
        if moved.reason is TransitionReason.ANALYSIS_CANNOT_JUDGE and why is not None:
            doc = f"{doc}; {why.value}: {NO_JUDGEMENT_ADVICE[why]}"
        _transition(result, status, phase, moved.phase, moved.step, moved.reason, doc, facts, now)
        status.handled_annotations = HandledAnnotations(
            retry=retry if retry is not None else status.handled_annotations.retry,
            rollback=rollback if rollback is not None else status.handled_annotations.rollback)
        if moved.reason is TransitionReason.PROMOTED and pinned:
            status.rollback_target, status.stable_artifact = stable, pinned
            stable = pinned
            grace = spec.rollout.promotion_grace_seconds
            status.guard_until = now + timedelta(seconds=grace) if grace else None
        elif phase is P.PROMOTED and moved.phase is P.ROLLED_BACK and status.rollback_target:
            # A breach (or the annotation) during the guard: the previous stable arm, still warm, serves again.
            stable = status.stable_artifact = status.rollback_target
        if moved.phase is not P.PROMOTED or moved.reason is TransitionReason.GUARD_PASSED:
            status.guard_until = None
        if moved.reason in (TransitionReason.NEW_CANDIDATE, TransitionReason.RETRY, TransitionReason.SPEC_CHANGED):
            pinned = desired  # None when the new candidate has no digest (refused, or still calibrating)
        if moved.phase is P.QUALIFYING and pinned is not None and (
                status.qualification is None or status.qualification.state is not QualificationState.RUNNING):
            status.qualification = qualifying.started(spec, pinned, status.qualification, now, name)
        elif moved.reason is TransitionReason.QUALIFICATION_SKIPPED:
            status.qualification = qualifying.skipped(pinned, status.qualification)
        if moved.rollback is not None:
            result.rollback = _rollback_record(moved.rollback, status.last_analysis, observed, pinned, now,
                                               refused_by=why_not if refused else "", qualified=status.qualification)
            status.rollback = result.rollback
        counters = AnalysisCounters()
        phase, index = moved.phase, moved.step
    status.counters = counters
    status.candidate_artifact = pinned
    if pinned is None and phase is P.PENDING:
        status.message = f"waiting for a candidate: {why_not}"
    status.probes = _probes(spec, observed, before)
    weights = weights_for(phase, index, facts.steps, spec.rollout.shadow.mirror_fraction, held=before.weights)
    _children(result, arms, images.router, stable, pinned, phase, status, weights, now, observed.router_token,
              install.router.max_body_bytes)
    status.arms = arms.built
    _qualification_children(result, arms, images.serving, stable, pinned, phase, status)
    if pod_monitor_labels is not None:
        result.apply.append(monitoring.pod_monitor(obj, spec, pod_monitor_labels))
    _withdraw_stale_arms(result, observed.deployments)
    _status_fields(status, phase, index, stable, pinned, weights, facts, before, now, generation)
    _explain_credentials(status, observed.credentials_problem, now, generation)
    _explain_stable_fetch(status, observed.stable_failed, facts.stable_ready, now, generation)
    warm = previous_stable_warm(phase, status, now)
    status.conditions = set_condition(
        status.conditions, "PreviousStableWarm", warm, "GracePeriod" if warm else "NotServing",
        f"the previous stable arm {serving.short_digest(status.rollback_target or '')} is kept warm and the analysis "
        f"goes on until {status.guard_until}: a breach, or the rollback annotation, returns all traffic to it"
        if warm else "no previous stable arm is kept serving", now=now,
        generation=generation)
    result.status = status.to_wire()
    return result


class _ArmBuilder:
    """Builds the arms of one pass (each with its artifact's engine settings) and records each as status shows it."""

    def __init__(self, obj: dict[str, Any], spec: ServingPolicySpec, quantized_model: Mapping[str, Any] | None,
                 known: list[ArmStatus], context: ServingContext, reported: Mapping[str, EngineReport]) -> None:
        """`known`: the arms as status last showed them; `reported`: engine reports read this pass, by artifact."""
        self.obj, self.spec, self.quantized_model, self.context = obj, spec, quantized_model, context
        self.known = {a.artifact: a for a in known}
        self.reported = reported
        self.built: list[ArmStatus] = []

    def engine(self, ref: str) -> serving.ArmEngine:
        return arm_engine(self.spec, self.quantized_model, ref, self.known.get(ref))

    def deployment(self, ref: str, replicas: int) -> dict[str, Any]:
        engine, spec = self.engine(ref), self.spec
        self.built.append(ArmStatus(
            artifact=ref, short_digest=serving.short_digest(ref), settings=engine.settings, replicas=replicas,
            tensor_parallel_size=engine.tensor_parallel_size, gpus=serving.gpus(spec, engine),
            kv_cache_dtype=engine.kv_cache_dtype.value, size_bytes=engine.size_bytes,
            storage=serving.storage_summary(spec, engine),
            engine_args=serving.engine_args(self.obj["metadata"]["name"], spec, engine),
            engine=self.reported.get(ref) or (self.known[ref].engine if ref in self.known else None)))
        return serving.arm_deployment(self.obj, spec, engine, self.context, replicas)


def _explain_stable_fetch(status: ServingPolicyStatus, failed: str | None, ready: bool, now: datetime,
                          generation: int) -> None:
    """A stable arm whose fetch step refused (a 401 from the registry, a digest mismatch, a volume too small) says
    so in StableReady: it never starts, and nothing else would tell why."""
    if failed and not ready:
        current = next(c for c in status.conditions if c.type == "StableReady")
        status.conditions = set_condition(status.conditions, "StableReady", False, "FetchFailed",
                                          f"{current.message}: the artifact fetch refused to start it: {failed}",
                                          now=now, generation=generation)


def _explain_credentials(status: ServingPolicyStatus, problem: str | None, now: datetime, generation: int) -> None:
    """An arm whose fetch step cannot log in says why in its readiness condition (its pods wait on the Secret)."""
    if not problem:
        return
    for condition in ("StableReady", "CandidateReady"):
        current = next((c for c in status.conditions if c.type == condition), None)
        if current is not None and current.status is ConditionStatus.FALSE:
            status.conditions = set_condition(status.conditions, condition, False, "CredentialsMissing",
                                              f"{current.message}: {problem}", now=now, generation=generation)


def _analyse(result: SpPlan, status: ServingPolicyStatus, observed: SpObserved, spec: ServingPolicySpec,
             analysing: bool, now: datetime) -> tuple[Decision, AnalysisCounters]:
    """Judge this pass's window, if there is one and the phase is analysed (Shadow, Canary, a guarded promotion),
    and fold it into the streak counters (rollout.analysis)."""
    window = observed.window
    if window is None or not analysing:
        return Decision.HOLD, status.counters
    results = bounded(saturated_together([judge(sample, limit, spec.analysis.min_sample_count)
                                          for sample, limit in window.samples]))
    verdict = window_verdict(results)
    why = no_judgement([s for s, _ in window.samples], window.targets) if verdict in (
        Verdict.INCONCLUSIVE, Verdict.ERROR) else None
    cause = window_cause(verdict, results, why)
    seconds = spec.analysis.window_seconds
    started = status.phase_since
    after_step = started is None or now - timedelta(seconds=seconds) >= started
    decision, counters = decide(verdict, window.newest, status.counters, spec.analysis, after_step)
    status.last_analysis = result.analysis = AnalysisRun(time=now, window_seconds=seconds, verdict=verdict,
                                                         cause=cause, no_judgement=why, metrics=results,
                                                         goodput=window.goodput, request_mix=window.mix)
    return decision, counters


def _probes(spec: ServingPolicySpec, observed: SpObserved, before: ServingPolicyStatus) -> ProbeStatus:
    """Where the probes' prompts come from, with the routers' counts from this pass's window (or the last one's,
    while the source is the same)."""
    planned = probe_source(spec, observed.quantized_model)
    if observed.window is not None and observed.window.probe_prompts is not None:
        return with_counts(planned, observed.window.probe_prompts)
    if before.probes is not None and before.probes.source is planned.source and before.probes.prompts is not None:
        return with_counts(planned, before.probes.prompts)
    return planned


def _qualification_result(status: ServingPolicyStatus, observed: SpObserved, phase: P, now: datetime) -> Qualified:
    """The qualification Job's verdict for the pinned candidate, written into status once, when it arrives."""
    qualified, report, why = qualifying.outcome(status.qualification, observed.qualification_job,
                                                observed.qualification_pods)
    if qualified is not Qualified.RUNNING and status.qualification is not None and phase is P.QUALIFYING:
        status.qualification = qualifying.finished(status.qualification, report, why, now)
    return qualified


def _qualification_children(result: SpPlan, arms: _ArmBuilder, image: str, stable: str, candidate: str | None,
                            phase: P, status: ServingPolicyStatus) -> None:
    """While Qualifying, the Job (and its ConfigMap) of the current attempt; finished Jobs stay as evidence."""
    q = status.qualification
    if phase is not P.QUALIFYING or candidate is None or q is None or q.job_name is None:
        return
    if q.state is not QualificationState.RUNNING:
        return
    obj, spec, meta = arms.obj, arms.spec, arms.obj["metadata"]
    config = qualification.worker_config(meta["name"], meta["namespace"], spec, stable, candidate, arms.context)
    result.apply.append(qualification.config_map(obj, q.job_name, config))
    result.apply.append(qualification.job(obj, q.job_name, spec, config, image, arms.context))


def _desired_candidate(observed: SpObserved,
                       spec: ServingPolicySpec) -> tuple[str | None, str, KernelVerdict | None]:
    """(digest-pinned candidate or None, why not, a kernel refusal decided before serving)."""
    if spec.candidate.artifact is not None:
        return spec.candidate.artifact, "", None
    ref = spec.candidate.quantized_model_ref
    assert ref is not None
    qm = observed.quantized_model
    if qm is None or qm["metadata"].get("name") != ref.name:
        return None, f"QuantizedModel {ref.name} not found in this namespace", None
    qm_status = qm.get("status") or {}
    conditions = {c["type"]: c for c in qm_status.get("conditions", [])}
    if qm_status.get("observedGeneration") != qm["metadata"].get("generation"):
        return None, f"QuantizedModel {ref.name} is being calibrated for its latest spec", None
    if qm_status.get("phase") == "Rejected" and conditions.get("Ready", {}).get("reason") == "KernelIncompatible":
        return None, f"QuantizedModel {ref.name}: {qm_status.get('message', 'no kernel')}", KernelVerdict.NONE
    qualified = conditions.get("QualityQualified", {}).get("status") == "True"
    artifact = (qm_status.get("artifact") or {}).get("ref")
    if qm_status.get("phase") != "Ready" or not qualified or not artifact:
        return None, f"QuantizedModel {ref.name} is {qm_status.get('phase', 'Pending')}, not Ready and qualified", None
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


def _invalid(result: SpPlan, status: ServingPolicyStatus, before: ServingPolicyStatus, now: datetime,
             generation: int, message: str, reason: str = "InvalidSpec") -> SpPlan:
    status.message = message
    status.conditions = set_condition(status.conditions, "Progressing", ConditionStatus.FALSE, reason,
                                      message, now=now, generation=generation)
    if before.message != message:
        result.events.append(Event("Warning", reason, message))
    result.status = status.to_wire()
    return result


def _refused(result: SpPlan, obj: dict[str, Any], spec: ServingPolicySpec, status: ServingPolicyStatus,
             before: ServingPolicyStatus, now: datetime, generation: int, refused: tuple[Refusal, ...]) -> SpPlan:
    """The install policy refuses part of the spec: nothing is created or changed, the stable arm keeps serving as
    it is, and a candidate that takes traffic is withdrawn (the router sends everything to stable)."""
    message = "refused by the install policy, nothing changed: " + "; ".join(map(str, refused))
    _invalid(result, status, before, now, generation, message, reason=REFUSED_BY_INSTALL_POLICY)
    if status.stable_artifact and (before.weights.candidate or before.weights.mirror_fraction):
        meta = obj["metadata"]
        config = router.router_config(meta["name"], meta["namespace"], spec, status.stable_artifact, None, 100, 0,
                                      0.0, version=0)
        status.router, result.router_config = _versioned(status.router, config)
        result.apply.append(router.router_config_map(obj, config.model_copy(update={
            "version": status.router.version})))
        status.weights = Weights()
        result.events.append(Event("Warning", REFUSED_BY_INSTALL_POLICY, "candidate withdrawn: all traffic on the "
                                   f"stable arm {serving.short_digest(status.stable_artifact)}"))
    result.status = status.to_wire()
    return result


def _versioned(state: RouterState, config: RouterConfig) -> tuple[RouterState, str | None]:
    """`status.router` for this config, and the document to push when it is new: the version moves only when the
    content does, so routers and status agree on what "newer" means."""
    digest = hashlib.sha256(dump_config(config).encode()).hexdigest()[:16]
    if state.config_hash == digest:
        return state, None
    state = state.model_copy(update={"version": state.version + 1, "config_hash": digest})
    return state, dump_config(config.model_copy(update={"version": state.version}))


def _transition(result: SpPlan, status: ServingPolicyStatus, src: P, dst: P, step_index: int | None,
                reason: TransitionReason, doc: str, facts: Facts, now: datetime) -> None:
    where = f"{dst.value}" + (f" step {step_index} ({facts.steps[step_index]}%)" if step_index is not None else "")
    message = f"{src.value} → {where}: {doc}"
    entry = Transition(time=now, from_phase=src, to_phase=dst, step=step_index, reason=reason.value, message=message)
    status.history = [*status.history, entry][-HISTORY_LIMIT:]
    status.phase_since = now
    status.paused_from = src if reason is TransitionReason.PAUSED_BY_USER else None
    warn = dst in (P.ROLLED_BACK, P.PAUSED, P.FAILED)
    result.events.append(Event("Warning" if warn else "Normal", reason.value, message))


def _rollback_record(reason: RollbackReason, analysis: AnalysisRun | None, observed: SpObserved,
                     candidate: str | None, now: datetime, refused_by: str = "",
                     qualified: QualificationStatus | None = None) -> RollbackRecord:
    """`refused_by`: why the candidate was refused before it had a digest (its QuantizedModel's kernel pre-check)."""
    record = RollbackRecord(reason=reason, time=now, candidate_artifact=candidate)
    failing = [m for m in (analysis.metrics if analysis else []) if m.verdict is Verdict.FAIL]
    if reason is RollbackReason.SLO_BREACH and failing and analysis is not None:
        worst = failing[0]
        record = record.model_copy(update={
            "slo": worst.slo, "failing_slos": list(dict.fromkeys(m.slo for m in failing)),
            # Named even when the aggregate failed too: the slice says where to look first.
            "slice": next((m.slice for m in failing if m.slo == worst.slo and m.slice), None),
            "candidate_value": worst.value,
            "stable_value": worst.stable_value, "limit": worst.limit, "window_seconds": analysis.window_seconds,
            "cause": analysis.cause,
            "message": worst.message or ""})
    elif reason in (RollbackReason.KERNEL_UNAVAILABLE, RollbackReason.KERNEL_FALLBACK):
        kernels = observed.candidate_kernels
        record.message = (kernels.message if kernels else "") or refused_by or "refused by the kernel check"
    elif reason is RollbackReason.CANDIDATE_FAILED:
        record.message = observed.candidate_failed or ""
    elif reason in (RollbackReason.QUALIFICATION_FAILED, RollbackReason.GOLDEN_OUTPUT_MISMATCH) and qualified:
        refused = [f"golden/{g.slice}" for g in qualified.golden if g.passed is False] + [
            f"{a.arm.value}/{r.regime.value}" for a in qualified.arms for r in a.regimes if r.passed is False]
        record = record.model_copy(update={"slo": refused[0] if refused else None, "failing_slos": refused,
                                           "message": qualified.message})
    return record


def _children(result: SpPlan, arms: _ArmBuilder, router_image: str, stable: str, candidate: str | None, phase: P,
              status: ServingPolicyStatus, weights: Weights, now: datetime, token: str,
              max_body_bytes: int = MAX_BODY_BYTES) -> None:
    obj, spec = arms.obj, arms.spec
    meta = obj["metadata"]
    policy, namespace = meta["name"], meta["namespace"]
    replicas = spec.serving.replicas
    result.apply.append(arms.deployment(stable, replicas))
    result.apply.append(serving.arm_service(obj, stable))
    candidate_live = candidate is not None and candidate != stable and phase in CANDIDATE_PHASES
    if candidate is not None and candidate != stable:
        # A rolled-back candidate is scaled to zero, not deleted: its Deployment stays as evidence.
        result.apply.append(arms.deployment(candidate, replicas if candidate_live else 0))
        result.apply.append(serving.arm_service(obj, candidate))
    target = status.rollback_target
    guard = previous_stable_warm(phase, status, now)
    if target and target not in (stable, candidate):
        result.apply.append(arms.deployment(target, replicas if guard else 0))
    if spec.traffic_provider is not TrafficProvider.ROUTER:
        return  # the only provider today; another would split traffic without Quantrol's router
    quality = quality_plan(spec, arms.quantized_model)
    # Probes only while the candidate is judged: a Pending or held candidate arm may not even be up yet.
    judged = phase in (P.SHADOW, P.CANARY) or guard
    probes = status.probes.source if status.probes and judged else ProbeSource.NONE
    split: tuple[str, str | None, int, int] = (stable, candidate if candidate_live else None,
                                               weights.stable if candidate_live else 100,
                                               weights.candidate if candidate_live else 0)
    if guard and target and target != stable:
        # The guard is the last canary step continued: the router still calls the promoted artifact `candidate`
        # (all live traffic) and keeps the previous stable arm as `stable` (none), so the analysis runs on the
        # same series and a rollback is one weight change to an arm that is still warm.
        split = (target, stable, 0, 100)
    config = router.router_config(policy, namespace, spec, *split, weights.mirror_fraction, version=0,
                                  max_body_bytes=max_body_bytes, slices=SliceRule(allowed=quality.slices),
                                  compare=CompareConfig(max_request_kl=quality.max_request_kl,
                                                        slice_max_request_kl=quality.slice_max_request_kl),
                                  probe_source=probes, context=arms.context)
    state, document = _versioned(status.router, config)
    if document is not None:
        result.router_config = document
    config = config.model_copy(update={"version": state.version})
    status.router = state
    result.apply.append(router.router_config_map(obj, config))
    result.apply.append(router.router_deployment(obj, spec, router_image, arms.context.credentials_secret))
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


def _status_fields(status: ServingPolicyStatus, phase: P, index: int | None, stable: str, candidate: str | None,
                   weights: Weights, facts: Facts, before: ServingPolicyStatus, now: datetime,
                   generation: int) -> None:
    status.phase = phase
    status.step = index
    status.weights = weights
    status.stable_short_digest = serving.short_digest(stable)
    status.candidate_short_digest = serving.short_digest(candidate) if candidate else None
    status.phase_since = status.phase_since or now
    if status.message is None or before.phase is not phase:
        # Before the conditions, which quote it: a condition one pass behind would be one more write.
        status.message = status.history[-1].message if status.history else (status.message or phase.value)
    conditions = status.conditions

    def cond(type_: str, ok: bool | None, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, ok, reason, message, now=now, generation=generation)

    cond("StableReady", facts.stable_ready, "ArmReady" if facts.stable_ready else "ArmNotReady",
         f"stable arm {serving.short_digest(stable)}")
    cond("CandidateReady", facts.candidate_ready, "ArmReady" if facts.candidate_ready else "ArmNotReady",
         f"candidate arm {serving.short_digest(candidate)}" if candidate else "no candidate pinned")
    cond("Progressing", phase in (P.PENDING, P.SHADOW, P.CANARY), phase.value, status.message or phase.value)
    q = status.qualification
    if q is not None:
        cond("Qualified", q.state is QualificationState.PASSED, q.reason or q.state.value, q.message)
    cond("Promoted", phase is P.PROMOTED, phase.value, f"stable is {serving.short_digest(stable)}")
    cond("Paused", phase is P.PAUSED, *_paused(phase, status))
    probes = status.probes
    if probes is not None:
        known = probes.source is ProbeSource.NONE or probes.prompts is not None
        held = bool(probes.prompts)
        cond("QualityProbes", held if known or held else None,
             "ProbePrompts" if held else "NoProbePrompts" if known else "NotReportedYet", probes.message)
    rolled_back = phase is P.ROLLED_BACK and status.rollback is not None
    cond("RolledBack", phase is P.ROLLED_BACK,
         status.rollback.reason.value if rolled_back and status.rollback else "NotRolledBack",
         status.rollback.message if rolled_back and status.rollback else "")
    status.conditions = conditions


def _paused(phase: P, status: ServingPolicyStatus) -> tuple[str, str]:
    """The Paused condition's (reason, message): a user's hold, or why the analysis could not judge (NoJudgement,
    from the window that paused it), so an alert can tell "nothing scraped" from "nobody sends traffic"."""
    if phase is not P.PAUSED:
        return "NotPaused", ""
    if status.paused_from is not None:
        return TransitionReason.PAUSED_BY_USER.value, "the quantrol.io/paused annotation holds the current weights"
    why = status.last_analysis.no_judgement if status.last_analysis else None
    if why is not None:
        return why.value, f"{why.value}: {NO_JUDGEMENT_ADVICE[why]}"
    return TransitionReason.ANALYSIS_CANNOT_JUDGE.value, status.message or "the analysis could not judge"
