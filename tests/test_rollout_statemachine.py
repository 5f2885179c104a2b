"""The rollout state machine: table-driven cases and properties over arbitrary sequences of facts."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantrol_operator.api.servingpolicy import RolloutPhase as P
from quantrol_operator.rollout.statemachine import (
    TRANSITIONS,
    Decision,
    Facts,
    Qualified,
    TransitionReason,
    step,
    weights_for,
)
from quantrol_worker.contracts import KernelVerdict

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
STEPS = (5, 25, 50, 100)


def facts(**kw: object) -> Facts:
    base = Facts(now=T0 + timedelta(hours=1), phase_since=T0, steps=STEPS, shadow_seconds=60,
                 dwell_seconds=(60, 60, 60, 0), candidate_pinned=True, stable_ready=True, candidate_ready=True,
                 kernel=KernelVerdict.NATIVE)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("phase", "index", "kw", "expected"),
    [
        (P.PENDING, None, {}, (P.QUALIFYING, None, TransitionReason.ARMS_READY)),
        (P.PENDING, None, {"qualify": False}, (P.SHADOW, None, TransitionReason.QUALIFICATION_SKIPPED)),
        (P.PENDING, None, {"qualified": Qualified.PASSED}, (P.QUALIFYING, None, TransitionReason.ARMS_READY)),
        (P.QUALIFYING, None, {}, (P.QUALIFYING, None, None)),
        (P.QUALIFYING, None, {"decision": Decision.ADVANCE}, (P.QUALIFYING, None, None)),  # no traffic to judge
        (P.QUALIFYING, None, {"qualified": Qualified.PASSED}, (P.SHADOW, None, TransitionReason.QUALIFIED)),
        (P.QUALIFYING, None, {"qualified": Qualified.PASSED, "candidate_ready": False}, (P.QUALIFYING, None, None)),
        (P.QUALIFYING, None, {"qualified": Qualified.FAILED},
         (P.ROLLED_BACK, None, TransitionReason.QUALIFICATION_FAILED)),
        (P.QUALIFYING, None, {"qualified": Qualified.GOLDEN_MISMATCH},
         (P.ROLLED_BACK, None, TransitionReason.GOLDEN_OUTPUT_MISMATCH)),
        (P.QUALIFYING, None, {"qualified": Qualified.ERROR},
         (P.PAUSED, None, TransitionReason.QUALIFICATION_INCOMPLETE)),
        (P.QUALIFYING, None, {"kernel": KernelVerdict.NONE},
         (P.ROLLED_BACK, None, TransitionReason.KERNEL_UNAVAILABLE)),
        (P.QUALIFYING, None, {"candidate_failed": True}, (P.ROLLED_BACK, None, TransitionReason.CANDIDATE_FAILED)),
        (P.QUALIFYING, None, {"qualified": Qualified.PASSED, "paused_annotation": True},
         (P.PAUSED, None, TransitionReason.PAUSED_BY_USER)),
        (P.QUALIFYING, None, {"rollback_requested": True}, (P.ROLLED_BACK, None, TransitionReason.MANUAL_ROLLBACK)),
        (P.PAUSED, None, {"paused_by_user": True, "paused_from": P.QUALIFYING},
         (P.QUALIFYING, None, TransitionReason.RESUMED)),
        (P.PENDING, None, {"candidate_ready": False}, (P.PENDING, None, None)),
        (P.PENDING, None, {"kernel": KernelVerdict.UNKNOWN}, (P.PENDING, None, None)),
        (P.PENDING, None, {"candidate_pinned": False}, (P.PENDING, None, None)),
        (P.PENDING, None, {"kernel": KernelVerdict.NONE}, (P.ROLLED_BACK, None, TransitionReason.KERNEL_UNAVAILABLE)),
        (P.PENDING, None, {"kernel": KernelVerdict.FALLBACK}, (P.ROLLED_BACK, None, TransitionReason.KERNEL_FALLBACK)),
        (P.PENDING, None, {"kernel": KernelVerdict.FALLBACK, "enforce_kernels": False}, (P.QUALIFYING, None,
                                                                                        TransitionReason.ARMS_READY)),
        (P.SHADOW, None, {"decision": Decision.ADVANCE}, (P.CANARY, 0, TransitionReason.SHADOW_PASSED)),
        (P.SHADOW, None, {"decision": Decision.ADVANCE, "now": T0 + timedelta(seconds=30)}, (P.SHADOW, None, None)),
        (P.SHADOW, None, {"decision": Decision.HOLD}, (P.SHADOW, None, None)),
        (P.SHADOW, None, {"decision": Decision.ROLLBACK}, (P.ROLLED_BACK, None, TransitionReason.SLO_BREACH)),
        (P.SHADOW, None, {"decision": Decision.PAUSE}, (P.PAUSED, None, TransitionReason.ANALYSIS_CANNOT_JUDGE)),
        (P.CANARY, 0, {"decision": Decision.ADVANCE}, (P.CANARY, 1, TransitionReason.STEP_PASSED)),
        (P.CANARY, 3, {"decision": Decision.ADVANCE}, (P.PROMOTED, None, TransitionReason.PROMOTED)),
        (P.CANARY, 2, {"decision": Decision.ROLLBACK}, (P.ROLLED_BACK, None, TransitionReason.SLO_BREACH)),
        (P.CANARY, 2, {"decision": Decision.PAUSE}, (P.PAUSED, 2, TransitionReason.ANALYSIS_CANNOT_JUDGE)),
        (P.CANARY, 1, {"paused_annotation": True}, (P.PAUSED, 1, TransitionReason.PAUSED_BY_USER)),
        (P.PAUSED, 1, {"paused_by_user": True, "paused_from": P.CANARY}, (P.CANARY, 1, TransitionReason.RESUMED)),
        (P.PAUSED, 1, {"paused_by_user": True, "paused_annotation": True}, (P.PAUSED, 1, None)),
        (P.CANARY, 1, {"rollback_requested": True}, (P.ROLLED_BACK, None, TransitionReason.MANUAL_ROLLBACK)),
        (P.CANARY, 1, {"candidate_failed": True}, (P.ROLLED_BACK, None, TransitionReason.CANDIDATE_FAILED)),
        (P.ROLLED_BACK, None, {"decision": Decision.ADVANCE}, (P.ROLLED_BACK, None, None)),
        (P.CANARY, 2, {"decision": Decision.STEP_BACK}, (P.CANARY, 1, TransitionReason.OVERLOAD_STEP_BACK)),
        (P.CANARY, 0, {"decision": Decision.STEP_BACK}, (P.SHADOW, None, TransitionReason.OVERLOAD_STEP_BACK)),
        (P.SHADOW, None, {"decision": Decision.STEP_BACK}, (P.SHADOW, None, None)),  # nothing below: it holds
        (P.PROMOTED, None, {"guarding": True, "decision": Decision.ROLLBACK},
         (P.ROLLED_BACK, None, TransitionReason.SLO_BREACH)),
        (P.PROMOTED, None, {"guarding": True, "rollback_requested": True},
         (P.ROLLED_BACK, None, TransitionReason.MANUAL_ROLLBACK)),
        (P.PROMOTED, None, {"decision": Decision.ROLLBACK}, (P.PROMOTED, None, None)),  # no guard: settled
        (P.PROMOTED, None, {"rollback_requested": True}, (P.PROMOTED, None, None)),
        (P.PROMOTED, None, {"guard_over": True}, (P.PROMOTED, None, TransitionReason.GUARD_PASSED)),
        (P.ROLLED_BACK, None, {"retry_requested": True}, (P.PENDING, None, TransitionReason.RETRY)),
        (P.ROLLED_BACK, None, {"new_candidate": True}, (P.PENDING, None, TransitionReason.NEW_CANDIDATE)),
        (P.ROLLED_BACK, None, {"spec_changed": True}, (P.PENDING, None, TransitionReason.SPEC_CHANGED)),
        (P.FAILED, None, {"spec_changed": True}, (P.PENDING, None, TransitionReason.SPEC_CHANGED)),
        (P.CANARY, 1, {"spec_changed": True}, (P.CANARY, 1, None)),  # mid-rollout an edit changes no phase
        (P.PROMOTED, None, {"spec_changed": True}, (P.PROMOTED, None, None)),
        (P.CANARY, 2, {"new_candidate": True}, (P.PENDING, None, TransitionReason.NEW_CANDIDATE)),
        (P.PROMOTED, None, {"decision": Decision.ROLLBACK}, (P.PROMOTED, None, None)),
    ],
)
def test_transition_table(phase: P, index: int | None, kw: dict[str, object],
                          expected: tuple[P, int | None, TransitionReason | None]) -> None:
    result = step(phase, index, facts(**kw))
    assert (result.phase, result.step, result.reason) == expected


def test_every_row_documents_its_guard() -> None:
    assert all(row.doc for row in TRANSITIONS)
    assert len({row.reason for row in TRANSITIONS}) >= 12


@pytest.mark.parametrize(("phase", "index", "expected"), [
    (P.PENDING, None, (100, 0, 0.0)), (P.SHADOW, None, (100, 0, 0.2)), (P.CANARY, 0, (95, 5, 0.2)),
    (P.CANARY, 3, (0, 100, 0.0)), (P.PROMOTED, None, (100, 0, 0.0)), (P.ROLLED_BACK, None, (100, 0, 0.0)),
])
def test_weights_come_from_the_spec(phase: P, index: int | None, expected: tuple[int, int, float]) -> None:
    w = weights_for(phase, index, STEPS, 0.2)
    assert (w.stable, w.candidate, w.mirror_fraction) == expected


fact_updates = st.fixed_dictionaries(
    {},
    optional={
        "decision": st.sampled_from(Decision),
        "kernel": st.sampled_from(KernelVerdict),
        "candidate_ready": st.booleans(),
        "stable_ready": st.booleans(),
        "candidate_failed": st.booleans(),
        "paused_annotation": st.booleans(),
        "retry_requested": st.booleans(),
        "rollback_requested": st.booleans(),
        "new_candidate": st.booleans(),
        "spec_changed": st.booleans(),
        "qualify": st.booleans(),
        "qualified": st.sampled_from(Qualified),
        "elapsed": st.integers(min_value=0, max_value=200),
    },
)


def _run(updates: list[dict[str, object]], steps: tuple[int, ...]) -> list[tuple[P, int | None, TransitionReason | None,
                                                                                  Facts]]:
    phase, index, since, paused_from = P.PENDING, None, T0, None
    trail = []
    for upd in updates:
        kw = dict(upd)
        elapsed = int(kw.pop("elapsed", 0))  # type: ignore[call-overload]
        f = facts(steps=steps, dwell_seconds=tuple(30 for _ in steps), phase_since=since,
                  now=since + timedelta(seconds=elapsed), paused_from=paused_from,
                  paused_by_user=paused_from is not None, **kw)
        result = step(phase, index, f)
        trail.append((result.phase, result.step, result.reason, f))
        if result.reason is not None:
            if result.phase is P.PAUSED and phase is not P.PAUSED:
                paused_from = phase if result.reason is TransitionReason.PAUSED_BY_USER else None
            elif result.phase is not P.PAUSED:
                paused_from = None
            phase, index, since = result.phase, result.step, f.now
    return trail


steps_strategy = st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=5, unique=True).map(
    lambda ws: tuple(sorted(ws))
)


@settings(max_examples=300)
@given(st.lists(fact_updates, max_size=40), steps_strategy)
def test_promotion_only_through_every_step_with_passing_analysis(updates: list[dict[str, object]],
                                                                 steps: tuple[int, ...]) -> None:
    trail = _run(updates, steps)
    for i, (phase, _index, reason, f) in enumerate(trail):
        if reason is TransitionReason.PROMOTED:
            assert f.decision is Decision.ADVANCE
            # Walk back: every canary step was entered, in order, since the last restart from Pending.
            entered = []
            for prev_phase, prev_index, prev_reason, _f in reversed(trail[:i]):
                if prev_reason in (TransitionReason.RETRY, TransitionReason.NEW_CANDIDATE) and prev_phase is P.PENDING:
                    break
                advanced = (TransitionReason.SHADOW_PASSED, TransitionReason.STEP_PASSED)
                if prev_phase is P.CANARY and prev_reason in advanced:
                    entered.append(prev_index)
            assert list(reversed(entered))[-len(steps):] == list(range(len(steps)))
            assert phase is P.PROMOTED


@settings(max_examples=300)
@given(st.lists(fact_updates, max_size=40), steps_strategy)
def test_weights_only_take_values_the_spec_lists(updates: list[dict[str, object]], steps: tuple[int, ...]) -> None:
    allowed = {0, *steps}
    for phase, index, _reason, _f in _run(updates, steps):
        w = weights_for(phase, index, steps, 0.1)
        assert w.candidate in allowed and w.stable + w.candidate == 100


@settings(max_examples=300)
@given(st.lists(fact_updates, max_size=40), steps_strategy)
def test_rolled_back_is_absorbing_until_retry_new_candidate_or_spec_change(updates: list[dict[str, object]],
                                                               steps: tuple[int, ...]) -> None:
    trail = _run(updates, steps)
    for (prev, _pi, _pr, _pf), (phase, _i, reason, _f) in itertools.pairwise(trail):
        if prev is P.ROLLED_BACK and phase is not P.ROLLED_BACK:
            assert reason in (TransitionReason.RETRY, TransitionReason.NEW_CANDIDATE, TransitionReason.SPEC_CHANGED)


@settings(max_examples=300)
@given(st.lists(fact_updates, max_size=40), steps_strategy)
def test_no_traffic_before_qualification_passed_or_was_skipped(updates: list[dict[str, object]],
                                                              steps: tuple[int, ...]) -> None:
    """The candidate's first traffic (Shadow) comes only from a passed qualification, or one the spec skipped."""
    trail = _run(updates, steps)
    for (prev, _pi, _pr, _pf), (phase, _i, reason, f) in itertools.pairwise([(P.PENDING, None, None, None),
                                                                              *trail]):
        if phase is P.SHADOW and prev is not P.SHADOW:
            assert reason in (TransitionReason.QUALIFIED, TransitionReason.QUALIFICATION_SKIPPED,
                              TransitionReason.RESUMED), reason
            if reason is TransitionReason.QUALIFIED:
                assert f.qualified is Qualified.PASSED and prev is P.QUALIFYING
            if reason is TransitionReason.QUALIFICATION_SKIPPED:
                assert not f.qualify


def test_a_healthy_run_walks_every_step_to_promotion() -> None:
    trail = _run([{"decision": Decision.ADVANCE, "elapsed": 100, "qualified": Qualified.PASSED}] * 8, STEPS)
    assert [(p, i) for p, i, _r, _f in trail] == [
        (P.QUALIFYING, None), (P.SHADOW, None), (P.CANARY, 0), (P.CANARY, 1), (P.CANARY, 2), (P.CANARY, 3),
        (P.PROMOTED, None), (P.PROMOTED, None),
    ]
    # And the property above is not vacuous: the same run is what it inspects.
    assert any(r is TransitionReason.PROMOTED for _p, _i, r, _f in trail)
