"""The Qualifying phase's bookkeeping: which Job runs for which attempt, and what its report means for the rollout.

Pure: the observer hands in the Job and its pods; the state machine gets a `Qualified` fact; status gets the
report's figures as the typed `QualificationStatus` (the worker's report models, quoted, never re-keyed).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from quantrol_operator.api.servingpolicy import QualificationState, QualificationStatus, ServingPolicySpec
from quantrol_operator.children import qualification
from quantrol_operator.rollout.statemachine import Qualified
from quantrol_worker.contracts import QualificationReason, QualificationReport

OUTCOMES: dict[QualificationReason, tuple[Qualified, QualificationState]] = {
    QualificationReason.QUALIFIED: (Qualified.PASSED, QualificationState.PASSED),
    QualificationReason.QUALIFICATION_FAILED: (Qualified.FAILED, QualificationState.REFUSED),
    QualificationReason.GOLDEN_OUTPUT_MISMATCH: (Qualified.GOLDEN_MISMATCH, QualificationState.REFUSED),
    QualificationReason.INVALID_CONFIG: (Qualified.ERROR, QualificationState.ERROR),
    QualificationReason.INTERNAL_ERROR: (Qualified.ERROR, QualificationState.ERROR),
}


def started(spec: ServingPolicySpec, candidate: str, before: QualificationStatus | None,
            now: datetime, policy: str) -> QualificationStatus:
    """A new attempt for `candidate` (every entry into Qualifying runs the Job anew: a retry measures again)."""
    attempt = (before.attempt if before else 0) + 1
    return QualificationStatus(
        state=QualificationState.RUNNING, candidate_artifact=candidate, attempt=attempt,
        job_name=qualification.job_name(policy, candidate, attempt), started=now,
        required_goodput_ratio=spec.qualification.min_goodput_ratio,
        message="measuring both arms on the target (floor, sustainable, overload) and the golden-output check")


def skipped(candidate: str | None, before: QualificationStatus | None) -> QualificationStatus:
    return QualificationStatus(
        state=QualificationState.SKIPPED, candidate_artifact=candidate, attempt=before.attempt if before else 0,
        message="spec.qualification.enabled is false: the candidate takes shadow traffic unmeasured on the target")


def report_of(pods: list[dict[str, Any]]) -> tuple[QualificationReport | None, str]:
    """The report in the qualify container's termination message, or what ended it instead (bounded)."""
    newest = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))[-1:]
    for pod in newest:
        for state in (pod.get("status") or {}).get("containerStatuses", []):
            terminated = (state.get("state") or {}).get("terminated") if state.get("name") == qualification.CONTAINER \
                else None
            if not terminated:
                continue
            message = str(terminated.get("message") or "")
            try:
                return QualificationReport.model_validate_json(message), ""
            except ValueError:
                return None, (message or str(terminated.get("reason") or "exited"))[-1024:]
    return None, ""


def outcome(status: QualificationStatus | None, job: dict[str, Any] | None,
            pods: list[dict[str, Any]]) -> tuple[Qualified, QualificationReport | None, str]:
    """(the state machine's fact, the report if there is one, why the Job ended without one)."""
    if status is None or status.state is not QualificationState.RUNNING or job is None:
        return Qualified.RUNNING, None, ""
    report, why = report_of(pods)
    if report is not None:
        return OUTCOMES[report.reason][0], report, ""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions", [])
                  if c.get("status") == "True"}
    failed = conditions.get("Failed")
    if failed is not None:
        return Qualified.ERROR, None, why or f"{failed.get('reason')}: {failed.get('message', '')}"[:1024]
    return Qualified.RUNNING, None, ""


def finished(status: QualificationStatus, report: QualificationReport | None, why: str,
             now: datetime) -> QualificationStatus:
    if report is None:
        return status.model_copy(update={"state": QualificationState.ERROR, "finished": now,
                                         "reason": QualificationReason.INTERNAL_ERROR.value,
                                         "message": f"the qualification Job ended without a report: {why}"})
    return status.model_copy(update={
        "state": OUTCOMES[report.reason][1], "finished": now, "reason": report.reason.value,
        "message": report.message[:1024], "tool": report.tool, "arms": report.arms, "golden": report.golden,
        "golden_source": report.golden_source, "goodput_ratio": report.goodput_ratio,
        "required_goodput_ratio": report.required_goodput_ratio or status.required_goodput_ratio})
