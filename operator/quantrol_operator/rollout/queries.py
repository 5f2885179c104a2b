"""PromQL for every SLO, per arm, over the analysis window, and the metric-source protocol that runs it.

Latency and error SLOs read the router's `traffic="live"` series, so mirrored and probe traffic never
count. Series carry `namespace` and `policy` labels from the scrape configuration (PodMonitor relabelling
on a cluster, file_sd labels in the local stack); `arm` is the router's role label (stable, candidate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from quantrol_operator.api.servingpolicy import CustomSlo, NoJudgement, SloFloor, SloLimit, Slos
from quantrol_operator.rollout.analysis import Sample, TargetHealth

R = "quantrol_router_"


class QueryError(Exception):
    """The metric source could not answer: the verdict is `error`, never pass. `reason` says which way it failed
    (MetricsUnreachable or QueryFailed); the message (for the operator's log, never for status) says more."""

    def __init__(self, message: str, reason: NoJudgement = NoJudgement.QUERY_FAILED) -> None:
        super().__init__(message)
        self.reason = reason


class MetricSource(Protocol):
    def scalar(self, promql: str) -> float | None:
        """One value, or None when the result is empty. Raises QueryError."""
        ...


@dataclass(frozen=True)
class Scope:
    namespace: str
    policy: str
    window: str  # e.g. "60s"
    # During Shadow the candidate serves only mirrored copies of stable requests: its latency and errors are
    # judged on those (the client never waited for them, but the engine did the same work). From the first
    # canary step on, only live traffic counts.
    candidate_traffic: str = "live"

    def sel(self, arm: str | None = None, live: bool = True, **extra: str) -> str:
        labels = {"namespace": self.namespace, "policy": self.policy, **extra}
        if arm:
            labels["arm"] = arm
        if live:
            labels["traffic"] = self.candidate_traffic if arm == "candidate" else "live"
        return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _p99(metric: str) -> Callable[[Scope, str], str]:
    return lambda s, arm: f"histogram_quantile(0.99, sum by (le) (rate({R}{metric}_bucket{s.sel(arm)}[{s.window}])))"


def _error_rate(s: Scope, arm: str) -> str:
    errors = f"sum(rate({R}errors_total{s.sel(arm)}[{s.window}]))"
    requests = f"sum(rate({R}requests_total{s.sel(arm)}[{s.window}]))"
    return f"({errors} or vector(0)) / {requests}"


def _queue_p99(s: Scope, arm: str) -> str:
    return (f"histogram_quantile(0.99, sum by (le) (rate({R}queue_wait_seconds_bucket"
            f"{s.sel(arm)}[{s.window}])))")


def _goodput(s: Scope, arm: str) -> str:
    # Accepted (deadline-meeting) output tokens per second of the arm's busy time: arms with different traffic
    # shares compare fairly, and only serving faster raises it. See analysis.goodput for the definition.
    accepted = f'sum(rate({R}deadline_output_tokens_total{s.sel(arm, deadline="interactive")}[{s.window}]))'
    busy = f"sum(rate({R}request_duration_seconds_sum{s.sel(arm)}[{s.window}]))"
    return f"({accepted} or vector(0)) / {busy}"


def _requests(s: Scope, arm: str) -> str:
    return f"sum(increase({R}requests_total{s.sel(arm)}[{s.window}]))"


# Per-arm SLOs: value queries for both arms, compared (absolute and relative) by the analysis.
ARM_SLOS: dict[str, Callable[[Scope, str], str]] = {
    "ttftP99": _p99("time_to_first_token_seconds"),
    "interTokenLatencyP99": _p99("inter_token_latency_seconds"),
    "errorRate": _error_rate,
    "queueTimeP99": _queue_p99,
    "goodput": _goodput,
}


def _quality_delta(s: Scope) -> tuple[str, str]:
    nll = f"{R}probe_nll_nats_total"
    value = (f"(sum(rate({nll}{s.sel('candidate', live=False)}[{s.window}])) - "
             f"sum(rate({nll}{s.sel('stable', live=False)}[{s.window}]))) / "
             f"sum(rate({R}probe_tokens_total{s.sel(live=False)}[{s.window}]))")
    count = f"sum(increase({R}compared_total{s.sel(live=False)}[{s.window}]))"
    return value, count


def _agreement(s: Scope) -> tuple[str, str]:
    value = (f"sum(rate({R}agreement_ratio_sum{s.sel(live=False)}[{s.window}])) / "
             f"sum(rate({R}agreement_ratio_count{s.sel(live=False)}[{s.window}]))")
    count = f"sum(increase({R}agreement_ratio_count{s.sel(live=False)}[{s.window}]))"
    return value, count


PAIR_SLOS: dict[str, Callable[[Scope], tuple[str, str]]] = {"qualityDelta": _quality_delta, "agreement": _agreement}


def newest_sample(source: MetricSource, scope: Scope) -> datetime | None:
    value = source.scalar(f"max(timestamp({R}requests_total{scope.sel(live=False)}))")
    return None if value is None or math.isnan(value) else datetime.fromtimestamp(value, UTC)


def _safe(source: MetricSource, promql: str) -> float | None:
    value = source.scalar(promql)
    return None if value is None or math.isnan(value) else value


def collect(source: MetricSource, scope: Scope, slos: Slos, stable_live: bool = True
            ) -> tuple[list[tuple[Sample, SloLimit | SloFloor]], datetime | None]:
    """Samples for every applicable SLO; a failing source turns into `error` samples, never an exception.

    With no live traffic on the stable arm (the last canary step at 100%), nothing can be compared with it:
    relative limits and the mirrored quality SLOs do not apply there (they were judged at every earlier step);
    absolute limits still do.
    """
    try:
        newest = newest_sample(source, scope)
        requests = {arm: _safe(source, _requests(scope, arm)) for arm in ("candidate", "stable")}
    except QueryError as exc:
        limits = _configured(slos)
        return [(Sample(name, error=exc.reason), limit) for name, limit in limits], None
    out: list[tuple[Sample, SloLimit | SloFloor]] = []
    for name, configured in _configured(slos):
        limit = configured if stable_live else _absolute_only(name, configured)
        if limit is None or (name == "queueTimeP99" and scope.candidate_traffic == "mirror"):
            continue  # mirrored requests never wait in the router's queue: nothing to judge in Shadow
        try:
            if name in ARM_SLOS:
                query = ARM_SLOS[name]
                sample = Sample(name, _safe(source, query(scope, "candidate")), _safe(source, query(scope, "stable")),
                                requests["candidate"], requests["stable"], newest=newest)
            elif name in PAIR_SLOS:
                value, count = PAIR_SLOS[name](scope)
                sample = Sample(name, _safe(source, value), None, _safe(source, count), None, newest=newest)
            else:
                custom = next(c for c in slos.custom if c.name == name)
                sample = Sample(name, *_custom(source, scope, custom), requests["candidate"], requests["stable"],
                                newest=newest)
        except QueryError as exc:
            sample = Sample(name, error=exc.reason)
        out.append((sample, limit))
    return out, newest


def target_health(source: MetricSource, scope: Scope) -> TargetHealth:
    """Prometheus' own view of the policy's router targets (its `up` series), or why it gave no answer.
    Router targets are the policy's targets without an `arm` label (engine and launcher targets carry one:
    children/monitoring.py)."""
    routers = "{" + f'namespace="{scope.namespace}",policy="{scope.policy}",arm=""' + "}"
    try:
        return TargetHealth(int(_safe(source, f"count(up{routers})") or 0),
                            int(_safe(source, f"sum(up{routers})") or 0))
    except QueryError as exc:
        return TargetHealth(0, 0, exc.reason)


@dataclass(frozen=True)
class Observation:
    """One window as Prometheus answered it: a sample per SLO, the newest sample time, the router targets' health."""

    samples: list[tuple[Sample, SloLimit | SloFloor]]
    newest: datetime | None
    targets: TargetHealth


def observe(source: MetricSource, scope: Scope, slos: Slos, stable_live: bool = True) -> Observation:
    samples, newest = collect(source, scope, slos, stable_live)
    return Observation(samples, newest, target_health(source, scope))


def _absolute_only(name: str, limit: SloLimit | SloFloor) -> SloLimit | SloFloor | None:
    if name in PAIR_SLOS:
        return None
    if isinstance(limit, SloLimit):
        return SloLimit(max=limit.max) if limit.max is not None else None
    return SloFloor(min=limit.min) if limit.min is not None else None


def substitute(query: str, arm: str, scope: Scope) -> str:
    """A custom SLO's query with its placeholders filled in (`$arm`, `$namespace`, `$policy`, `$window`)."""
    return (query.replace("$arm", arm).replace("$namespace", scope.namespace).replace("$policy", scope.policy)
            .replace("$window", scope.window))


def custom_query_refusal(query: str, namespace: str) -> str | None:
    """Why a custom SLO query may not run, or None: it must parse as PromQL, and every vector selector must carry
    an equality matcher on the policy's namespace (`namespace="$namespace"`), in each of its `or` alternatives.
    Its numbers land in the tenant's status, so a query that could read another tenant's series is refused."""
    import promql_parser

    text = substitute(query, "candidate", Scope(namespace, "policy", "60s"))
    try:
        expr = promql_parser.parse(text)
    except ValueError as exc:
        return f"not PromQL: {str(exc)[:200]}"
    unscoped: list[str] = []

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            groups = node.matchers.or_matchers or [node.matchers.matchers]
            if not all(any(m.op == promql_parser.MatchOp.Equal and m.name == "namespace" and m.value == namespace
                           for m in group) for group in groups):
                unscoped.append(str(node))
        return True

    promql_parser.walk(expr, pre_visit=visit)
    if unscoped:
        return (f'every selector must carry namespace="$namespace" (the policy\'s own namespace); '
                f"{unscoped[0][:200]} does not")
    return None


def _custom(source: MetricSource, scope: Scope, slo: CustomSlo) -> tuple[float | None, float | None]:
    # Planning refuses the policy before any window when custom_query_refusal says no: never run here unscoped.
    return _safe(source, substitute(slo.query, "candidate", scope)), _safe(source, substitute(slo.query, "stable",
                                                                                                  scope))


def _configured(slos: Slos) -> list[tuple[str, SloLimit | SloFloor]]:
    named: list[tuple[str, SloLimit | SloFloor | None]] = [
        ("ttftP99", slos.ttft_p99), ("interTokenLatencyP99", slos.inter_token_latency_p99),
        ("errorRate", slos.error_rate), ("queueTimeP99", slos.queue_time_p99),
        ("qualityDelta", slos.quality_delta), ("agreement", slos.agreement), ("goodput", slos.goodput),
    ]
    out = [(name, limit) for name, limit in named if limit is not None]
    for custom in slos.custom:
        limit: SloLimit | SloFloor = SloLimit(max=custom.max) if custom.max is not None else SloFloor(min=custom.min)
        out.append((custom.name, limit))
    return out
