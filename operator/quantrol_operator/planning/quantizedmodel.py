"""QuantizedModel: from spec, status and the generation's Job and pod to the next status.

Phases: Pending → Calibrating → Ready, or Rejected (quality gate, kernel pre-check) or Failed (bad input,
job failure, deadline). One Job per generation; a finished generation is never calibrated again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from quantrol_operator.api.common import NAME_RULE, name_fits_children
from quantrol_operator.api.quantizedmodel import (
    Artifact,
    QuantizedModelPhase,
    QuantizedModelSpec,
    QuantizedModelStatus,
)
from quantrol_operator.children import calibration
from quantrol_operator.conditions import set_condition
from quantrol_operator.planning import Event, Plan
from quantrol_operator.policy import InstallPolicy, Refusal, pod_refusals, registry_host
from quantrol_operator.validation import field_error
from quantrol_worker.contracts import (
    CalibrationReason,
    ExperimentEnvelope,
    SliceQuality,
    TerminationResult,
    WorkerPhase,
)

TERMINAL = {QuantizedModelPhase.READY, QuantizedModelPhase.REJECTED, QuantizedModelPhase.FAILED}


class QmReason(StrEnum):
    """Condition reasons the operator itself decides (the worker's come from `contracts.CalibrationReason`)."""

    INVALID_SPEC = "InvalidSpec"
    REFUSED_BY_INSTALL_POLICY = "RefusedByInstallPolicy"  # an image, ServiceAccount or scheduling override
    UNSUPPORTED_SOURCE = "UnsupportedSource"
    CREDENTIALS_MISSING = "CredentialsMissing"  # the registry credentials Secret is missing or not a docker config
    JOB_CREATED = "JobCreated"
    JOB_RUNNING = "JobRunning"
    IMAGE_PULL_FAILING = "ImagePullFailing"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    OOM_KILLED = "OOMKilled"
    NO_RESULT = "NoResult"
    NOT_YET = "NotYet"


@dataclass(frozen=True)
class QmObserved:
    obj: dict[str, Any]  # the QuantizedModel as read (metadata, spec, status)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # Jobs it owns, any generation
    pods: list[dict[str, Any]] = field(default_factory=list)  # pods owned by this generation's Job
    now: datetime = field(default_factory=datetime.now)
    credentials_problem: str | None = None  # why spec.artifact.credentialsSecretRef cannot be used yet


def _refusals(spec: QuantizedModelSpec, policy: InstallPolicy) -> list[Refusal]:
    """What of the spec the install policy does not allow: the Job's pod overrides, and plain HTTP to a registry the
    policy does not list."""
    out = pod_refusals("spec.job", spec.job, policy.workloads)
    host = registry_host(spec.artifact.repository)
    if spec.artifact.insecure and not policy.allows_plain_http(host):
        listed = ", ".join(policy.registries.plain_http) or "none"
        out.append(Refusal("spec.artifact.insecure", f"the install policy does not allow plain HTTP to {host} "
                           f"(installPolicy.registries.plainHttp: {listed}); use TLS, or ask the installation to "
                           "list it"))
    return out


def plan(observed: QmObserved, worker_image: str, policy: InstallPolicy | None = None) -> Plan:
    policy = policy or InstallPolicy()
    obj = observed.obj
    meta = obj["metadata"]
    generation = int(meta.get("generation", 1))
    status = dict(obj.get("status") or {})
    current = _Status(status, generation, observed.now)
    result = Plan()

    stale_jobs = [j for j in observed.jobs if _generation_of(j) != generation and _active(j)]
    # A spec change withdraws the calibration of the old spec: its GPU time is wasted otherwise.
    result.delete = [_ref(j) for j in stale_jobs]

    if status.get("observedGeneration") == generation and status.get("phase") in TERMINAL:
        result.status = current.before.to_wire()
        return result

    if not name_fits_children(meta):  # created before the CRD carried the rule
        current.fail(QmReason.INVALID_SPEC, f"{NAME_RULE.message}; nothing was created (recreate it under such a name)")
        return current.into(result)
    try:
        spec = QuantizedModelSpec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        errors = "; ".join(f"spec.{e}" for e in map(field_error, exc.errors()))
        current.fail(QmReason.INVALID_SPEC, f"the spec is invalid, fix it and re-apply: {errors}")
        return current.into(result)
    refused = _refusals(spec, policy)
    if refused:  # nothing is created: the Job would run what the install does not allow
        current.fail(QmReason.REFUSED_BY_INSTALL_POLICY,
                     "refused by the install policy, nothing created: " + "; ".join(map(str, refused)))
        return current.into(result)
    try:
        config = calibration.worker_config(meta["name"], meta["namespace"], generation, spec, policy)
    except calibration.UnsupportedSource as exc:
        current.fail(QmReason.UNSUPPORTED_SOURCE, str(exc))
        return current.into(result)

    name = calibration.job_name(meta["name"], generation)
    job = next((j for j in observed.jobs if j["metadata"]["name"] == name), None)
    if job is None and observed.credentials_problem:
        # Waiting, not failed: the Secret may simply be applied after the QuantizedModel (GitOps ordering).
        current.running(QuantizedModelPhase.PENDING, QmReason.CREDENTIALS_MISSING, observed.credentials_problem)
        return current.into(result)
    result.apply = [calibration.config_map(obj, config)]
    if job is None:
        result.apply.append(calibration.job(obj, spec, worker_image))
        current.running(QuantizedModelPhase.PENDING, QmReason.JOB_CREATED, f"calibration Job {name} created")
        current.status.job_name = name
        return current.into(result)
    current.status.job_name = name
    _follow_job(current, job, observed.pods, name)
    return current.into(result)


def _follow_job(current: _Status, job: dict[str, Any], pods: list[dict[str, Any]], name: str) -> None:
    job_status = job.get("status") or {}
    terminated = _terminated(pods)
    result = _result(terminated)
    finished = _job_condition(job_status, "Complete") or _job_condition(job_status, "Failed")
    if not finished:
        waiting = _waiting_reason(pods)
        if waiting in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
            current.running(
                QuantizedModelPhase.PENDING, QmReason.IMAGE_PULL_FAILING,
                f"Job {name}: the worker image cannot be pulled ({waiting}); check spec.job.image and "
                "spec.job.imagePullSecrets",
            )
        elif job_status.get("active") or _phase_of(pods) == "Running":
            current.running(QuantizedModelPhase.CALIBRATING, QmReason.JOB_RUNNING, f"Job {name} is calibrating")
        else:
            current.running(QuantizedModelPhase.PENDING, QmReason.JOB_CREATED, f"Job {name} waits to be scheduled")
        return
    if result is not None:
        current.finish(result, name)
        return
    failed = _job_condition(job_status, "Failed")
    reason = str(failed.get("reason", "")) if failed else ""
    if terminated and terminated.get("reason") == "OOMKilled":
        current.fail(QmReason.OOM_KILLED, f"Job {name}: the worker ran out of memory; raise spec.job.resources")
    elif reason == "DeadlineExceeded":
        current.fail(
            QmReason.DEADLINE_EXCEEDED,
            f"Job {name} ran past spec.job.activeDeadlineSeconds and was stopped; raise the deadline or shrink "
            "the calibration set",
        )
    elif reason == "BackoffLimitExceeded":
        tail = (terminated or {}).get("message", "")
        current.fail(QmReason.BACKOFF_LIMIT_EXCEEDED, f"Job {name} failed: {tail}".strip()[:1024])
    else:
        current.fail(
            QmReason.NO_RESULT,
            f"Job {name} finished but its pod left no readable result at its termination-message path",
        )


class _Status:
    """The status being built (the typed model), with the transitions' events collected on the side."""

    def __init__(self, status: dict[str, Any], generation: int, now: datetime) -> None:
        self.before = QuantizedModelStatus.model_validate({k: v for k, v in status.items() if v is not None})
        if self.before.observed_generation in (None, generation):
            kept = self.before.model_dump(include={"conditions", "artifact", "quality", "envelope"})
        else:
            # A new generation starts from scratch; the old artifact stays only in the old Job's evidence.
            kept = self.before.model_dump(include={"conditions"})
        self.status = QuantizedModelStatus.model_validate(kept)
        self.status.observed_generation = generation
        self.generation = generation
        self.now = now.replace(microsecond=0)  # the API server keeps times to the second: re-reads compare equal
        self.events: list[Event] = []

    def _set(self, type_: str, ok: bool | None, reason: str, message: str) -> None:
        self.status.conditions = set_condition(self.status.conditions, type_, ok, reason, message, now=self.now,
                                               generation=self.generation)

    def _phase(self, phase: QuantizedModelPhase, message: str, event_type: str, reason: str) -> None:
        self.status.phase = phase
        self.status.message = message
        if self.before.phase is not phase or self.before.observed_generation != self.generation:
            self.events.append(Event(event_type, reason, message))

    def running(self, phase: QuantizedModelPhase, reason: QmReason, message: str) -> None:
        self._phase(phase, message, "Normal", reason.value)
        for type_ in ("Calibrated", "QualityQualified", "Published"):
            self._set(type_, None, QmReason.NOT_YET.value, "calibration in progress")
        self._set("Ready", False, reason.value, message)

    def fail(self, reason: QmReason | CalibrationReason, message: str) -> None:
        self._phase(QuantizedModelPhase.FAILED, message, "Warning", reason.value)
        self._set("Ready", False, reason.value, message)

    def finish(self, result: TerminationResult, job: str) -> None:
        phase = QuantizedModelPhase(result.phase.value)
        reason = result.reason.value
        message = result.message or f"Job {job}: {reason}"
        if result.reason is CalibrationReason.REGISTRY_UNAUTHORIZED:
            message += ("; the registry credentials come from the Secret spec.artifact.credentialsSecretRef names: "
                        "it must hold credentials for that registry that may push to the repository")
        self.status.quality = [
            SliceQuality(slice=h.slice, mean_kl_divergence=h.mean_kl, p99_kl_divergence=h.p99_kl,
                         top1_agreement=h.top1, perplexity_ratio=h.ppl_ratio, passed=h.passed,
                         failed_limits=h.failed)
            for h in result.quality
        ]
        self.status.envelope = ExperimentEnvelope(base_model_digest=result.base_model_digest or None,
                                                  calibration_data_digest=result.calibration_data_digest or None)
        if result.phase is WorkerPhase.READY and result.artifact_ref and result.digest:
            self.status.artifact = Artifact(ref=result.artifact_ref,
                                            short_digest=result.digest.removeprefix("sha256:")[:12],
                                            size_bytes=result.size_bytes, format="compressed-tensors")
            self._set("Calibrated", True, "Succeeded", "calibration and quantization finished")
            self._set("QualityQualified", True, "Succeeded", "every slice passed the quality gate")
            self._set("Published", True, "Succeeded", f"published {result.artifact_ref}")
            self._set("Ready", True, "Succeeded", f"artifact {result.artifact_ref} is qualified and published")
            self._phase(phase, message, "Normal", "Ready")
            return
        self.status.artifact = None
        # Rejected by the gate means calibration itself ran; a kernel pre-check or an error means it did not.
        calibrated = result.reason in (CalibrationReason.QUALITY_GATE_FAILED, CalibrationReason.INTEGRITY_CHECK_FAILED)
        self._set("Calibrated", calibrated, reason, message)
        self._set("QualityQualified", False, reason, message)
        evidence = f"evidence kept at {result.report_ref}" if result.report_ref else "no report was published"
        self._set("Published", False, reason, evidence)
        self._set("Ready", False, reason, message)
        self._phase(phase, f"{message} ({evidence})", "Warning", reason)

    def into(self, result: Plan) -> Plan:
        result.status = self.status.to_wire()
        result.events = self.events
        return result


def _generation_of(job: dict[str, Any]) -> int | None:
    value = (job["metadata"].get("labels") or {}).get(calibration.LABEL_GENERATION)
    return int(value) if value and value.isdigit() else None


def _active(job: dict[str, Any]) -> bool:
    status = job.get("status") or {}
    return not (_job_condition(status, "Complete") or _job_condition(status, "Failed"))


def _ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "namespace": obj["metadata"]["namespace"],
            "name": obj["metadata"]["name"]}


def _job_condition(job_status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in job_status.get("conditions", []) if c.get("type") == type_ and c.get("status") == "True"), None
    )


def _container_states(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    newest = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    return [
        s.get("state") or {}
        for pod in newest[-1:]
        for s in (pod.get("status") or {}).get("containerStatuses", [])
        if s.get("name") == calibration.CONTAINER
    ]


def _terminated(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((s["terminated"] for s in _container_states(pods) if "terminated" in s), None)


def _waiting_reason(pods: list[dict[str, Any]]) -> str | None:
    return next((str(s["waiting"].get("reason")) for s in _container_states(pods) if "waiting" in s), None)


def _phase_of(pods: list[dict[str, Any]]) -> str | None:
    newest = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    return (newest[-1].get("status") or {}).get("phase") if newest else None


def _result(terminated: dict[str, Any] | None) -> TerminationResult | None:
    message = (terminated or {}).get("message")
    if not message:
        return None
    try:
        return TerminationResult.from_message(message)
    except ValueError:
        return None  # a crash log (FallbackToLogsOnError), not a result
