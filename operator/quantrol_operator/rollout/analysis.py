"""SLO analysis as pure functions: metric samples of one window → a verdict per SLO → a rollout decision.

No data never reads as pass: a missing series, NaN, or fewer requests than `minSampleCount` is
`inconclusive`; a failed query is `error`. When the stable arm breaks the same absolute limit in the same
window, the verdict is `overload`: the rollout holds, because the load is to blame, not the candidate.
Streak counters move only on windows that carry samples newer than the last counted one, so a short
analysis interval over a slow scrape cannot count one scrape twice. After each step the cooldown is one window:
a passing window counts toward the next step only when all of it lies after the step began (traffic at the old
weight proves nothing about the new one), while a failing window always counts (safety never waits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime

from quantrol_operator.api.servingpolicy import Analysis, NoJudgement, SloFloor, SloLimit, Verdict
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


@dataclass(frozen=True)
class Judgement:
    slo: str
    verdict: Verdict
    candidate: float | None
    stable: float | None
    limit: float | None
    message: str


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)


def judge(sample: Sample, limit: SloLimit | SloFloor, min_samples: int) -> Judgement:
    """The verdict of one SLO over one window."""
    name, cand, stab = sample.slo, sample.candidate, sample.stable

    def verdict(v: Verdict, bound: float | None, message: str) -> Judgement:
        return Judgement(name, v, cand if _usable(cand) else None, stab if _usable(stab) else None, bound, message)

    if sample.error:
        return verdict(Verdict.ERROR, None, f"no answer from Prometheus: {sample.error.value}")
    if not _usable(cand):
        return verdict(Verdict.INCONCLUSIVE, None, "no value for the candidate in the window (no series, or NaN)")
    if (sample.candidate_requests or 0) < min_samples:
        return verdict(Verdict.INCONCLUSIVE, None,
                       f"{sample.candidate_requests or 0:.0f} candidate requests in the window, {min_samples} needed")
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


def window_verdict(judgements: list[Judgement]) -> Verdict:
    """The whole window: the most severe SLO verdict; no SLO at all is inconclusive, never pass."""
    if not judgements:
        return Verdict.INCONCLUSIVE
    present = {j.verdict for j in judgements}
    return next(v for v in _SEVERITY if v in present)


@dataclass(frozen=True)
class Counters:
    failures: int = 0
    successes: int = 0
    inconclusive: int = 0
    errors: int = 0
    newest: datetime | None = None


def decide(verdict: Verdict, newest: datetime | None, counters: Counters, policy: Analysis,
           after_step: bool = True) -> tuple[Decision, Counters]:
    """Fold one window into the streak counters and say what the rollout should do. `after_step`: the whole window
    lies after the current step began; a pass from a window that does not breaks a failure streak but does not
    count toward advancing (the cooldown)."""
    if verdict is Verdict.ERROR:
        counted = replace(counters, errors=counters.errors + 1, successes=0)
        return (Decision.PAUSE if counted.errors >= policy.error_limit else Decision.HOLD), counted
    if newest is None and verdict is Verdict.INCONCLUSIVE:
        # No series at all (no traffic, or nothing scraped): each analysis pass counts as one silent window,
        # so silence ends in Paused instead of holding forever.
        counted = replace(counters, inconclusive=counters.inconclusive + 1, successes=0, errors=0)
        return (Decision.PAUSE if counted.inconclusive >= policy.inconclusive_limit else Decision.HOLD), counted
    if newest is None or (counters.newest is not None and newest <= counters.newest):
        return Decision.HOLD, counters  # nothing new since the last counted window
    fresh = replace(counters, newest=newest, errors=0)
    if verdict is Verdict.FAIL:
        counted = replace(fresh, failures=fresh.failures + 1, successes=0, inconclusive=0)
        return (Decision.ROLLBACK if counted.failures >= policy.failure_limit else Decision.HOLD), counted
    if verdict is Verdict.PASS and not after_step:
        return Decision.HOLD, replace(fresh, failures=0, inconclusive=0)
    if verdict is Verdict.PASS:
        counted = replace(fresh, successes=fresh.successes + 1, failures=0, inconclusive=0)
        return (Decision.ADVANCE if counted.successes >= policy.success_streak else Decision.HOLD), counted
    if verdict is Verdict.INCONCLUSIVE:
        counted = replace(fresh, inconclusive=fresh.inconclusive + 1, successes=0)
        return (Decision.PAUSE if counted.inconclusive >= policy.inconclusive_limit else Decision.HOLD), counted
    # OVERLOAD: the stable arm breaks the same limit; neither the candidate's fault nor a reason to advance.
    return Decision.HOLD, replace(fresh, successes=0)


def goodput(accepted_output_tokens: float, engine_seconds: float) -> float | None:
    """Goodput: accepted output tokens per engine-second (GPU-second on GPUs; per engine-second on CPU).

    Only tokens of requests that met their latency deadline (time to first token and time per output token
    within the router's deadline) *and* whose arm passed the quality check in the same window count as
    accepted. A lower-bit artifact therefore earns goodput by serving more good tokens per unit of hardware,
    never by being smaller alone. No engine time means no judgement (None), not zero and not infinity.
    """
    if engine_seconds <= 0 or not math.isfinite(accepted_output_tokens):
        return None
    return accepted_output_tokens / engine_seconds
