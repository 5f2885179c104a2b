"""One analysis window: the SLO queries and the router targets' health, as the policy's Prometheus answers them.
Judging them is the planner's (rollout.analysis); this module only decides whether a window is due and asks."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from quantrol_operator.api.servingpolicy import RolloutPhase, ServingPolicySpec
from quantrol_operator.children import label_value
from quantrol_operator.observe.prometheus import PrometheusSource
from quantrol_operator.policy import InstallPolicy
from quantrol_operator.rollout.queries import MetricSource, Observation, Scope, observe

ANALYSED = (RolloutPhase.SHADOW.value, RolloutPhase.CANARY.value)


def due(status: dict[str, Any], spec: ServingPolicySpec, now: datetime) -> bool:
    """Whether this pass analyses: in Shadow or Canary, and `intervalSeconds` after the last window."""
    if status.get("phase") not in ANALYSED:
        return False
    last = (status.get("lastAnalysis") or {}).get("time")
    return not last or now - datetime.fromisoformat(last.replace("Z", "+00:00")) >= timedelta(
        seconds=spec.analysis.interval_seconds)


def source_for(spec: ServingPolicySpec, default_address: str, policy: InstallPolicy | None = None) -> PrometheusSource:
    """The policy's Prometheus (an address the install policy allows: planning refuses others before any query),
    read within the install's bounds."""
    policy = policy or InstallPolicy()
    address = spec.analysis.prometheus.address if spec.analysis.prometheus else default_address
    return PrometheusSource(address, policy.reads, policy.prometheus.ca_file)


def window(source: MetricSource, namespace: str, policy: str, status: dict[str, Any],
           spec: ServingPolicySpec) -> Observation:
    """Ask for one window of the policy in its current phase (Shadow judges mirrored traffic)."""
    traffic = "mirror" if status.get("phase") == RolloutPhase.SHADOW.value else "live"
    # Series carry the pods' policy label (children/monitoring.py relabels it), which is the name as a label value.
    scope = Scope(namespace, label_value(policy), f"{spec.analysis.window_seconds}s", traffic)
    stable_live = (status.get("weights") or {}).get("stable", 100) > 0
    return observe(source, scope, spec.slos, stable_live)
