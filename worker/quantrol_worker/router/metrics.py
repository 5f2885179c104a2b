"""The router's Prometheus metrics (`quantrol_router_*`).

Labels: `arm` (stable / candidate), `traffic` (live / mirror / score / probe: SLO queries select `traffic="live"`
so that mirrored copies, teacher-forced scoring and evaluation-prompt probes never count as what clients got),
`slice` (see protocol.slice_label; bounded by config).

Latencies are measured at the router from the moment the request arrived, so they include admission queueing
(which is what the client feels); queueing alone is `queue_wait_seconds`. Time to first token and inter-token
latency exist for every request the engine streamed: the router streams from the engine also for non-streamed
clients and assembles their answer (protocol.assemblable says which requests it cannot assemble faithfully).

Goodput inputs: every request adds its output tokens to `output_tokens_total`, and to
`deadline_output_tokens_total{deadline=…}` when it met that configured deadline (TTFT and mean time per output
token both within bounds); the analysis side divides by engine time and applies its quality rule.
"""

from __future__ import annotations

from functools import cached_property

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Milliseconds to tens of seconds: a cached short prompt answers in ~10 ms, a long generation on a loaded CPU arm
# takes a minute.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
# Per-token gaps: vLLM decodes at 5-100 ms per token on GPUs, ~1.8 s per token for FP8 on this CPU.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Nats per token: a healthy 8-bit candidate sits around 0.001-0.05, a damaged one at whole nats.
KL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

ARM_TRAFFIC_SLICE = ("arm", "traffic", "slice")


class RouterMetrics:
    """All router metrics in one registry per router (tests run several routers in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._series: dict[tuple[str, str, str], Series] = {}
        r = self.registry
        p = "quantrol_router_"
        self.requests = Counter(p + "requests", "Requests answered, by arm", [*ARM_TRAFFIC_SLICE, "code"], registry=r)
        self.errors = Counter(
            p + "errors",
            "Failed requests by kind: upstream_5xx, upstream_4xx, upstream_connect, upstream_timeout, "
            "stream_interrupted, admission_queue_full, admission_queue_timeout, client_cancelled",
            [*ARM_TRAFFIC_SLICE, "kind"],
            registry=r,
        )
        self.duration = Histogram(
            p + "request_duration_seconds", "Arrival to last byte", ARM_TRAFFIC_SLICE, buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Arrival to first streamed token", ARM_TRAFFIC_SLICE,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds", "Gap between streamed chunks, per token in the chunk",
            ARM_TRAFFIC_SLICE, buckets=TOKEN_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds", "Per request: (duration - TTFT) / (output tokens - 1)",
            ARM_TRAFFIC_SLICE, buckets=TOKEN_BUCKETS, registry=r,
        )
        self.output_tokens = Counter(p + "output_tokens", "Output tokens", ARM_TRAFFIC_SLICE, registry=r)
        self.request_output_tokens = Histogram(
            p + "request_output_tokens", "Output tokens per request", ARM_TRAFFIC_SLICE,
            buckets=TOKEN_COUNT_BUCKETS, registry=r,
        )
        self.deadline_tokens = Counter(
            p + "deadline_output_tokens",
            "Output tokens of successful requests that met the named deadline (TTFT and TPOT); goodput's numerator",
            [*ARM_TRAFFIC_SLICE, "deadline"],
            registry=r,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds", "Time waiting for an admission slot", ["arm", "traffic"],
            buckets=QUEUE_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(p + "in_flight", "Requests holding an upstream slot", ["arm", "traffic"], registry=r)
        self.queued = Gauge(p + "queued", "Requests waiting for an admission slot", ["arm"], registry=r)
        self.shed = Counter(
            p + "shed", "Mirror, scoring and probe requests not sent: the arm had no free slot, and they never queue "
            "ahead of live traffic (load the router shed, not failures of the arm)", ["arm", "traffic"], registry=r,
        )
        self.mirrored = Counter(
            p + "mirrored", "Stable requests mirrored to the candidate, by outcome (sent, dropped_busy, "
            "dropped_admission)", ["outcome"], registry=r,
        )
        # Teacher-forced comparison (compare.py), per slice and per source of the compared request: `mirror` (a
        # stable request mirrored to the candidate) or `probe` (an evaluation prompt replayed by the router).
        # Window figures are ratios of counters, token-weighted: mean KL = rate(kl_nats) / rate(positions),
        # top-1 agreement = rate(top1_matches) / rate(positions), quality acceptance = rate(accepted) / rate(all).
        self.compared = Counter(
            p + "compared", "Compared requests, by result (accepted, rejected: quality acceptance) or why skipped, "
            "and by the request's decoding (greedy, sampled)", ["slice", "traffic", "decoding", "result"], registry=r,
        )
        self.compare_positions = Counter(
            p + "compare_positions", "Generated positions compared teacher-forced", ["slice", "traffic"], registry=r)
        self.compare_kl = Counter(
            p + "compare_kl_nats", "Approximate KL(stable ‖ candidate), summed over compared positions",
            ["slice", "traffic"], registry=r)
        self.compare_top1 = Counter(
            p + "compare_top1_matches", "Compared positions where both arms' top-1 tokens agree", ["slice", "traffic"],
            registry=r)
        self.request_kl = Histogram(
            p + "compare_request_kl_nats", "Mean KL per compared request (the quality-acceptance figure)",
            ["slice", "traffic"], buckets=KL_BUCKETS, registry=r)
        self.probe_prompts = Gauge(
            p + "probe_prompts", "Quality-probe prompts the router holds, per slice (none: quality rests on live "
            "comparison alone)", ["slice"], registry=r)
        self.score_prefill_tokens = Counter(
            p + "score_prefill_tokens", "Tokens the candidate prefilled to score stable answers: the comparison's "
            "extra cost (its requests and their time are `traffic=\"score\"` in the request series)", ["slice"],
            registry=r)
        self.weight = Gauge(p + "weight", "Live traffic weight in the applied config", ["arm"], registry=r)
        self.mirror_fraction = Gauge(p + "mirror_fraction", "Mirrored share of stable traffic", registry=r)
        self.config_version = Gauge(p + "config_version", "Version of the applied config", registry=r)
        self.config_updates = Counter(
            p + "config_updates", "Config documents offered, by source (file, admin) and result "
            "(apply, unchanged, stale, conflict, invalid)", ["source", "result"], registry=r,
        )

    def series(self, arm: str, traffic: str, slice_: str) -> Series:
        """The per-request series of one (arm, traffic, slice), looked up once and kept (see `Series`)."""
        key = (arm, traffic, slice_)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(self, arm, traffic, slice_)
        return found


class Series:
    """The labelled children one request records into, for one (arm, traffic, slice).

    prometheus_client's `labels()` validates, stringifies, locks and hashes on every call; a request touches about
    ten series, so the router resolves each once per label set instead (the set is bounded: two arms, three
    traffic kinds, the configured slices). Each child is still created on first use, as `labels()` would, so no
    series appears in /metrics before something was recorded in it. Children are never removed: holding them is
    safe.
    """

    def __init__(self, metrics: RouterMetrics, arm: str, traffic: str, slice_: str) -> None:
        self._metrics = metrics
        self._arm_traffic = (arm, traffic)
        self._labels = (arm, traffic, slice_)
        self._requests: dict[str, Counter] = {}
        self._deadline_tokens: dict[str, Counter] = {}

    @cached_property
    def duration(self) -> Histogram:
        return self._metrics.duration.labels(*self._labels)

    @cached_property
    def ttft(self) -> Histogram:
        return self._metrics.ttft.labels(*self._labels)

    @cached_property
    def itl(self) -> Histogram:
        return self._metrics.itl.labels(*self._labels)

    @cached_property
    def tpot(self) -> Histogram:
        return self._metrics.tpot.labels(*self._labels)

    @cached_property
    def output_tokens(self) -> Counter:
        return self._metrics.output_tokens.labels(*self._labels)

    @cached_property
    def request_output_tokens(self) -> Histogram:
        return self._metrics.request_output_tokens.labels(*self._labels)

    @cached_property
    def queue_wait(self) -> Histogram:
        return self._metrics.queue_wait.labels(*self._arm_traffic)

    @cached_property
    def in_flight(self) -> Gauge:
        return self._metrics.in_flight.labels(*self._arm_traffic)

    def requests(self, code: str) -> Counter:
        found = self._requests.get(code)
        if found is None:
            found = self._requests[code] = self._metrics.requests.labels(*self._labels, code)
        return found

    def deadline_tokens(self, deadline: str) -> Counter:
        found = self._deadline_tokens.get(deadline)
        if found is None:
            found = self._deadline_tokens[deadline] = self._metrics.deadline_tokens.labels(*self._labels, deadline)
        return found
