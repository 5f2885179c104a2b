"""The operator's own Prometheus metrics (`quantrol_*`): the names alerts and dashboards rely on.

Defined once here; the chart's PrometheusRule and Grafana dashboard use exactly these names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from quantrol_operator.api.servingpolicy import AnalysisRun, RollbackRecord, RolloutPhase, ServingPolicyStatus

POLICY_LABELS = ("namespace", "policy")

ROLLOUT_PHASE = Gauge(
    "quantrol_rollout_phase",
    "1 for the ServingPolicy's current phase, 0 for the others.",
    [*POLICY_LABELS, "phase"],
)
ROLLOUT_PHASE_SINCE = Gauge(
    "quantrol_rollout_phase_since_timestamp_seconds",
    "Unix time at which the ServingPolicy entered its current phase.",
    POLICY_LABELS,
)
CANDIDATE_WEIGHT = Gauge(
    "quantrol_candidate_weight_percent", "Percent of live traffic on the candidate arm.", POLICY_LABELS
)
ROLLBACKS = Counter(
    "quantrol_rollbacks_total", "Rollbacks to the stable arm, by reason, SLO and cause (precision, scheduling, "
    "overload, dependency; empty for rollbacks no analysis decided).", [*POLICY_LABELS, "reason", "slo", "cause"]
)
ANALYSIS_CAUSES = Counter(
    "quantrol_analysis_causes_total", "Analysis windows that did not pass, by cause (precision, scheduling, "
    "overload, dependency).", [*POLICY_LABELS, "cause"]
)
ANALYSIS_VERDICTS = Counter(
    "quantrol_analysis_verdicts_total", "SLO verdicts per analysis window.", [*POLICY_LABELS, "slo", "verdict"]
)
CALIBRATIONS = Counter(
    "quantrol_calibrations_total",
    "Finished calibrations of QuantizedModels, by outcome (ready, rejected, failed).",
    ["namespace", "quantizedmodel", "outcome"],
)
RECONCILE_ERRORS = Counter(
    "quantrol_reconcile_errors_total", "Handler errors, by resource kind and handler.", ["kind", "handler"]
)
RECONCILE_DURATION = Histogram(
    "quantrol_reconcile_duration_seconds", "Time spent in one reconcile pass.", ["kind", "handler"]
)


def export_rollout(namespace: str, policy: str, status: ServingPolicyStatus, analysis: AnalysisRun | None,
                   rollback: RollbackRecord | None) -> None:
    """One pass's figures: the phase and weight as they are now, this pass's verdicts and rollback (if any)."""
    for phase in RolloutPhase:
        ROLLOUT_PHASE.labels(namespace, policy, phase.value).set(1 if status.phase is phase else 0)
    CANDIDATE_WEIGHT.labels(namespace, policy).set(status.weights.candidate)
    if status.phase_since is not None:
        ROLLOUT_PHASE_SINCE.labels(namespace, policy).set(status.phase_since.timestamp())
    for result in analysis.metrics if analysis else []:
        if result.slice is None:  # per-slice rows are in status; the counter stays one series per SLO
            ANALYSIS_VERDICTS.labels(namespace, policy, result.slo, result.verdict.value).inc()
    if analysis is not None and analysis.cause is not None:
        ANALYSIS_CAUSES.labels(namespace, policy, analysis.cause.value).inc()
    if rollback is not None:
        cause = rollback.cause.value if rollback.cause else ""
        ROLLBACKS.labels(namespace, policy, rollback.reason.value, rollback.slo or "", cause).inc()
