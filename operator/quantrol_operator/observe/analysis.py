"""One analysis window: the SLO queries and the router targets' health, as the policy's Prometheus answers them.
Judging them is the planner's (rollout.analysis); this module only decides whether a window is due and asks."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from quantrol_operator.api.servingpolicy import RolloutPhase, ServingPolicySpec
from quantrol_operator.children import label_value
from quantrol_operator.children.serving import short_digest
from quantrol_operator.observe.prometheus import PrometheusSource
from quantrol_operator.policy import InstallPolicy
from quantrol_operator.rollout.queries import MetricSource, Observation, Scope, observe

ANALYSED = (RolloutPhase.SHADOW.value, RolloutPhase.CANARY.value)
GPU_RESOURCE = "nvidia.com/gpu"


def guarding(status: dict[str, Any], now: datetime) -> bool:
    """Promoted, and still within promotionGraceSeconds: the previous stable arm is warm and the analysis goes on."""
    until = status.get("guardUntil")
    return status.get("phase") == RolloutPhase.PROMOTED.value and bool(until) and now < _time(str(until))


def due(status: dict[str, Any], spec: ServingPolicySpec, now: datetime) -> bool:
    """Whether this pass analyses: in Shadow or Canary (or guarding a promotion), `intervalSeconds` after the last
    window."""
    if status.get("phase") not in ANALYSED and not guarding(status, now):
        return False
    last = (status.get("lastAnalysis") or {}).get("time")
    return not last or now - _time(last) >= timedelta(seconds=spec.analysis.interval_seconds)


def source_for(spec: ServingPolicySpec, default_address: str, policy: InstallPolicy | None = None) -> PrometheusSource:
    """The policy's Prometheus (an address the install policy allows: planning refuses others before any query),
    read within the install's bounds."""
    policy = policy or InstallPolicy()
    address = spec.analysis.prometheus.address if spec.analysis.prometheus else default_address
    return PrometheusSource(address, policy.reads, policy.prometheus.ca_file)


def engine_slots(spec: ServingPolicySpec) -> float:
    """Engine slots of one arm: replicas × the GPUs each engine is given (a CPU engine counts as one)."""
    resources = spec.serving.resources
    gpus = (resources.limits.get(GPU_RESOURCE) or resources.requests.get(GPU_RESOURCE)) if resources else None
    try:
        per_engine = float(str(gpus)) if gpus is not None else 1.0
    except ValueError:
        per_engine = 1.0
    return spec.serving.replicas * max(1.0, per_engine)


def window(source: MetricSource, namespace: str, policy: str, status: dict[str, Any],
           spec: ServingPolicySpec, now: datetime) -> Observation:
    """Ask for one window of the policy in its current phase (Shadow judges mirrored traffic). While a promotion is
    guarded the router still names the promoted artifact `candidate` (all live traffic) and the previous stable arm
    `stable` (none), so the same queries judge the promoted arm, on absolute limits."""
    traffic = "mirror" if status.get("phase") == RolloutPhase.SHADOW.value else "live"
    guard = guarding(status, now)
    roles = ({"candidate": status.get("stableArtifact"), "stable": status.get("rollbackTarget")} if guard else
             {"candidate": status.get("candidateArtifact"), "stable": status.get("stableArtifact")})
    # Series carry the pods' policy label (children/monitoring.py relabels it), which is the name as a label value.
    scope = Scope(namespace, label_value(policy), f"{spec.analysis.window_seconds}s", traffic,
                  engines={role: short_digest(ref) for role, ref in roles.items() if ref},
                  batch_slots=spec.serving.batch_budget.max_num_seqs * spec.serving.replicas,
                  engine_slots=engine_slots(spec), window_seconds=spec.analysis.window_seconds)
    stable_live = not guard and (status.get("weights") or {}).get("stable", 100) > 0
    return observe(source, scope, spec.slos, stable_live)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
