"""Slices and quality acceptance for the router, from the candidate's QuantizedModel: pure.

The calibration gate judges a QuantizedModel per slice of its calibration data; online, the router must name the
same slices (a request's slice header, when it is one of them) so that the analysis judges the same slices, and
it must hold each request to a limit from the same gate. Requests without a listed header fall into prompt-length
buckets (the router's own `length_buckets`), so a regression in long prompts shows too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from quantrol_operator.api.quantizedmodel import QuantizedModelSpec
from quantrol_operator.api.servingpolicy import DEFAULT_REQUEST_KL, ServingPolicySpec
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


def _spec(quantized_model: Mapping[str, Any] | None) -> QuantizedModelSpec | None:
    if quantized_model is None:
        return None
    try:
        return QuantizedModelSpec.model_validate(quantized_model.get("spec") or {})
    except ValidationError:
        return None  # its own status says what is wrong with it; the router falls back to length buckets
