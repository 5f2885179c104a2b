"""The rollout on a real cluster, for real: a tiny model calibrated by the operator's Jobs, served by vLLM's CPU build
in real pods, judged on real Prometheus data (e2e/README.md).

1. Calibration → artifact: W8A8 and FP8_DYNAMIC QuantizedModels on target cpu-x86 become Ready, each with a
   digest-pinned artifact in the cluster's registry and a passing quality gate per slice.
2. Shadow → canary → promote: a ServingPolicy moves traffic from the bf16 baseline to W8A8 and promotes it.
3. Injected regression → rollback: the candidate becomes FP8_DYNAMIC, which passes its quality gate but really runs
   at about 1.8 s per output token on vLLM's CPU build (ARCHITECTURE.md): the latency SLOs must roll it back, with a
   machine-readable rollback record, the promoted W8A8 still serving, and the operator's rollback counter up.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from e2e.conftest import step
from quantrol_dev.demo.cluster import DEFAULT_REGISTRY, ClusterStory
from quantrol_dev.demo.story import CANDIDATES, LATENCY_SLOS, POLICY
from quantrol_operator.cli.statusview import render_quantizedmodel, render_servingpolicy

W8A8, FP8_DYNAMIC = CANDIDATES[0], CANDIDATES[1]
assert (W8A8[1], FP8_DYNAMIC[1]) == ("W8A8", "FP8_DYNAMIC")
DIGEST_REF = re.compile(r"[a-z0-9.\-]+(:[0-9]+)?/[a-z0-9._\-/]+@sha256:[0-9a-f]{64}")


def _policy_status(story: ClusterStory) -> dict[str, Any]:
    return dict(story.api.get("servingpolicies", POLICY).get("status") or {})


def _in_order(seen: list[str], wanted: list[str]) -> bool:
    rest = iter(seen)
    return all(any(phase == want for phase in rest) for want in wanted)


def test_calibration_publishes_digest_pinned_artifacts(story: ClusterStory) -> None:
    baseline = step(story, "building and publishing the tiny model", story.seed)
    assert baseline.startswith(f"oci://{DEFAULT_REGISTRY}/") and DIGEST_REF.fullmatch(baseline.removeprefix("oci://"))
    settled = step(story, "calibrating W8A8 and FP8_DYNAMIC", lambda: story.calibrate([W8A8, FP8_DYNAMIC]))
    for name, _ in (W8A8, FP8_DYNAMIC):
        obj = settled[name]
        status = obj.get("status") or {}
        assert status.get("phase") == "Ready", render_quantizedmodel(obj)
        assert DIGEST_REF.fullmatch(str((status.get("artifact") or {}).get("ref"))), render_quantizedmodel(obj)
        quality = status.get("quality") or []
        assert {q["slice"] for q in quality} == {"prose", "code"}, render_quantizedmodel(obj)
        assert all(q.get("passed") for q in quality), render_quantizedmodel(obj)


def test_w8a8_goes_through_shadow_and_canary_to_promoted(story: ClusterStory) -> None:
    if W8A8[0] not in story.artifacts:
        pytest.skip("needs the W8A8 artifact from test_calibration_publishes_digest_pinned_artifacts")

    def rollout() -> None:
        story.start_policy(W8A8[0])
        story.wait_promoted()

    step(story, "rolling W8A8 out", rollout)
    status = _policy_status(story)
    view = render_servingpolicy(story.api.get("servingpolicies", POLICY))
    assert _in_order([h.get("to") for h in status.get("history") or []], ["Shadow", "Canary", "Promoted"]), view
    assert status.get("stableArtifact") == story.artifacts[W8A8[0]], view
    assert not status.get("rollback"), view


def test_fp8_dynamic_latency_regression_rolls_back_to_w8a8(story: ClusterStory) -> None:
    if FP8_DYNAMIC[0] not in story.artifacts or _policy_status(story).get("phase") != "Promoted":
        pytest.skip("needs W8A8 promoted by test_w8a8_goes_through_shadow_and_canary_to_promoted")
    record = step(story, "rolling FP8_DYNAMIC out", lambda: story.switch_candidate(FP8_DYNAMIC[0]))
    status = _policy_status(story)
    view = render_servingpolicy(story.api.get("servingpolicies", POLICY))
    assert status.get("phase") == "RolledBack", view
    assert record.get("reason") == "SloBreach", view
    assert record.get("slo") in {*LATENCY_SLOS, "queueTimeP99", "goodput"}, view  # all slowed by 1.8 s per token
    assert record.get("candidateArtifact") in (None, story.artifacts[FP8_DYNAMIC[0]]), view
    assert status.get("stableArtifact") == story.artifacts[W8A8[0]], view
    assert (status.get("weights") or {}).get("candidate", 0) == 0, view
    rollbacks = story.operator_metric("quantrol_rollbacks_total")
    assert any('reason="SloBreach"' in labels and value >= 1 for labels, value in rollbacks.items()), rollbacks
