"""SLO analysis: verdicts per SLO, the window verdict, and the streak counters that decide the rollout."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantrol_operator.api.servingpolicy import (
    Analysis,
    AnalysisCounters,
    Cause,
    MetricResult,
    NoJudgement,
    SloFloor,
    SloLimit,
    Verdict,
)
from quantrol_operator.rollout.analysis import (
    GoodputInputs,
    Sample,
    bounded,
    cause_of,
    decide,
    goodput,
    judge,
    saturated_together,
    window_cause,
    window_verdict,
)
from quantrol_operator.rollout.statemachine import Decision

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TTFT = SloLimit(max=2.0, max_relative_to_stable=1.2)
AGREEMENT = SloFloor(min=0.9)
GOODPUT = SloFloor(min_relative_to_stable=1.0)


def s(cand: float | None, stab: float | None = 1.0, n: float = 100, sn: float = 100, **kw: object) -> Sample:
    return Sample("ttft_p99", cand, stab, n, sn, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sample", "limit", "verdict"),
    [
        (s(1.1), TTFT, Verdict.PASS),
        (s(1.3), TTFT, Verdict.FAIL),  # above 1.2 × stable
        (s(2.5, 2.4), TTFT, Verdict.OVERLOAD),  # both arms above the absolute 2 s: load
        (s(2.5, 1.0), TTFT, Verdict.FAIL),
        (s(None), TTFT, Verdict.INCONCLUSIVE),  # no series
        (s(math.nan), TTFT, Verdict.INCONCLUSIVE),
        (s(1.0, n=5), TTFT, Verdict.INCONCLUSIVE),  # too few requests
        (s(1.0, None), TTFT, Verdict.INCONCLUSIVE),  # relative limit, nothing to compare with
        (s(1.0, error=NoJudgement.METRICS_UNREACHABLE), TTFT, Verdict.ERROR),
        (s(0.95), AGREEMENT, Verdict.PASS),
        (s(0.80, 0.99), AGREEMENT, Verdict.FAIL),
        (s(0.80, 0.85), AGREEMENT, Verdict.OVERLOAD),
        (s(110.0, 100.0), GOODPUT, Verdict.PASS),
        (s(90.0, 100.0), GOODPUT, Verdict.FAIL),  # a smaller artifact that serves fewer good tokens loses
    ],
)
def test_verdict_per_slo(sample: Sample, limit: SloLimit | SloFloor, verdict: Verdict) -> None:
    judgement = judge(sample, limit, min_samples=20)
    assert judgement.verdict is verdict, judgement.message
    assert judgement.message


def test_window_verdict_takes_the_most_severe_and_nothing_is_never_pass() -> None:
    def j(v: Verdict) -> MetricResult:
        return MetricResult(slo="x", verdict=v)

    assert window_verdict([]) is Verdict.INCONCLUSIVE
    assert window_verdict([j(Verdict.PASS), j(Verdict.INCONCLUSIVE)]) is Verdict.INCONCLUSIVE
    assert window_verdict([j(Verdict.PASS), j(Verdict.FAIL), j(Verdict.OVERLOAD)]) is Verdict.FAIL
    assert window_verdict([j(Verdict.FAIL), j(Verdict.ERROR)]) is Verdict.ERROR


POLICY = Analysis(failure_limit=3, success_streak=2, inconclusive_limit=4, error_limit=3)


def test_failures_one_below_the_limit_then_one_more_rolls_back() -> None:
    counters = AnalysisCounters()
    for i in range(2):
        decision, counters = decide(Verdict.FAIL, T0 + timedelta(seconds=i), counters, POLICY)
        assert decision is Decision.HOLD
    # The counters are what status keeps: a restarted operator resumes from them.
    resumed = AnalysisCounters.model_validate(counters.to_wire())
    decision, counters = decide(Verdict.FAIL, T0 + timedelta(seconds=5), resumed, POLICY)
    assert decision is Decision.ROLLBACK and counters.consecutive_failures == 3


def test_the_same_scrape_is_never_counted_twice() -> None:
    decision, counters = decide(Verdict.FAIL, T0, AnalysisCounters(), POLICY)
    for _ in range(10):
        decision, counters = decide(Verdict.FAIL, T0, counters, POLICY)
    assert decision is Decision.HOLD and counters.consecutive_failures == 1


def test_a_pass_streak_advances_and_a_failure_resets_it() -> None:
    _d, c = decide(Verdict.PASS, T0, AnalysisCounters(), POLICY)
    _d, c = decide(Verdict.FAIL, T0 + timedelta(seconds=1), c, POLICY)
    d, c = decide(Verdict.PASS, T0 + timedelta(seconds=2), c, POLICY)
    assert d is Decision.HOLD and c.consecutive_successes == 1
    d, c = decide(Verdict.PASS, T0 + timedelta(seconds=3), c, POLICY)
    assert d is Decision.ADVANCE


def test_the_first_window_after_a_step_cannot_advance_but_can_roll_back() -> None:
    """The cooldown: a window that still holds traffic at the previous weight proves nothing about this one."""
    c = AnalysisCounters()
    for i in range(5):
        d, c = decide(Verdict.PASS, T0 + timedelta(seconds=i), c, POLICY, after_step=False)
        assert d is Decision.HOLD and c.consecutive_successes == 0
    _d, c = decide(Verdict.FAIL, T0 + timedelta(seconds=5), c, POLICY, after_step=False)
    _d, c = decide(Verdict.PASS, T0 + timedelta(seconds=6), c, POLICY, after_step=False)
    assert c.consecutive_failures == 0  # a pass still breaks a failure streak
    for i in range(POLICY.failure_limit):
        d, c = decide(Verdict.FAIL, T0 + timedelta(seconds=7 + i), c, POLICY, after_step=False)
    assert d is Decision.ROLLBACK  # failing windows always count: safety never waits
    d, c = decide(Verdict.PASS, T0 + timedelta(seconds=20), AnalysisCounters(), POLICY, after_step=True)
    assert c.consecutive_successes == 1


def test_errors_and_silence_pause_without_touching_the_failure_count() -> None:
    c = AnalysisCounters(consecutive_failures=2)
    for _ in range(3):
        d, c = decide(Verdict.ERROR, None, c, POLICY)
    assert d is Decision.PAUSE and c.consecutive_failures == 2
    c = AnalysisCounters()
    for i in range(4):
        d, c = decide(Verdict.INCONCLUSIVE, T0 + timedelta(seconds=i), c, POLICY)
    assert d is Decision.PAUSE


verdicts = st.sampled_from(list(Verdict))


@given(st.lists(st.tuples(verdicts, st.integers(min_value=0, max_value=30)), max_size=60))
def test_no_advance_without_a_fresh_passing_window(windows: list[tuple[Verdict, int]]) -> None:
    counters = AnalysisCounters()
    for verdict, offset in windows:
        newest = T0 + timedelta(seconds=offset)
        before = counters
        decision, counters = decide(verdict, newest, counters, POLICY)
        if decision is Decision.ADVANCE:
            assert verdict is Verdict.PASS and (before.newest_sample_time is None or newest > before.newest_sample_time)
        if decision is Decision.ROLLBACK:
            assert verdict is Verdict.FAIL


@given(st.one_of(st.none(), st.just(math.nan)), st.integers(min_value=0, max_value=10_000))
def test_no_data_never_reads_as_pass(value: float | None, requests: int) -> None:
    assert judge(s(value, n=requests), TTFT, 20).verdict is not Verdict.PASS


def test_goodput_is_accepted_tokens_times_quality_acceptance_both_ways() -> None:
    inputs = GoodputInputs(output_tokens=1000.0, deadline_tokens=800.0, compared=40.0, quality_accepted=30.0,
                           engine_seconds=60.0, request_seconds=20.0)
    figures = goodput("candidate", inputs)
    assert figures.accepted_share == 0.8 and figures.quality_acceptance == 0.75
    assert figures.value == pytest.approx(800 * 0.75 / 20)  # the online SLO's: on time, good, per request-second
    assert figures.per_engine_second == pytest.approx(800 * 0.75 / 60)  # capacity, for status
    # Worse quality lowers goodput, never raises it; so does slower serving of the same tokens.
    worse = goodput("candidate", replace(inputs, quality_accepted=10.0))
    slower = goodput("candidate", replace(inputs, request_seconds=25.0))
    assert worse.value is not None and slower.value is not None and max(worse.value, slower.value) < figures.value
    # The stable arm is the quality reference; nothing compared is no quality term, not zero.
    assert goodput("stable", inputs, reference=True).value == pytest.approx(800 / 20)
    assert goodput("candidate", replace(inputs, compared=None, quality_accepted=None)).value == pytest.approx(40)
    # No tokens, no engine time: no figure, never zero or infinity.
    empty = goodput("candidate", GoodputInputs(0.0, 0.0, engine_seconds=0.0))
    assert empty.value is None and empty.per_engine_second is None


def _row(slo: str, verdict: Verdict, slice_: str | None = None) -> MetricResult:
    row = MetricResult(slo=slo, verdict=verdict, slice=slice_)
    row.cause = cause_of(row)
    return row


@pytest.mark.parametrize(
    ("rows", "why", "cause"),
    [
        ([_row("qualityDelta", Verdict.FAIL), _row("ttftP99", Verdict.PASS)], None, Cause.PRECISION),
        ([_row("qualityDelta", Verdict.FAIL, "code"), _row("ttftP99", Verdict.FAIL)], None, Cause.PRECISION),
        ([_row("ttftP99", Verdict.FAIL), _row("engineQueueTimeP99", Verdict.FAIL)], None, Cause.SCHEDULING),
        ([_row("ttftP99", Verdict.OVERLOAD), _row("errorRate", Verdict.PASS)], None, Cause.OVERLOAD),
        ([_row("ttftP99", Verdict.ERROR)], NoJudgement.METRICS_UNREACHABLE, Cause.DEPENDENCY),
        ([_row("ttftP99", Verdict.INCONCLUSIVE)], NoJudgement.TARGETS_DOWN, Cause.DEPENDENCY),
        ([_row("ttftP99", Verdict.INCONCLUSIVE)], NoJudgement.NO_SAMPLES, None),  # nobody sent traffic
        ([_row("ttftP99", Verdict.PASS)], None, None),
    ],
)
def test_a_window_names_its_cause(rows: list[MetricResult], why: NoJudgement | None, cause: Cause | None) -> None:
    assert window_cause(window_verdict(rows), rows, why) is cause


def test_one_failing_slice_fails_the_window_and_a_quiet_slice_never_passes_or_holds_it() -> None:
    overall = MetricResult(slo="qualityDelta", verdict=Verdict.PASS)
    failing = judge(Sample("qualityDelta", 0.4, None, 30, None, slice="code"), SloLimit(max=0.1), 20)
    quiet = judge(Sample("qualityDelta", 0.0, None, 3, None, slice="prose"), SloLimit(max=0.1), 20)
    assert failing.verdict is Verdict.FAIL and "slice code" in (failing.message or "")
    assert quiet.verdict is Verdict.INCONCLUSIVE and failing.cause is Cause.PRECISION
    assert window_verdict([overall, quiet]) is Verdict.PASS
    assert window_verdict([overall, quiet, failing]) is Verdict.FAIL
    # Quiet, but beyond the limit so far: the window does not pass on the aggregate while the slice cannot be judged.
    suspect = judge(Sample("qualityDelta", 0.4, None, 3, None, slice="code"), SloLimit(max=0.1), 20)
    assert suspect.verdict is Verdict.INCONCLUSIVE and suspect.suspect and "holding" in (suspect.message or "")
    assert window_verdict([overall, quiet, suspect]) is Verdict.INCONCLUSIVE
    # Status keeps every overall row and the most severe slice rows within its bound.
    rows = [overall, *(quiet.model_copy() for _ in range(70)), failing]
    kept = bounded(rows, 64)
    assert len(kept) == 64 and overall in kept and failing in kept


def test_overload_holds_for_the_hold_limit_then_steps_back_and_holds_again() -> None:
    policy = Analysis(overload_hold_seconds=60)
    c = AnalysisCounters()
    decisions = []
    for i in range(0, 100, 10):
        d, c = decide(Verdict.OVERLOAD, T0 + timedelta(seconds=i), c, policy)
        decisions.append(d)
    # Held from t=0; the window at t=60 steps back; the hold starts again at t=70 and would step back at t=130.
    assert decisions == [Decision.HOLD] * 6 + [Decision.STEP_BACK] + [Decision.HOLD] * 3
    assert c.overloaded_since == T0 + timedelta(seconds=70)
    _d, c = decide(Verdict.FAIL, T0 + timedelta(seconds=100), c, policy)
    assert c.overloaded_since == T0 + timedelta(seconds=70)  # one failing window amid the overload: still held
    _d, c = decide(Verdict.PASS, T0 + timedelta(seconds=110), c, policy)
    assert c.overloaded_since is None  # a passing window ends the hold


def test_queueing_symptoms_while_both_arms_queue_beyond_the_limit_are_overload() -> None:
    """CI once rolled back a candidate at an overload onset: both admission queues filled in one burst, the
    candidate's timed out its first requests a moment sooner (errorRate 0.39, stable 0.0 in that window) while both
    arms' queue waits were beyond the limit. Its TTFT and error rate then hold as overload; quality and slices never
    do, and without the queue overload nothing changes."""
    queue = judge(Sample("queueTimeP99", 4.97, 4.97, 100, 100), SloLimit(max=1.0), 5)
    errors = judge(Sample("errorRate", 0.39, 0.0, 100, 100), SloLimit(max=0.05), 5)
    ttft = judge(Sample("ttftP99", 6.0, 1.5, 100, 100), TTFT, 5)  # its queue timed out first
    quality = judge(Sample("agreement", 0.5, None, 100, None), AGREEMENT, 5)
    sliced = judge(Sample("errorRate", 0.5, 0.0, 100, 100, slice="code"), SloLimit(max=0.05), 5)
    assert queue.verdict is Verdict.OVERLOAD and errors.verdict is ttft.verdict is Verdict.FAIL

    held = saturated_together([queue, errors, ttft])
    assert [j.verdict for j in held] == [Verdict.OVERLOAD] * 3 and window_verdict(held) is Verdict.OVERLOAD
    assert held[1].cause is Cause.OVERLOAD and "both arms queue beyond the queue limit" in (held[1].message or "")
    assert window_cause(window_verdict(held), held, None) is Cause.OVERLOAD

    still = saturated_together([queue, errors, quality, sliced])
    assert [j.verdict for j in still] == [Verdict.OVERLOAD, Verdict.OVERLOAD, Verdict.FAIL, Verdict.FAIL]
    alone = judge(Sample("queueTimeP99", 4.97, 0.2, 100, 100), SloLimit(max=1.0), 5)  # the candidate alone queues
    assert saturated_together([alone, errors]) == [alone, errors] and window_verdict([alone, errors]) is Verdict.FAIL
