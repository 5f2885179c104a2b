"""Slices, quality acceptance and quality probes for the router, from the candidate's QuantizedModel: pure.

The calibration gate judges a QuantizedModel per slice of its calibration data; online, the router must name the
same slices (a request's slice header, when it is one of them) so that the analysis judges the same slices, and
it must hold each request to a limit from the same gate. Requests without a listed header fall into prompt-length
buckets (the router's own `length_buckets`), so a regression in long prompts shows too. The probes' prompts are the
candidate artifact's evaluation prompts (the calibration Job ships them unless its QuantizedModel says not to), or a
ConfigMap the policy names; with neither, status says that quality rests on live comparison alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from quantrol_operator.api.quantizedmodel import QuantizedModelSpec
from quantrol_operator.api.servingpolicy import DEFAULT_REQUEST_KL, ProbeSource, ProbeStatus, ServingPolicySpec
from quantrol_worker.contracts import QualityLimits


@dataclass(frozen=True)
class QualityPlan:
    """What the router's comparison needs: the slice names it may use, and the per-request KL limits."""

    slices: list[str] = field(default_factory=list)
    max_request_kl: float = DEFAULT_REQUEST_KL
    slice_max_request_kl: dict[str, float] = field(default_factory=dict)


def request_kl_limit(gate: QualityLimits) -> float | None:
    """A per-request limit from a calibration gate. The gate bounds the mean KL over a whole slice; one request is
    an outlier beyond the gate's p99 bound when it has one, else beyond twice the mean bound (a request is a few
    hundred tokens: its mean scatters around the slice mean, and a limit at the mean itself would refuse half of
    a candidate that sits exactly at its gate)."""
    if gate.max_p99_kl_divergence is not None:
        return gate.max_p99_kl_divergence
    if gate.max_mean_kl_divergence is not None:
        return 2 * gate.max_mean_kl_divergence
    return None


def quality_plan(spec: ServingPolicySpec, quantized_model: Mapping[str, Any] | None) -> QualityPlan:
    """The slices and limits for the policy's candidate. `analysis.qualityAcceptance.maxRequestKl`, when set, is
    the limit for every slice; else each slice's gate decides, and the spec-level gate for the length buckets."""
    qm = _spec(quantized_model)
    override = spec.analysis.quality_acceptance.max_request_kl
    if qm is None:
        return QualityPlan(max_request_kl=override or DEFAULT_REQUEST_KL)
    slices = [s.name for s in qm.calibration.slices]
    if override is not None:
        return QualityPlan(slices=slices, max_request_kl=override)
    default = request_kl_limit(qm.quality_gate) or DEFAULT_REQUEST_KL
    per_slice = {s.name: request_kl_limit(qm.quality_gate.merged(s.quality_gate)) or default
                 for s in qm.calibration.slices}
    return QualityPlan(slices=slices, max_request_kl=default,
                       slice_max_request_kl={k: v for k, v in per_slice.items() if v != default})


LIVE_ONLY = "quality rests on live comparison alone"


def probe_source(spec: ServingPolicySpec, quantized_model: Mapping[str, Any] | None) -> ProbeStatus:
    """Where the router takes its probe prompts from, and why (the counts come from the routers, later)."""
    probes = spec.rollout.probes
    if probes.rate_per_second <= 0:
        return ProbeStatus(source=ProbeSource.NONE, message=f"rollout.probes.ratePerSecond is 0: {LIVE_ONLY}")
    if probes.config_map_ref is not None:
        return ProbeStatus(source=ProbeSource.CONFIG_MAP,
                           message=f"probe prompts from ConfigMap {probes.config_map_ref.name}")
    qm = _spec(quantized_model)
    if qm is not None and not qm.calibration.evaluation_prompts.publish:
        return ProbeStatus(source=ProbeSource.NONE, message="the QuantizedModel keeps its evaluation prompts in the "
                           f"Job (calibration.evaluationPrompts.publish false) and no ConfigMap is named: {LIVE_ONLY}")
    return ProbeStatus(source=ProbeSource.ARTIFACT, message="probe prompts from the candidate artifact's evaluation "
                       "prompts" + ("" if qm is not None else ", if it carries them (a pinned artifact may not: name a "
                                    "ConfigMap in rollout.probes.configMapRef)"))


def with_counts(status: ProbeStatus, counts: Mapping[str, float] | None) -> ProbeStatus:
    """The routers' report folded in: how many prompts each slice has; none at all is live comparison alone."""
    if counts is None or status.source is ProbeSource.NONE:
        return status
    prompts = {name: int(n) for name, n in sorted(counts.items()) if n > 0}
    message = status.message if prompts else f"the routers hold no probe prompts from the {status.source.value}: " \
        f"{LIVE_ONLY}"
    return status.model_copy(update={"prompts": prompts, "message": message})


def _spec(quantized_model: Mapping[str, Any] | None) -> QuantizedModelSpec | None:
    if quantized_model is None:
        return None
    try:
        return QuantizedModelSpec.model_validate(quantized_model.get("spec") or {})
    except ValidationError:
        return None  # its own status says what is wrong with it; the router falls back to length buckets
