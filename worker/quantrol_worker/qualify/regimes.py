"""Regime figures from per-request measurements, and the judgements on them: pure, no I/O.

Definitions (one place; the report's field names carry the units):
- a request is *accepted* when it completed without error, its TTFT is within the TTFT limit and its mean
  inter-token latency within the ITL limit (the policy's SLOs; an unset limit accepts everything);
- goodput = accepted output tokens ÷ engine-seconds, engine-seconds = the arm's engines × the run's wall time.
  Until the quality-acceptance term is measured per request (issue 19), it is not applied;
- a rate is *sustainable* when its p99 TTFT and ITL meet the limits, the admission queue's p99 wait meets the
  queue limit and at most `max_rejected_fraction` of requests were refused (429);
- *recovered* after overload: the first one-at-a-time request whose TTFT is back within 1.5 × the floor's median.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from quantrol_worker.contracts import LatencyLimits, Regime, RegimeFigures

RECOVERY_FACTOR = 1.5  # "back to floor latency": within this multiple of the floor's median TTFT
MAX_REJECTED_FRACTION = 0.01  # a rate that refuses more than this is not sustainable


@dataclass(frozen=True)
class RequestSample:
    """One request as the load generator saw it (seconds; `start` relative to the run's start)."""

    start: float
    ok: bool
    rejected: bool = False  # answered 429: backpressure, not a failure of the engine
    ttft: float | None = None
    itl: float | None = None
    output_tokens: int = 0


@dataclass(frozen=True)
class LoadRun:
    """One bounded run of the load generator at one setting."""

    requests: Sequence[RequestSample]
    seconds: float
    rate_rps: float | None = None
    queue_wait_p99: float | None = None  # from the admission router's histogram, over this run


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def accepted(sample: RequestSample, limits: LatencyLimits) -> bool:
    if not sample.ok or sample.ttft is None:
        return False
    if limits.ttft_seconds is not None and sample.ttft > limits.ttft_seconds:
        return False
    return not (limits.itl_seconds is not None and sample.itl is not None and sample.itl > limits.itl_seconds)


def figures(regime: Regime, run: LoadRun, limits: LatencyLimits, engines: int) -> RegimeFigures:
    done = [r for r in run.requests if r.ok]
    # A request cut off by the run's time bound still had its first token: a slow engine's TTFT must count.
    ttfts = [r.ttft for r in run.requests if r.ttft is not None and not r.rejected]
    itls = [r.itl for r in done if r.itl is not None]
    total = len(run.requests)
    seconds = max(run.seconds, 1e-9)
    good_tokens = sum(r.output_tokens for r in run.requests if accepted(r, limits))
    return RegimeFigures(
        regime=regime,
        rate_rps=_round(run.rate_rps),
        requests=total,
        ttft_p50_seconds=_round(percentile(ttfts, 50)),
        ttft_p99_seconds=_round(percentile(ttfts, 99)),
        itl_p50_seconds=_round(percentile(itls, 50)),
        itl_p99_seconds=_round(percentile(itls, 99)),
        output_tokens_per_second=_round(sum(r.output_tokens for r in done) / seconds),
        goodput_tokens_per_engine_second=_round(good_tokens / (seconds * max(engines, 1))),
        rejected_fraction=_round(sum(r.rejected for r in run.requests) / total) if total else None,
        queue_wait_p99_seconds=_round(run.queue_wait_p99),
    )


def judge(fig: RegimeFigures, limits: LatencyLimits, seconds: float,
          max_rejected: float = MAX_REJECTED_FRACTION) -> RegimeFigures:
    """`fig` (of a run bounded by `seconds`) with `passed` and every breached limit named (`ttftP99: 3.1 s > 2 s`).
    A run without a first token fails: no data never reads as pass."""
    failed: list[str] = []
    if fig.requests and fig.ttft_p99_seconds is None and limits.ttft_seconds is not None:
        # Not one first token within the run's time bound: the TTFT is at least that bound, a breach to name.
        failed.append(f"ttftP99: no first token within the run's {seconds:.3g} s > {limits.ttft_seconds:.3g} s")
    elif not fig.requests or fig.ttft_p99_seconds is None:
        failed.append("requests: none completed")
    checks: list[tuple[str, float | None, float | None]] = [
        ("ttftP99", fig.ttft_p99_seconds, limits.ttft_seconds),
        ("interTokenLatencyP99", fig.itl_p99_seconds, limits.itl_seconds)]
    if fig.regime is not Regime.FLOOR:  # one at a time never queues: the floor is judged on latency alone
        checks.append(("queueTimeP99", fig.queue_wait_p99_seconds, limits.queue_wait_seconds))
    for name, value, limit in checks:
        if limit is not None and value is not None and value > limit:
            failed.append(f"{name}: {value:.3g} s > {limit:.3g} s")
    if fig.regime is not Regime.FLOOR and (fig.rejected_fraction or 0) > max_rejected:
        failed.append(f"rejected: {fig.rejected_fraction:.3g} > {max_rejected:.3g} answered 429")
    return fig.model_copy(update={"passed": not failed, "failed": failed})


def next_rate(passed: list[float], failed: list[float], start: float) -> float:
    """The rate ladder: double from `start` while rates pass; after a failure, bisect between the best pass and
    the lowest failure (with no pass yet, between half the lowest failure and it)."""
    if not failed:
        return start if not passed else max(passed) * 2
    low = max(passed) if passed else min(failed) / 2
    return (low + min(failed)) / 2


def next_rung(passed: list[float], failed: list[float], start: float, rungs: int) -> float | None:
    """The next rate to run, or None when the sweep is done: `rungs` rates; when none of them was sustainable, at
    most `rungs` more, downwards, stopping at the first that is. An arm's sustainable goodput is then measured at a
    rate it sustained: without the extra rungs, two arms that both fail the first rate and are one bisection apart
    below it would read 0 × (one sustained nothing on a ladder that was too short for it)."""
    run = len(passed) + len(failed)
    if run >= 2 * rungs or (run >= rungs and passed):
        return None
    rate = round(next_rate(passed, failed, start), 3)
    return None if rate in passed or rate in failed else rate


def recovery_seconds(samples: Sequence[RequestSample], floor_ttft_p50: float | None) -> float | None:
    """Seconds from the end of the overload to the first request back within RECOVERY_FACTOR × the floor's median
    TTFT (its first token); None when none recovered within the run."""
    if floor_ttft_p50 is None:
        return None
    bound = RECOVERY_FACTOR * floor_ttft_p50 + 0.005  # 5 ms: timer noise on a fast floor
    for sample in sorted(samples, key=lambda s: s.start):
        if sample.ok and sample.ttft is not None and sample.ttft <= bound:
            return _round(sample.start + sample.ttft)
    return None


def goodput_ratio(candidate: RegimeFigures | None, stable: RegimeFigures | None) -> float | None:
    cand = candidate.goodput_tokens_per_engine_second if candidate else None
    stab = stable.goodput_tokens_per_engine_second if stable else None
    if cand is None or not stab:
        return None
    return _round(cand / stab)


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")
