"""One analysis window: the SLO queries run against the policy's Prometheus, judged per SLO, and, when the window
judges nothing, why (`NoJudgement`, from Prometheus' own answers)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from quantrol_operator.api.servingpolicy import RolloutPhase, ServingPolicySpec, Verdict
from quantrol_operator.planning.servingpolicy import Window
from quantrol_operator.rollout.analysis import judge, window_verdict
from quantrol_operator.rollout.queries import MetricSource, PrometheusSource, Scope, collect, no_judgement

ANALYSED = (RolloutPhase.SHADOW.value, RolloutPhase.CANARY.value)


def due(status: dict[str, Any], spec: ServingPolicySpec, now: datetime) -> bool:
    """Whether this pass analyses: in Shadow or Canary, and `intervalSeconds` after the last window."""
    if status.get("phase") not in ANALYSED:
        return False
    last = (status.get("lastAnalysis") or {}).get("time")
    return not last or now - datetime.fromisoformat(last.replace("Z", "+00:00")) >= timedelta(
        seconds=spec.analysis.interval_seconds)


def source_for(spec: ServingPolicySpec, default_address: str) -> PrometheusSource:
    return PrometheusSource(spec.analysis.prometheus.address if spec.analysis.prometheus else default_address)


def window(source: MetricSource, namespace: str, policy: str, status: dict[str, Any],
           spec: ServingPolicySpec) -> Window:
    """Query and judge one window for the policy in its current phase (Shadow judges mirrored traffic)."""
    traffic = "mirror" if status.get("phase") == RolloutPhase.SHADOW.value else "live"
    scope = Scope(namespace, policy, f"{spec.analysis.window_seconds}s", traffic)
    stable_live = (status.get("weights") or {}).get("stable", 100) > 0
    samples, newest = collect(source, scope, spec.slos, stable_live)
    judgements = [judge(sample, limit, spec.analysis.min_sample_count) for sample, limit in samples]
    why = None
    if window_verdict(judgements) in (Verdict.INCONCLUSIVE, Verdict.ERROR):
        why = no_judgement(source, scope, [sample for sample, _ in samples])
    return Window(judgements, newest, spec.analysis.window_seconds, why)
