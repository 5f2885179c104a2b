"""PromQL for every SLO, per arm, over the analysis window, and the metric-source protocol that runs it.

Latency and error SLOs read the router's `traffic="live"` series, so mirrored and probe traffic never
count. Series carry `namespace` and `policy` labels from the scrape configuration (PodMonitor relabelling
on a cluster, file_sd labels in the local stack); on router series `arm` is the router's role label (stable,
candidate), on engine series (vLLM's own `vllm:*`) it is the arm's short digest (children/monitoring.py), which
`Scope.engines` maps each role to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from quantrol_operator.api.servingpolicy import (
    CustomSlo,
    GoodputFigures,
    NoJudgement,
    RequestMix,
    SloFloor,
    SloLimit,
    Slos,
)
from quantrol_operator.rollout.analysis import QUALITY_SLOS, GoodputInputs, Sample, TargetHealth, goodput
from quantrol_worker.router.config import INTERACTIVE

R = "quantrol_router_"


class QueryError(Exception):
    """The metric source could not answer: the verdict is `error`, never pass. `reason` says which way it failed
    (MetricsUnreachable or QueryFailed); the message (for the operator's log, never for status) says more."""

    def __init__(self, message: str, reason: NoJudgement = NoJudgement.QUERY_FAILED) -> None:
        super().__init__(message)
        self.reason = reason


MAX_SERIES = 64  # a vector answer is cut to this many series: slices are bounded by the router's config anyway


class MetricSource(Protocol):
    def scalar(self, promql: str) -> float | None:
        """One value, or None when the result is empty. Raises QueryError."""
        ...

    def by_label(self, promql: str, label: str) -> dict[str, float]:
        """One value per series, keyed by the series' `label` (at most MAX_SERIES). Raises QueryError."""
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
    engines: dict[str, str] = field(default_factory=dict)  # role (stable, candidate) → its engines' `arm` label
    batch_slots: int = 0  # maxNumSeqs × replicas: what one arm's engines can run at once
    engine_slots: float = 0.0  # replicas × engine slots (GPUs, or 1 per CPU engine), per arm
    window_seconds: int = 0

    def engine_sel(self, role: str) -> str:
        """The selector of one arm's engine series (its pods' scrape labels)."""
        digest = self.engines.get(role, "")
        return "{" + f'namespace="{self.namespace}",policy="{self.policy}",arm="{digest}"' + "}"

    def sel(self, arm: str | None = None, live: bool = True, matching: dict[str, str] | None = None,
            excluding: dict[str, str] | None = None, **extra: str) -> str:
        """The label selector of the policy's series: `extra` labels equal, `matching` labels match a regex,
        `excluding` labels differ."""
        labels = {"namespace": self.namespace, "policy": self.policy, **extra}
        if arm:
            labels["arm"] = arm
        if live:
            labels["traffic"] = self.candidate_traffic if arm == "candidate" else "live"
        pairs = [f'{k}="{v}"' for k, v in labels.items()] + [f'{k}=~"{v}"' for k, v in (matching or {}).items()]
        pairs += [f'{k}!="{v}"' for k, v in (excluding or {}).items()]
        return "{" + ",".join(pairs) + "}"


def _p99(metric: str) -> Callable[[Scope, str], str]:
    return lambda s, arm: f"histogram_quantile(0.99, sum by (le) (rate({R}{metric}_bucket{s.sel(arm)}[{s.window}])))"


def _error_rate(s: Scope, arm: str) -> str:
    # A client that hung up (499) chose to: users stop streamed answers all the time, and a slow arm's share of
    # them is the latency SLOs' to judge. Counted, it would make the error rate a measure of the users.
    errors = f"sum(rate({R}errors_total{s.sel(arm, excluding={'kind': 'client_cancelled'})}[{s.window}]))"
    requests = f"sum(rate({R}requests_total{s.sel(arm)}[{s.window}]))"
    return f"({errors} or vector(0)) / {requests}"


def _queue_p99(s: Scope, arm: str) -> str:
    return (f"histogram_quantile(0.99, sum by (le) (rate({R}queue_wait_seconds_bucket"
            f"{s.sel(arm)}[{s.window}])))")




def goodput_inputs(source: MetricSource, s: Scope, arm: str) -> GoodputInputs:
    """One arm's goodput counts in the window (analysis.goodput has the definition)."""
    def increase(metric: str, selector: str) -> float | None:
        return _safe(source, f"sum(increase({R}{metric}{selector}[{s.window}]))")

    deadline = increase("deadline_output_tokens_total", s.sel(arm, deadline=INTERACTIVE))
    inputs = GoodputInputs(output_tokens=increase("output_tokens_total", s.sel(arm)),
                           deadline_tokens=deadline if deadline is not None else 0.0,
                           engine_seconds=s.engine_slots * s.window_seconds,
                           request_seconds=increase("request_duration_seconds_sum", s.sel(arm)))
    if arm != "candidate":
        return inputs
    return replace(inputs, compared=increase("compared_total", s.sel(live=False,
                                                                     matching={"result": "accepted|rejected"})),
                   quality_accepted=increase("compared_total", s.sel(live=False, result="accepted")))


def _engine_p99(s: Scope, arm: str) -> str:
    return f"histogram_quantile(0.99, sum by (le) (rate(vllm:request_queue_time_seconds_bucket{s.engine_sel(arm)}" \
           f"[{s.window}])))"


def _engine_waiting(s: Scope, arm: str) -> str:
    return f"sum(avg_over_time(vllm:num_requests_waiting{s.engine_sel(arm)}[{s.window}]))"


def _batch_occupancy(s: Scope, arm: str) -> str:
    return f"sum(avg_over_time(vllm:num_requests_running{s.engine_sel(arm)}[{s.window}])) / {max(1, s.batch_slots)}"


def _kv_cache_usage(s: Scope, arm: str) -> str:
    return f"max(max_over_time(vllm:kv_cache_usage_perc{s.engine_sel(arm)}[{s.window}]))"


def _preemption_rate(s: Scope, arm: str) -> str:
    return f"sum(rate(vllm:num_preemptions_total{s.engine_sel(arm)}[{s.window}]))"


# The engines' own signals, per arm (vLLM's series, names as vLLM CPU 0.32 exports them).
ENGINE_SLOS: dict[str, Callable[[Scope, str], str]] = {
    "engineQueueTimeP99": _engine_p99, "engineWaiting": _engine_waiting, "batchOccupancy": _batch_occupancy,
    "kvCacheUsage": _kv_cache_usage, "preemptionRate": _preemption_rate,
}


def _requests(s: Scope, arm: str) -> str:
    return f"sum(increase({R}requests_total{s.sel(arm)}[{s.window}]))"


# Per-arm SLOs: value queries for both arms, compared (absolute and relative) by the analysis.
ARM_SLOS: dict[str, Callable[[Scope, str], str]] = {
    "ttftP99": _p99("time_to_first_token_seconds"),
    "interTokenLatencyP99": _p99("inter_token_latency_seconds"),
    "errorRate": _error_rate,
    "queueTimeP99": _queue_p99,
    **ENGINE_SLOS,
}


def _compared(s: Scope, by: str) -> str:
    """Compared requests in the window (accepted or rejected; skipped ones compared nothing)."""
    return f"sum{by} (increase({R}compared_total{s.sel(live=False, matching={'result': 'accepted|rejected'})}" \
           f"[{s.window}]))"


def _quality_delta(s: Scope, by: str = "") -> tuple[str, str]:
    """Mean teacher-forced KL over the window, token-weighted (router/compare.py has the definition)."""
    value = (f"sum{by} (rate({R}compare_kl_nats_total{s.sel(live=False)}[{s.window}])) / "
             f"sum{by} (rate({R}compare_positions_total{s.sel(live=False)}[{s.window}]))")
    return value, _compared(s, by)


def _agreement(s: Scope, by: str = "") -> tuple[str, str]:
    """Top-1 agreement of the two arms' distributions over the window, token-weighted."""
    value = (f"sum{by} (rate({R}compare_top1_matches_total{s.sel(live=False)}[{s.window}])) / "
             f"sum{by} (rate({R}compare_positions_total{s.sel(live=False)}[{s.window}]))")
    return value, _compared(s, by)


# Quality SLOs compare the two arms on the same requests (mirrored ones and probes): one value, judged over all
# compared requests and per slice.
PAIR_SLOS: dict[str, Callable[..., tuple[str, str]]] = dict(zip(QUALITY_SLOS, (_quality_delta, _agreement),
                                                                strict=True))


def _per_slice(source: MetricSource, scope: Scope, name: str, newest: datetime | None) -> list[Sample]:
    value, count = PAIR_SLOS[name](scope, " by (slice)")
    values, counts = source.by_label(value, "slice"), source.by_label(count, "slice")
    return [Sample(name, _finite(values.get(slice_)), None, n, None, newest=newest, slice=slice_)
            for slice_, n in sorted(counts.items()) if n > 0]


def newest_sample(source: MetricSource, scope: Scope) -> datetime | None:
    value = source.scalar(f"max(timestamp({R}requests_total{scope.sel(live=False)}))")
    return None if value is None or math.isnan(value) else datetime.fromtimestamp(value, UTC)


def _safe(source: MetricSource, promql: str) -> float | None:
    return _finite(source.scalar(promql))


def _finite(value: float | None) -> float | None:
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
            found = _samples(source, scope, slos, name, requests, newest)
        except QueryError as exc:
            found = [Sample(name, error=exc.reason)]
        out.extend((sample, limit) for sample in found)
    return out, newest


def _samples(source: MetricSource, scope: Scope, slos: Slos, name: str, requests: dict[str, float | None],
             newest: datetime | None) -> list[Sample]:
    """One SLO's samples: both arms' values, or (quality) the compared pairs overall and then per slice."""
    if name in ARM_SLOS:
        query = ARM_SLOS[name]
        return [Sample(name, _safe(source, query(scope, "candidate")), _safe(source, query(scope, "stable")),
                       requests["candidate"], requests["stable"], newest=newest,
                       source="engine" if name in ENGINE_SLOS else "router")]
    if name == "goodput":
        figures = observe_goodput(source, scope)
        return [Sample(name, figures[0].value, figures[1].value, requests["candidate"], requests["stable"],
                       newest=newest)]
    if name in PAIR_SLOS:
        value, count = PAIR_SLOS[name](scope)
        overall = Sample(name, _safe(source, value), None, _safe(source, count), None, newest=newest)
        return [overall, *_per_slice(source, scope, name, newest)]
    custom = next(c for c in slos.custom if c.name == name)
    return [Sample(name, *_custom(source, scope, custom), requests["candidate"], requests["stable"], newest=newest)]


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


def observe_goodput(source: MetricSource, scope: Scope) -> list[GoodputFigures]:
    """Both arms' goodput figures, candidate first (the stable arm is the quality reference)."""
    return [goodput(arm, goodput_inputs(source, scope, arm), reference=arm == "stable")
            for arm in ("candidate", "stable")]


@dataclass(frozen=True)
class Observation:
    """One window as Prometheus answered it: a sample per SLO, the newest sample time, the router targets' health,
    and both arms' goodput figures (for status; the goodput SLO's sample carries what decides)."""

    samples: list[tuple[Sample, SloLimit | SloFloor]]
    newest: datetime | None
    targets: TargetHealth
    goodput: list[GoodputFigures] = field(default_factory=list)
    probe_prompts: dict[str, float] | None = None  # per slice, as the routers report them; None: not known
    mix: RequestMix | None = None


def observe(source: MetricSource, scope: Scope, slos: Slos, stable_live: bool = True) -> Observation:
    samples, newest = collect(source, scope, slos, stable_live)
    figures: list[GoodputFigures] = []
    prompts: dict[str, float] | None = None
    mix = None
    try:
        if newest is not None:
            figures = observe_goodput(source, scope)
            prompts = source.by_label(f"max by (slice) ({R}probe_prompts{scope.sel(live=False)})", "slice")
            mix = request_mix(source, scope)
    except QueryError:
        pass  # the samples say so already; these figures are for status only
    return Observation(samples, newest, target_health(source, scope), figures, prompts, mix)


def request_mix(source: MetricSource, scope: Scope) -> RequestMix:
    """Requests per slice in the window (live and mirrored, both arms) and compared requests by decoding."""
    served = scope.sel(live=False, matching={"traffic": "live|mirror"})
    slices = source.by_label(f"sum by (slice) (increase({R}requests_total{served}[{scope.window}]))", "slice")
    compared = scope.sel(live=False, matching={"result": "accepted|rejected"})
    decoding = source.by_label(f"sum by (decoding) (increase({R}compared_total{compared}[{scope.window}]))",
                               "decoding")
    return RequestMix(slices={k: round(v) for k, v in slices.items() if v >= 0.5},
                      decoding={k: round(v) for k, v in decoding.items() if v >= 0.5})


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
        ("engineQueueTimeP99", slos.engine_queue_time_p99), ("engineWaiting", slos.engine_waiting),
        ("batchOccupancy", slos.batch_occupancy), ("kvCacheUsage", slos.kv_cache_usage),
        ("preemptionRate", slos.preemption_rate),
    ]
    out = [(name, limit) for name, limit in named if limit is not None]
    for custom in slos.custom:
        limit: SloLimit | SloFloor = SloLimit(max=custom.max) if custom.max is not None else SloFloor(min=custom.min)
        out.append((custom.name, limit))
    return out
