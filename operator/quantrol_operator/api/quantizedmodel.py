"""QuantizedModel: "make this lower-precision artifact, and prove it is good enough"."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import Field

from quantrol_operator.api.base import ApiModel, CrossFieldRule, StatusModel
from quantrol_operator.api.common import (
    API_VERSION,
    CONDITIONS_LIST_MAP,
    GPU_RESOURCE,
    NAME_RULE,
    BaseModelUri,
    Condition,
    DataUri,
    DigestPinnedRef,
    DnsLabel,
    ImageRef,
    LocalObjectReference,
    Resources,
    Toleration,
    uri_rules,
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


class HuggingFaceCache(ApiModel):
    """A Hugging Face hub cache on a PersistentVolumeClaim, read offline: the worker never downloads from a hub."""

    claim_name: DnsLabel = Field(description="PersistentVolumeClaim in this namespace holding the cache (read-only).")
    sub_path: str = Field(
        default="", max_length=512, pattern=r"^([A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*)?$",
        description="Folder of the hub cache inside the claim (what HF_HUB_CACHE names, e.g. `hub`); empty: its "
        "root.")

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="!has(self.subPath) || !self.subPath.matches('(^|/)[.][.]?(/|$)')",
            message="subPath is a folder inside the claim: no `.` or `..` parts",
            check=lambda c: not {".", ".."} & set(c.sub_path.split("/")),
            field_path=".subPath",
        ),
    )


class BaseModelSource(ApiModel):
    uri: BaseModelUri = Field(
        description="Higher-precision model: hf://org/name@revision (the revision is required; read offline from "
        "huggingFaceCache), oci://registry/repo@sha256:… (verified), pvc://claim/path, or file:///path (local use)."
    )
    hugging_face_cache: HuggingFaceCache | None = Field(
        default=None, description="Where an hf:// model is read from: required for hf://, refused otherwise.")

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        *uri_rules("uri"),
        CrossFieldRule(
            cel="self.uri.startsWith('hf://') == has(self.huggingFaceCache)",
            message="huggingFaceCache is required for an hf:// uri, and only for one: the worker reads hf:// models "
            "from that cache offline and never downloads",
            check=lambda b: b.uri.startswith("hf://") == (b.hugging_face_cache is not None),
            field_path=".huggingFaceCache",
        ),
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
    uri: DataUri | None = Field(
        default=None, description="JSONL lines with `text` or `messages`, and `slice`: pvc://claim/path/file.jsonl, "
        "oci://repo@sha256:… (an artifact holding one .jsonl file, verified like a model; credentials from "
        "spec.artifact.credentialsSecretRef) or file:///path (local use).")
    config_map_ref: ConfigMapKeyRef | None = Field(
        default=None, description="JSONL in a ConfigMap key (at most 1 MiB: for small sets).")
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
        *uri_rules("uri", optional=True),
        CrossFieldRule(
            cel="self.slices.all(a, self.slices.exists_one(b, b.name == a.name))",
            message="slice names must be unique",
            check=lambda c: len({s.name for s in c.slices}) == len(c.slices),
            field_path=".slices",
        ),
    )


def _gpus_in_one_place(job: CalibrationJob) -> bool:
    limit = job.resources.limits.get(GPU_RESOURCE) if job.resources else None
    return job.gpus is None or limit is None or str(limit) == str(job.gpus)


class CalibrationJob(ApiModel):
    image: ImageRef | None = Field(default=None, description="Worker image; the operator's default when unset "
                                   "(the install policy may restrict which images a tenant may name).")
    gpus: int | None = Field(
        default=None, ge=0, le=64, description="nvidia.com/gpu of the Job's pod (requests and limits). Unset: "
        "resources.limits['nvidia.com/gpu'] if given, else 1. Set both only to the same number.")
    resources: Resources | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    affinity: dict[str, Any] | None = Field(
        default=None, description="The pod's affinity, as in a pod spec (nodeAffinity, podAntiAffinity, …).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    active_deadline_seconds: int = Field(default=3600, ge=60)
    backoff_limit: int = Field(default=0, ge=0, le=10)
    service_account_name: DnsLabel | None = None
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets the kubelet pulls the worker image with.")

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel=f"!has(self.gpus) || !has(self.resources) || !has(self.resources.limits) || "
            f"!('{GPU_RESOURCE}' in self.resources.limits) || "
            f"string(self.resources.limits['{GPU_RESOURCE}']) == string(self.gpus)",
            message=f"gpus and resources.limits['{GPU_RESOURCE}'] disagree: the GPU count comes from one place "
            "(set gpus, or the limit, or both to the same number)",
            check=_gpus_in_one_place,
            field_path=".gpus",
        ),
    )

    @property
    def gpu_count(self) -> int:
        """The GPUs the Job's pod asks for: gpus, else the user's limit, else one."""
        limit = self.resources.limits.get(GPU_RESOURCE) if self.resources else None
        if self.gpus is not None:
            return self.gpus
        return int(str(limit)) if limit is not None and str(limit).isdigit() else 1


class ArtifactRepository(ApiModel):
    repository: str = Field(
        pattern=r"^[a-z0-9.\-]+(:[0-9]+)?/[a-z0-9._\-/]+$",
        max_length=512,
        description="OCI repository the artifact is pushed to, e.g. registry.example.com/models/llama-8b-w4a16.",
    )
    insecure: bool = Field(
        default=False, description="Plain HTTP to this registry: allowed only for registries the install policy "
        "lists (installPolicy.plainHttpRegistries), which push, pulls and the serving arms' fetch always reach over "
        "plain HTTP.")
    credentials_secret_ref: LocalObjectReference | None = Field(
        default=None, description="A kubernetes.io/dockerconfigjson Secret in this namespace (`kubectl create secret "
        "docker-registry`), mounted into the calibration pod: the push, and the pulls of an oci:// base model and "
        "calibration data, log in with it (one Secret may hold several registries). Unset: anonymous.")


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
