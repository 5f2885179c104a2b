"""QuantizedModel: "make this lower-precision artifact, and prove it is good enough"."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from quantrol_operator.api.base import ApiModel, CrossFieldRule, StatusModel
from quantrol_operator.api.common import (
    API_VERSION,
    CONDITIONS_LIST_MAP,
    NAME_RULE,
    BaseModelUri,
    Condition,
    DigestPinnedRef,
    DnsLabel,
    ImageRef,
    LocalObjectReference,
    ModelUri,
    Resources,
    Toleration,
)

# The scheme/method/target vocabulary is the worker's contract; the API re-exports it so both speak one language.
# Quality per slice and the experiment envelope are the worker's report models: one definition for the report and
# for the status that quotes it.
from quantrol_worker.contracts import (  # the gate's limits too: the worker applies exactly what the spec says
    METHODS_BY_SCHEME,
    WEIGHT_ONLY_INT_SCHEMES,
    EvaluationPromptsPolicy,
    ExperimentEnvelope,
    KvCacheScheme,
    Method,
    QualityLimits,
    Scheme,
    SliceQuality,
    Target,
    default_quality_gate,
)

KIND = "QuantizedModel"
PLURAL = "quantizedmodels"


class QuantizedModelPhase(StrEnum):
    PENDING = "Pending"
    CALIBRATING = "Calibrating"
    EVALUATING = "Evaluating"
    PUBLISHING = "Publishing"
    READY = "Ready"
    REJECTED = "Rejected"  # the quality gate or the kernel pre-check said no; evidence kept in status
    FAILED = "Failed"  # an error (bad input, job failure, deadline): the condition says which field or why


class BaseModelSource(ApiModel):
    uri: BaseModelUri = Field(
        description="Higher-precision model: hf://org/name@revision (the revision is required), "
        "oci://registry/repo@sha256:…, pvc://claim/path, s3://bucket/prefix or file:///path (local use)."
    )


def _method_fits_scheme(q: Quantization) -> bool:
    return q.method in METHODS_BY_SCHEME[q.scheme]


def _group_size_only_weight_only(q: Quantization) -> bool:
    return q.group_size is None or q.scheme in WEIGHT_ONLY_INT_SCHEMES


_METHOD_RULE_CEL = " || ".join(
    f"(self.scheme == '{scheme.value}' && self.method in [{', '.join(repr(m.value) for m in sorted(methods))}])"
    for scheme, methods in METHODS_BY_SCHEME.items()
)


class Quantization(ApiModel):
    scheme: Scheme = Field(description="Quantization scheme (compressed-tensors preset).")
    method: Method = Field(
        default=Method.GPTQ, description="Algorithm: rtn, gptq, awq or smoothquant+gptq (W8A8 only)."
    )
    group_size: int | None = Field(
        default=None,
        ge=16,
        le=1024,
        description="Weight group size; only for weight-only integer schemes (W4A16, W4A16_ASYM, W8A16). "
        "Default 128.",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=256,
        description="Layers (names or re:regex) kept in high precision.",
    )
    sensitivity_scan: bool = Field(
        default=False, description="Also keep in high precision the layers whose quantization hurts most. Not built "
        "yet: true is refused (list the layers in `ignore` instead)."
    )
    kv_cache_scheme: KvCacheScheme = Field(default=KvCacheScheme.NONE)
    target: Target = Field(default=Target.CUDA_SM90, description="Hardware the artifact will be served on.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="!has(self.groupSize) || self.scheme in ['W4A16', 'W4A16_ASYM', 'W8A16']",
            message="groupSize applies only to weight-only integer schemes (W4A16, W4A16_ASYM, W8A16)",
            check=_group_size_only_weight_only,
            field_path=".groupSize",
        ),
        CrossFieldRule(
            cel="!has(self.sensitivityScan) || !self.sensitivityScan",
            message="sensitivityScan is not built yet: list the layers to keep in high precision in ignore",
            check=lambda q: not q.sensitivity_scan,
            field_path=".sensitivityScan",
        ),
        CrossFieldRule(
            cel=_METHOD_RULE_CEL,
            message="method does not fit scheme: FP8_DYNAMIC takes rtn; smoothquant+gptq is for W8A8; "
            "awq is for W4A16 and W4A16_ASYM",
            check=_method_fits_scheme,
            field_path=".method",
        ),
    )


class Slice(ApiModel):
    """A named part of the calibration data (a workload), measured and gated on its own."""

    name: DnsLabel
    samples: int = Field(default=64, ge=1, le=100_000, description="Calibration samples from this slice.")
    eval_samples: int = Field(default=32, ge=1, le=100_000, description="Held-out samples to evaluate.")
    quality_gate: QualityLimits | None = Field(
        default=None, description="Overrides spec.qualityGate for this slice, field by field."
    )


class ConfigMapKeyRef(ApiModel):
    name: DnsLabel
    key: str = Field(max_length=253)


class CalibrationData(ApiModel):
    uri: ModelUri | None = Field(default=None, description="JSONL with `text` or `messages`, and `slice`.")
    config_map_ref: ConfigMapKeyRef | None = Field(default=None, description="JSONL in a ConfigMap key.")
    max_sequence_length: int = Field(default=2048, ge=16, le=1_048_576)
    seed: int = Field(default=0, ge=0)
    slices: list[Slice] = Field(min_length=1, max_length=64)
    evaluation_prompts: EvaluationPromptsPolicy = Field(
        default_factory=EvaluationPromptsPolicy,
        description="The held-out prompts per slice, redacted, shipped in the artifact for serving's golden-output "
        "check and quality probes (they are this calibration data: publish false keeps them in the Job).",
    )

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="has(self.uri) != has(self.configMapRef)",
            message="set exactly one of uri and configMapRef",
            check=lambda c: (c.uri is None) != (c.config_map_ref is None),
        ),
        CrossFieldRule(
            cel="self.slices.all(a, self.slices.exists_one(b, b.name == a.name))",
            message="slice names must be unique",
            check=lambda c: len({s.name for s in c.slices}) == len(c.slices),
            field_path=".slices",
        ),
    )


class CalibrationJob(ApiModel):
    image: ImageRef | None = Field(default=None, description="Worker image; the operator's default when unset "
                                   "(the install policy may restrict which images a tenant may name).")
    gpus: int = Field(default=1, ge=0, le=64, description="nvidia.com/gpu requested by the Job's pod.")
    resources: Resources | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    active_deadline_seconds: int = Field(default=3600, ge=60)
    backoff_limit: int = Field(default=0, ge=0, le=10)
    service_account_name: DnsLabel | None = None


class ArtifactRepository(ApiModel):
    repository: str = Field(
        pattern=r"^[a-z0-9.\-]+(:[0-9]+)?/[a-z0-9._\-/]+$",
        max_length=512,
        description="OCI repository the artifact is pushed to, e.g. registry.example.com/models/llama-8b-w4a16.",
    )
    insecure: bool = Field(default=False, description="Plain HTTP (local registries only).")
    credentials_secret_ref: LocalObjectReference | None = Field(
        default=None, description="Not used yet (registry credentials arrive with their issue): refused when set.")

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="!has(self.credentialsSecretRef)",
            message="credentialsSecretRef is not used yet: the registry must accept anonymous push and pull for now",
            check=lambda a: a.credentials_secret_ref is None,
            field_path=".credentialsSecretRef",
        ),
    )


class QuantizedModelSpec(ApiModel):
    base_model: BaseModelSource
    quantization: Quantization
    calibration: CalibrationData
    quality_gate: QualityLimits = Field(
        default_factory=default_quality_gate,
        description="Per-slice limits against the baseline (each slice may override).",
    )
    job: CalibrationJob = Field(default_factory=CalibrationJob)
    artifact: ArtifactRepository


class Artifact(StatusModel):
    ref: DigestPinnedRef | None = Field(default=None, description="repo@sha256:… of the published artifact.")
    short_digest: str | None = Field(default=None, description="First 12 hex digits, for printer columns.")
    size_bytes: int | None = None
    format: str | None = Field(default=None, description="e.g. compressed-tensors.")


class QuantizedModelStatus(StatusModel):
    phase: QuantizedModelPhase = QuantizedModelPhase.PENDING
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST_MAP)
    message: str | None = None
    job_name: str | None = None
    artifact: Artifact | None = None
    quality: list[SliceQuality] = Field(default_factory=list, max_length=64)
    envelope: ExperimentEnvelope | None = None


class QuantizedModel(ApiModel):
    api_version: str = Field(default=API_VERSION)
    kind: str = Field(default=KIND)
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: QuantizedModelSpec
    status: QuantizedModelStatus | None = None

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (NAME_RULE,)
