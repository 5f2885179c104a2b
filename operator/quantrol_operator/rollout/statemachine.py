"""The ServingPolicy rollout as one state machine with a visible transition table.

    Pending → Qualifying → Shadow → Canary(step 0..n-1) → Promoted (guarded for promotionGraceSeconds) → Promoted
    Pending → Shadow when spec.qualification.enabled is false (status.qualification says Skipped)
    Qualifying → RolledBack (QualificationFailed, GoldenOutputMismatch: refused before any traffic)
    Qualifying → Paused (the qualification Job could not measure)
    any live phase → RolledBack (SLO breach, kernel refusal, candidate failure, manual); a guarded Promoted too
    Canary(step k) → Canary(step k-1), or Shadow from step 0 (overloaded longer than the hold limit)
    live phases ⇄ Paused (annotation, or analysis that cannot judge)
    RolledBack / Failed / Promoted / Paused → Pending (retry annotation, or a new candidate digest)
    RolledBack / Failed → Pending (any spec change: Git says something new, so the rollout is judged again)

`step()` is pure: (phase, step index, facts observed now) → the next phase, step and the reason. Rows are
tried in order and the first whose guard holds wins, so precedence is the order of `TRANSITIONS`.
Weights are a function of (phase, step) only (`weights_for`), so they can only take the values the spec lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from quantrol_operator.api.servingpolicy import RollbackReason, Weights
from quantrol_operator.api.servingpolicy import RolloutPhase as P
from quantrol_worker.contracts import KernelVerdict


class Decision(StrEnum):
    """What the SLO analysis concludes over its streak counters (see analysis.py)."""

    ADVANCE = "advance"  # success streak reached: the step may move on once its dwell time is over
    HOLD = "hold"  # keep the current weights and keep measuring
    ROLLBACK = "rollback"  # failure limit reached
    PAUSE = "pause"  # inconclusive or query-error limit reached: a human must look; never promote
    STEP_BACK = "step-back"  # both arms overloaded for longer than the hold limit: one canary step back


class Qualified(StrEnum):
    """Where the candidate's qualification stands (the Job's report, read by the planner)."""

    RUNNING = "running"  # not finished, or not started yet
    PASSED = "passed"
    FAILED = "failed"  # a regime's SLO or the goodput ratio: QualificationFailed
    GOLDEN_MISMATCH = "golden-mismatch"  # the engine does not compute what calibration measured
    ERROR = "error"  # the Job ended without a verdict


class TransitionReason(StrEnum):
    """Why a transition happened; machine-readable, shown in status history and Events."""

    CANDIDATE_PINNED = "CandidatePinned"
    ARMS_READY = "ArmsReady"
    QUALIFICATION_SKIPPED = "QualificationSkipped"
    QUALIFIED = "Qualified"
    QUALIFICATION_FAILED = "QualificationFailed"
    GOLDEN_OUTPUT_MISMATCH = "GoldenOutputMismatch"
    QUALIFICATION_INCOMPLETE = "QualificationIncomplete"
    SHADOW_PASSED = "ShadowPassed"
    STEP_PASSED = "StepPassed"
    PROMOTED = "Promoted"
    SLO_BREACH = "SloBreach"
    KERNEL_UNAVAILABLE = "KernelUnavailable"
    KERNEL_FALLBACK = "KernelFallback"
    CANDIDATE_FAILED = "CandidateFailed"
    MANUAL_ROLLBACK = "ManualRollback"
    PAUSED_BY_USER = "PausedByUser"
    ANALYSIS_CANNOT_JUDGE = "AnalysisCannotJudge"
    RESUMED = "Resumed"
    RETRY = "Retry"
    NEW_CANDIDATE = "NewCandidate"
    SPEC_CHANGED = "SpecChanged"
    OVERLOAD_STEP_BACK = "OverloadStepBack"
    GUARD_PASSED = "GuardPassed"


@dataclass(frozen=True)
class Facts:
    """Everything a transition may depend on, observed for this pass (plain values, no I/O)."""

    now: datetime
    phase_since: datetime
    steps: tuple[int, ...]  # the spec's canary weights, strictly increasing
    shadow_seconds: int
    dwell_seconds: tuple[int, ...]  # per canary step
    candidate_pinned: bool = False  # a qualified candidate digest is pinned in status
    stable_ready: bool = False
    candidate_ready: bool = False
    candidate_failed: bool = False  # the candidate arm cannot run (crash loop, fetch refused the digest)
    kernel: KernelVerdict = KernelVerdict.UNKNOWN  # the launcher's report; unknown until it reported
    enforce_kernels: bool = True
    qualify: bool = True  # spec.qualification.enabled
    qualified: Qualified = Qualified.RUNNING
    decision: Decision = Decision.HOLD
    paused_annotation: bool = False
    paused_from: P | None = None  # the live phase a user pause interrupted
    paused_by_user: bool = False
    retry_requested: bool = False  # the retry annotation has a value not yet handled
    rollback_requested: bool = False  # the rollback annotation has a value not yet handled
    new_candidate: bool = False  # the desired candidate digest differs from the pinned one
    spec_changed: bool = False  # metadata.generation is newer than the one the last pass handled
    guarding: bool = False  # Promoted, within promotionGraceSeconds: the previous stable arm is warm, analysis runs
    guard_over: bool = False  # Promoted, and the guard's time is up

    def dwell_over(self, phase: P, step: int | None) -> bool:
        needed = self.shadow_seconds if phase is P.SHADOW else self.dwell_seconds[step or 0]
        return (self.now - self.phase_since).total_seconds() >= needed


LIVE = frozenset({P.PENDING, P.QUALIFYING, P.SHADOW, P.CANARY})
SETTLED = frozenset({P.PROMOTED, P.ROLLED_BACK, P.FAILED})
CANDIDATE_SERVING = frozenset({P.SHADOW, P.CANARY})
CANDIDATE_UP = CANDIDATE_SERVING | {P.PENDING, P.QUALIFYING}  # the candidate arm runs (traffic or not)


@dataclass(frozen=True)
class TransitionRule:
    """One row of the transition table: from `source`, when `guard` holds, go to `target` for `reason`."""

    source: frozenset[P]
    guard: Callable[[Facts, P, int | None], bool]
    target: Callable[[Facts, P, int | None], tuple[P, int | None]]
    reason: TransitionReason
    doc: str
    rollback: RollbackReason | None = None  # rows that roll back say why, in the rollback record's words


def _to(phase: P, step: int | None = None) -> Callable[[Facts, P, int | None], tuple[P, int | None]]:
    return lambda _f, _p, _s: (phase, step)


def _next_step(f: Facts, _p: P, s: int | None) -> tuple[P, int | None]:
    nxt = 0 if s is None else s + 1
    return (P.PROMOTED, None) if nxt >= len(f.steps) else (P.CANARY, nxt)


def _is_last(f: Facts, s: int | None) -> bool:
    return s is not None and s + 1 >= len(f.steps)


def _resume(f: Facts, _p: P, s: int | None) -> tuple[P, int | None]:
    return (f.paused_from or P.PENDING, s)


def _step_back(_f: Facts, _p: P, s: int | None) -> tuple[P, int | None]:
    return (P.CANARY, s - 1) if s else (P.SHADOW, None)


def _arms_verified(f: Facts) -> bool:
    return (f.candidate_pinned and f.stable_ready and f.candidate_ready
            and f.kernel in (KernelVerdict.NATIVE, KernelVerdict.FALLBACK))


ANY = frozenset(P)

TRANSITIONS: tuple[TransitionRule, ...] = (
    TransitionRule(LIVE | {P.PAUSED}, lambda f, p, s: f.rollback_requested, _to(P.ROLLED_BACK),
         TransitionReason.MANUAL_ROLLBACK, "the rollback annotation got a new value: all traffic to stable now",
         RollbackReason.MANUAL),
    TransitionRule(frozenset({P.PROMOTED}), lambda f, p, s: f.guarding and f.rollback_requested, _to(P.ROLLED_BACK),
         TransitionReason.MANUAL_ROLLBACK, "the rollback annotation got a new value during the promotion guard: all "
         "traffic back to the previous stable arm, still warm", RollbackReason.MANUAL),
    TransitionRule(SETTLED | {P.PAUSED}, lambda f, p, s: f.retry_requested, _to(P.PENDING),
         TransitionReason.RETRY, "the retry annotation got a new value: start again from Pending"),
    TransitionRule(ANY - {P.PENDING}, lambda f, p, s: f.new_candidate, _to(P.PENDING),
         TransitionReason.NEW_CANDIDATE, "a new candidate digest: withdraw the current one, start again"),
    # A candidate refused before it had a digest (its QuantizedModel rejected) cannot arrive as a new digest; an
    # edited SLO deserves a new judgement too. Settled phases only: mid-rollout, edits apply to the next window.
    TransitionRule(frozenset({P.ROLLED_BACK, P.FAILED}), lambda f, p, s: f.spec_changed, _to(P.PENDING),
         TransitionReason.SPEC_CHANGED, "the spec changed since the rollout settled: start again from Pending"),
    TransitionRule(CANDIDATE_UP, lambda f, p, s: f.kernel is KernelVerdict.NONE, _to(P.ROLLED_BACK),
         TransitionReason.KERNEL_UNAVAILABLE, "the candidate's scheme has no kernel on this hardware",
         RollbackReason.KERNEL_UNAVAILABLE),
    TransitionRule(CANDIDATE_UP,
         lambda f, p, s: f.kernel is KernelVerdict.FALLBACK and f.enforce_kernels, _to(P.ROLLED_BACK),
         TransitionReason.KERNEL_FALLBACK, "kernelPolicy enforce: a fallback kernel is refused",
         RollbackReason.KERNEL_FALLBACK),
    TransitionRule(CANDIDATE_UP, lambda f, p, s: f.candidate_failed, _to(P.ROLLED_BACK),
         TransitionReason.CANDIDATE_FAILED, "the candidate arm cannot run", RollbackReason.CANDIDATE_FAILED),
    TransitionRule(LIVE, lambda f, p, s: f.paused_annotation, _to(P.PAUSED),
         TransitionReason.PAUSED_BY_USER, "the paused annotation is set: hold the current weights"),
    TransitionRule(frozenset({P.PAUSED}), lambda f, p, s: f.paused_by_user and not f.paused_annotation, _resume,
         TransitionReason.RESUMED, "the paused annotation was removed: continue where the rollout stood"),
    TransitionRule(CANDIDATE_SERVING, lambda f, p, s: f.decision is Decision.ROLLBACK, _to(P.ROLLED_BACK),
         TransitionReason.SLO_BREACH, "the analysis reached its failure limit", RollbackReason.SLO_BREACH),
    TransitionRule(frozenset({P.PROMOTED}), lambda f, p, s: f.guarding and f.decision is Decision.ROLLBACK,
         _to(P.ROLLED_BACK), TransitionReason.SLO_BREACH, "the analysis reached its failure limit during the promotion "
         "guard: all traffic back to the previous stable arm, still warm", RollbackReason.SLO_BREACH),
    TransitionRule(frozenset({P.PROMOTED}), lambda f, p, s: f.guard_over, _to(P.PROMOTED),
         TransitionReason.GUARD_PASSED, "the promotion guard ended without a breach: the previous stable arm is "
         "scaled down"),
    TransitionRule(frozenset({P.CANARY}), lambda f, p, s: f.decision is Decision.STEP_BACK, _step_back,
         TransitionReason.OVERLOAD_STEP_BACK, "both arms overloaded for longer than overloadHoldSeconds: the "
         "candidate steps back one step (never forward)"),
    TransitionRule(CANDIDATE_SERVING, lambda f, p, s: f.decision is Decision.PAUSE, _to(P.PAUSED),
         TransitionReason.ANALYSIS_CANNOT_JUDGE, "no judgement possible (no data, or metrics unreachable): hold"),
    TransitionRule(frozenset({P.PENDING}), lambda f, p, s: _arms_verified(f) and f.qualify, _to(P.QUALIFYING),
         TransitionReason.ARMS_READY, "both arms ready and the candidate's kernels verified: qualify it on the "
         "target before any traffic"),
    TransitionRule(frozenset({P.PENDING}), lambda f, p, s: _arms_verified(f) and not f.qualify, _to(P.SHADOW),
         TransitionReason.QUALIFICATION_SKIPPED, "both arms ready and the candidate's kernels verified; "
         "spec.qualification.enabled is false: to Shadow unmeasured"),
    TransitionRule(frozenset({P.QUALIFYING}), lambda f, p, s: f.qualified is Qualified.GOLDEN_MISMATCH,
         _to(P.ROLLED_BACK), TransitionReason.GOLDEN_OUTPUT_MISMATCH, "the candidate engine does not reproduce "
         "the quality calibration measured on the artifact's evaluation prompts",
         RollbackReason.GOLDEN_OUTPUT_MISMATCH),
    TransitionRule(frozenset({P.QUALIFYING}), lambda f, p, s: f.qualified is Qualified.FAILED, _to(P.ROLLED_BACK),
         TransitionReason.QUALIFICATION_FAILED, "the candidate failed qualification on the target",
         RollbackReason.QUALIFICATION_FAILED),
    TransitionRule(frozenset({P.QUALIFYING}), lambda f, p, s: f.qualified is Qualified.ERROR, _to(P.PAUSED),
         TransitionReason.QUALIFICATION_INCOMPLETE, "the qualification Job ended without a verdict: hold (the "
         "retry annotation runs it again)"),
    TransitionRule(frozenset({P.QUALIFYING}), lambda f, p, s: f.qualified is Qualified.PASSED and f.candidate_ready,
         _to(P.SHADOW), TransitionReason.QUALIFIED, "qualified on the target: every regime and the golden-output "
         "check passed"),
    TransitionRule(frozenset({P.SHADOW}),
         lambda f, p, s: f.decision is Decision.ADVANCE and f.dwell_over(p, s) and f.candidate_ready,
         _next_step, TransitionReason.SHADOW_PASSED, "shadow analysis passed for the shadow duration"),
    TransitionRule(frozenset({P.CANARY}),
         lambda f, p, s: f.decision is Decision.ADVANCE and f.dwell_over(p, s) and not _is_last(f, s),
         _next_step, TransitionReason.STEP_PASSED, "this step's analysis passed for its minimum dwell"),
    TransitionRule(frozenset({P.CANARY}),
         lambda f, p, s: f.decision is Decision.ADVANCE and f.dwell_over(p, s) and _is_last(f, s),
         _next_step, TransitionReason.PROMOTED, "the last step passed: the candidate becomes the stable arm"),
)


@dataclass(frozen=True)
class Step:
    phase: P
    step: int | None
    reason: TransitionReason | None  # None: no transition this pass
    doc: str = ""
    rollback: RollbackReason | None = None


def step(phase: P, index: int | None, facts: Facts) -> Step:
    for row in TRANSITIONS:
        if phase in row.source and row.guard(facts, phase, index):
            target, target_step = row.target(facts, phase, index)
            if target is P.PAUSED:
                target_step = index  # a pause keeps the step it interrupted
            return Step(target, target_step, row.reason, row.doc, row.rollback)
    return Step(phase, index, None)


def weights_for(phase: P, index: int | None, steps: tuple[int, ...], mirror_fraction: float,
                held: Weights | None = None) -> Weights:
    """Traffic for a phase. A pause holds what was live (`held`); everything else comes from the spec."""
    if phase is P.SHADOW:
        return Weights(stable=100, candidate=0, mirror_fraction=mirror_fraction)
    if phase is P.CANARY and index is not None:
        # Mirroring goes on during the canary: the stable share keeps feeding the quality comparison.
        return Weights(stable=100 - steps[index], candidate=steps[index],
                       mirror_fraction=mirror_fraction if steps[index] < 100 else 0.0)
    # Promoted: the candidate's artifact *is* the stable arm now (status.stableArtifact moved), so "stable"
    # gets everything; RolledBack, Failed and Pending send everything to stable too.
    if phase is P.PAUSED and held is not None:
        return held
    return Weights(stable=100, candidate=0, mirror_fraction=0.0)
