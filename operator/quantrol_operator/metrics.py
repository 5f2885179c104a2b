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
    "quantrol_rollbacks_total", "Rollbacks to the stable arm, by reason and SLO.", [*POLICY_LABELS, "reason", "slo"]
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
        ANALYSIS_VERDICTS.labels(namespace, policy, result.slo, result.verdict.value).inc()
    if rollback is not None:
        ROLLBACKS.labels(namespace, policy, rollback.reason.value, rollback.slo or "").inc()
