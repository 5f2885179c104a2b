"""SLO analysis as pure functions: metric samples of one window → a verdict per SLO → a rollout decision.

No data never reads as pass: a missing series, NaN, or fewer requests than `minSampleCount` is
`inconclusive`; a failed query is `error`. When the stable arm breaks the same absolute limit in the same
window, the verdict is `overload`: the rollout holds, because the load is to blame, not the candidate.
Streak counters move only on windows that carry samples newer than the last counted one, so a short
analysis interval over a slow scrape cannot count one scrape twice. After each step the cooldown is one window:
a passing window counts toward the next step only when all of it lies after the step began (traffic at the old
weight proves nothing about the new one), while a failing window always counts (safety never waits).

Quality is judged over all compared requests and per slice: a slice with enough comparisons that fails fails the
window even when the aggregate passes (a regression confined to one slice is not averaged away), and the slice is
named. A slice with too few comparisons is `inconclusive` in its own row, never a pass; it does not hold the window
on its own (the aggregate, which has enough samples, must still pass), so one quiet slice cannot stall a rollout —
unless its few comparisons so far break the limit: then it holds the window (`suspect`) until it has enough to fail
or clears, so a damaged slice cannot slip through a promotion for being small.

A window that does not pass names its cause (`Cause`): dependency (nothing to judge: Prometheus or the targets
failed), overload (both arms break the same limit), precision (a quality SLO failed) or scheduling (the candidate
alone fails to serve: latency, queueing, errors, goodput, its engine's saturation). Overload holds the rollout, but
not for ever: after `overloadHoldSeconds` of overloaded windows the candidate steps back one step (never forward).
While both arms queue beyond the queue limit, the candidate's failing TTFT and error rate are that overload too
(`saturated_together`): at an onset both admission queues fill at once, and whichever arm times out its first
request a moment sooner shows 429s and long first tokens while the other shows none yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from quantrol_operator.api.servingpolicy import (
    Analysis,
    AnalysisCounters,
    Cause,
    GoodputFigures,
    MetricResult,
    NoJudgement,
    SloFloor,
    SloLimit,
    Verdict,
)
from quantrol_operator.rollout.statemachine import Decision


@dataclass(frozen=True)
class Sample:
    """One SLO's measurement over one window, for both arms."""

    slo: str
    candidate: float | None = None
    stable: float | None = None
    candidate_requests: float | None = None  # requests behind the candidate value in this window
    stable_requests: float | None = None
    error: NoJudgement | None = None  # the query failed: MetricsUnreachable or QueryFailed
    newest: datetime | None = None  # timestamp of the newest sample behind the values
    slice: str | None = None  # the slice this sample covers; None: all traffic
    source: str = "router"  # router, or engine (vLLM's own series, scraped from the arms' pods)


@dataclass(frozen=True)
class TargetHealth:
    """What Prometheus says of the policy's router targets: how many it has, and how many answered its last scrape."""

    targets: int
    up: int
    error: NoJudgement | None = None  # Prometheus did not answer the target-health queries


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)


def judge(sample: Sample, limit: SloLimit | SloFloor, min_samples: int) -> MetricResult:
    """The verdict of one SLO over one window."""
    name, cand, stab = sample.slo, sample.candidate, sample.stable

    def verdict(v: Verdict, bound: float | None, message: str) -> MetricResult:
        where = f"slice {sample.slice}: " if sample.slice else ""
        result = MetricResult(slo=name, slice=sample.slice, verdict=v, value=cand if _usable(cand) else None,
                              stable_value=stab if _usable(stab) else None, limit=bound, message=where + message)
        result.cause = cause_of(result)
        return result

    if sample.error:
        return verdict(Verdict.ERROR, None, f"no answer from Prometheus: {sample.error.value}")
    if not _usable(cand):
        return verdict(Verdict.INCONCLUSIVE, None, "no value for the candidate in the window (no series, or NaN)")
    if (sample.candidate_requests or 0) < min_samples:
        few = f"{sample.candidate_requests or 0:.0f} candidate requests in the window, {min_samples} needed"
        absolute = limit.max if isinstance(limit, SloLimit) else limit.min
        if sample.slice is not None and cand is not None and absolute is not None and (
                cand > absolute if isinstance(limit, SloLimit) else cand < absolute):
            # Too few to fail the slice, and beyond its limit so far: the window must not pass on the aggregate.
            held = verdict(Verdict.INCONCLUSIVE, absolute, f"{few}; so far beyond {absolute:g}: holding")
            held.suspect = True
            return held
        return verdict(Verdict.INCONCLUSIVE, None, few)
    assert cand is not None
    stable_known = _usable(stab) and (sample.stable_requests or 0) >= min_samples
    upper = isinstance(limit, SloLimit)
    absolute = limit.max if isinstance(limit, SloLimit) else limit.min
    ratio = limit.max_relative_to_stable if isinstance(limit, SloLimit) else limit.min_relative_to_stable

    def breaks(value: float, bound: float) -> bool:
        return value > bound if upper else value < bound

    if absolute is not None and breaks(cand, absolute):
        if stable_known and stab is not None and breaks(stab, absolute):
            return verdict(Verdict.OVERLOAD, absolute,
                           f"both arms break {absolute:g} (stable {stab:.4g}): overload, not the candidate; holding")
        return verdict(Verdict.FAIL, absolute, f"candidate {cand:.4g} breaks the limit {absolute:g}")
    if ratio is not None:
        if not stable_known or stab is None:
            return verdict(Verdict.INCONCLUSIVE, None, "no stable-arm value to compare against")
        bound = ratio * stab
        if breaks(cand, bound):
            return verdict(Verdict.FAIL, bound, f"candidate {cand:.4g} vs {ratio:g} × stable {stab:.4g} = {bound:.4g}")
        return verdict(Verdict.PASS, bound, f"candidate {cand:.4g} within {ratio:g} × stable {stab:.4g}")
    return verdict(Verdict.PASS, absolute, f"candidate {cand:.4g} within {absolute:g}")


_SEVERITY = (Verdict.ERROR, Verdict.FAIL, Verdict.OVERLOAD, Verdict.INCONCLUSIVE, Verdict.PASS)
QUALITY_SLOS = ("qualityDelta", "agreement")  # judged on compared pairs; their failure is a precision problem
# Why-no-judgement reasons that are a failed dependency; NoSamples is nobody sending traffic, not a failure.
DEPENDENCY_FAILURES = frozenset(NoJudgement) - {NoJudgement.NO_SAMPLES}


def cause_of(result: MetricResult) -> Cause | None:
    """One row's cause: what its verdict says about the candidate."""
    if result.verdict is Verdict.ERROR:
        return Cause.DEPENDENCY
    if result.verdict is Verdict.OVERLOAD:
        return Cause.OVERLOAD
    if result.verdict is Verdict.FAIL:
        return Cause.PRECISION if result.slo in QUALITY_SLOS else Cause.SCHEDULING
    return None


def window_cause(verdict: Verdict, judgements: list[MetricResult], why: NoJudgement | None) -> Cause | None:
    """The window's cause: a failed dependency first (nothing else can be trusted then), else the cause of the
    rows that decided its verdict, precision before scheduling (a wrong answer matters more than a slow one)."""
    if verdict is Verdict.PASS:
        return None
    if verdict is Verdict.ERROR or why in DEPENDENCY_FAILURES:
        return Cause.DEPENDENCY
    causes = {cause_of(j) for j in judgements if j.verdict is verdict}
    return next((c for c in (Cause.PRECISION, Cause.SCHEDULING, Cause.OVERLOAD) if c in causes), None)


# What a full admission queue shows besides its own wait: first tokens late by the wait, 429s once waits time out.
QUEUEING_SYMPTOMS = ("ttftP99", "errorRate")


def saturated_together(judgements: list[MetricResult]) -> list[MetricResult]:
    """The rows with the candidate's failing queueing symptoms (all traffic) judged as overload when both arms queue
    beyond the queue limit in the same window (queueTimeP99 is `overload`). Which arm's queue times out its first
    request is a matter of milliseconds when one burst fills both; counted as the candidate's failures, that race
    would roll back a candidate the load broke. Held as overload, the rollout never advances and steps back after
    the hold; quality rows and slices are never excused."""
    queue = next((j for j in judgements if j.slo == "queueTimeP99" and j.slice is None), None)
    if queue is None or queue.verdict is not Verdict.OVERLOAD:
        return judgements
    return [j.model_copy(update={
        "verdict": Verdict.OVERLOAD, "cause": Cause.OVERLOAD,
        "message": f"{j.message}, while both arms queue beyond the queue limit ({queue.message}): holding"})
        if j.slo in QUEUEING_SYMPTOMS and j.slice is None and j.verdict is Verdict.FAIL else j for j in judgements]


METRICS_IN_STATUS = 64  # AnalysisRun.metrics' bound


def bounded(judgements: list[MetricResult], limit: int = METRICS_IN_STATUS) -> list[MetricResult]:
    """The rows status keeps: every all-traffic row, then slice rows most severe first, up to `limit`, in their
    original order (so a failing slice is never the one cut)."""
    overall = [j for j in judgements if j.slice is None]
    ranked = sorted((j for j in judgements if j.slice is not None), key=lambda j: _SEVERITY.index(j.verdict))
    keep = {id(j) for j in overall + ranked[:max(0, limit - len(overall))]}
    return [j for j in judgements if id(j) in keep][:limit]


def window_verdict(judgements: list[MetricResult]) -> Verdict:
    """The whole window: the most severe SLO verdict; no SLO at all is inconclusive, never pass. A slice's row
    counts when it failed; a slice too quiet to judge holds the window only when its few samples break the limit
    (module docstring)."""
    counted = [j for j in judgements if j.slice is None or j.verdict in (Verdict.FAIL, Verdict.ERROR) or j.suspect]
    if not counted:
        return Verdict.INCONCLUSIVE
    present = {j.verdict for j in counted}
    return next(v for v in _SEVERITY if v in present)


def no_judgement(samples: list[Sample], targets: TargetHealth) -> NoJudgement:
    """Why a window that judged nothing could not judge, from Prometheus' own answers (not guessed).

    A failed query says it first (unreachable, or an error answer). Otherwise Prometheus' target health for the
    policy's routers decides: no router target at all, targets that all failed their last scrape, targets that
    answer while only the engines' series are missing, or targets that answer but carry too few requests.
    """
    failed = next((s.error for s in samples if s.error is not None), None)
    if failed is not None:
        return failed
    if targets.error is not None:
        return targets.error
    if targets.targets == 0:
        return NoJudgement.NO_TARGETS
    if targets.up == 0:
        return NoJudgement.TARGETS_DOWN
    silent = [s for s in samples if s.slice is None and not _usable(s.candidate)]
    if silent and all(s.source == "engine" for s in silent):
        return NoJudgement.NO_ENGINE_SERIES
    return NoJudgement.NO_SAMPLES


def decide(verdict: Verdict, newest: datetime | None, counters: AnalysisCounters, policy: Analysis,
           after_step: bool = True) -> tuple[Decision, AnalysisCounters]:
    """Fold one window into the streak counters (kept in status, so a restart resumes them) and say what the rollout
    should do. `after_step`: the whole window lies after the current step began; a pass from a window that does not
    breaks a failure streak but does not count toward advancing (the cooldown)."""
    def counted(**changes: object) -> AnalysisCounters:
        return counters.model_copy(update=changes)

    if verdict is Verdict.ERROR:
        c = counted(consecutive_errors=counters.consecutive_errors + 1, consecutive_successes=0)
        return (Decision.PAUSE if c.consecutive_errors >= policy.error_limit else Decision.HOLD), c
    if newest is None and verdict is Verdict.INCONCLUSIVE:
        # No series at all (no traffic, or nothing scraped): each analysis pass counts as one silent window,
        # so silence ends in Paused instead of holding forever.
        c = counted(consecutive_inconclusive=counters.consecutive_inconclusive + 1, consecutive_successes=0,
                    consecutive_errors=0)
        return (Decision.PAUSE if c.consecutive_inconclusive >= policy.inconclusive_limit else Decision.HOLD), c
    last = counters.newest_sample_time
    if newest is None or (last is not None and newest <= last):
        return Decision.HOLD, counters  # nothing new since the last counted window
    fresh: dict[str, object] = {"newest_sample_time": newest, "consecutive_errors": 0}
    if verdict is Verdict.PASS:
        fresh["overloaded_since"] = None  # only a passing window ends an overload hold: a failing or quiet one
        # amid the overload is not the load going away
    if verdict is Verdict.FAIL:
        c = counted(**fresh, consecutive_failures=counters.consecutive_failures + 1, consecutive_successes=0,
                    consecutive_inconclusive=0)
        return (Decision.ROLLBACK if c.consecutive_failures >= policy.failure_limit else Decision.HOLD), c
    if verdict is Verdict.PASS and not after_step:
        return Decision.HOLD, counted(**fresh, consecutive_failures=0, consecutive_inconclusive=0)
    if verdict is Verdict.PASS:
        c = counted(**fresh, consecutive_successes=counters.consecutive_successes + 1, consecutive_failures=0,
                    consecutive_inconclusive=0)
        return (Decision.ADVANCE if c.consecutive_successes >= policy.success_streak else Decision.HOLD), c
    if verdict is Verdict.INCONCLUSIVE:
        c = counted(**fresh, consecutive_inconclusive=counters.consecutive_inconclusive + 1, consecutive_successes=0)
        return (Decision.PAUSE if c.consecutive_inconclusive >= policy.inconclusive_limit else Decision.HOLD), c
    # OVERLOAD: the stable arm breaks the same limit; neither the candidate's fault nor a reason to advance. Held
    # for at most overloadHoldSeconds (of sample time), then one step back, and the hold starts again.
    since = counters.overloaded_since or newest
    if (newest - since).total_seconds() >= policy.overload_hold_seconds:
        return Decision.STEP_BACK, counted(**fresh, consecutive_successes=0, overloaded_since=None)
    return Decision.HOLD, counted(**fresh, consecutive_successes=0, overloaded_since=since)


@dataclass(frozen=True)
class GoodputInputs:
    """One arm's window as the router counted it (None: no series)."""

    output_tokens: float | None  # every output token the arm sent
    deadline_tokens: float | None  # those of requests within the deadlines the policy's latency SLOs set
    compared: float | None = None  # requests compared with the stable arm, teacher-forced (candidate only)
    quality_accepted: float | None = None  # of which quality-accepted
    engine_seconds: float = 0.0  # replicas × engine slots (GPUs, or 1 per CPU engine) × window
    request_seconds: float | None = None  # the arm's requests' durations, summed (arrival to last byte)


def goodput(arm: str, inputs: GoodputInputs, reference: bool = False) -> GoodputFigures:
    """Goodput, the one definition: accepted output tokens × quality acceptance, per engine-second.

    Accepted tokens are those of requests that met the deadlines derived from the policy's TTFT and inter-token
    SLOs; quality acceptance is the share of compared requests quality-accepted (router/compare.py), 1 for the
    stable arm, which is the reference (and for a candidate nothing was compared with in the window). A lower-bit
    artifact therefore earns goodput by serving more good tokens per unit of hardware, never by being smaller alone.

    Two figures: `per_engine_second` is capacity, fair only at matched load (qualification compares it). Online the
    arms carry unequal shares of the traffic, so the goodput SLO decides on `value`: accepted tokens × quality
    acceptance per second of the arm's request time, that is the accepted share × quality acceptance × output
    tokens per request-second — on time, good and per-token speed at once, whatever share each arm carries. No
    tokens, or no time, is no figure (None), never zero and never infinity.
    """
    acceptance = 1.0 if reference else _share(inputs.quality_accepted, inputs.compared)
    share = _share(inputs.deadline_tokens, inputs.output_tokens)
    quality = 1.0 if acceptance is None else acceptance
    accepted = inputs.deadline_tokens if inputs.deadline_tokens is not None and math.isfinite(
        inputs.deadline_tokens) else None
    return GoodputFigures(arm=arm, accepted_share=share, quality_acceptance=acceptance,
                          value=_per(accepted, quality, inputs.request_seconds),
                          per_engine_second=_per(accepted, quality, inputs.engine_seconds))


def _per(tokens: float | None, quality: float, seconds: float | None) -> float | None:
    if tokens is None or seconds is None or not (seconds > 0) or not math.isfinite(seconds):
        return None
    return tokens * quality / seconds


def _share(part: float | None, whole: float | None) -> float | None:
    if part is None or whole is None or not (whole > 0) or not math.isfinite(part):
        return None
    return min(1.0, max(0.0, part / whole))
