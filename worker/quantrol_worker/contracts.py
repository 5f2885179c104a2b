"""The calibration worker's command-line contract: its input config, its report and its termination message.

Torch-free on purpose: the operator imports this module to build the Job's ConfigMap and to read the result,
and the serving side reads the report. The enums here are the single definition of their values; the operator's
API models should import them from here (`quantrol_worker.contracts`) rather than define their own.

Wire format: camelCase keys (like every Kubernetes object), snake_case attributes in Python.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.alias_generators import to_camel

REPORT_FILE = "quantrol-report.json"
REPORT_VERSION = "quantrol.io/calibration-report/v1alpha1"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# Kubernetes keeps at most 4096 bytes of a container's termination message.
TERMINATION_MESSAGE_LIMIT = 4096

# OCI media types of a published artifact.
ARTIFACT_TYPE = "application/vnd.quantrol.model.v1"
CONFIG_MEDIA_TYPE = "application/vnd.quantrol.model.config.v1+json"
REPORT_MEDIA_TYPE = "application/vnd.quantrol.report.v1+json"
SAFETENSORS_MEDIA_TYPE = "application/vnd.quantrol.model.safetensors"
JSON_FILE_MEDIA_TYPE = "application/vnd.quantrol.model.file.v1+json"
FILE_MEDIA_TYPE = "application/vnd.quantrol.model.file.v1"
EVALUATION_PROMPTS_MEDIA_TYPE = "application/vnd.quantrol.evaluation-prompts.v1+json"

# A model folder's tokenizer files: what the tokenizer digest covers, and all a reader of prompts needs to pull.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)

# The held-out prompts of every slice, shipped beside the weights (see EvaluationPrompts).
EVALUATION_PROMPTS_FILE = "quantrol-evaluation-prompts.json"
EVALUATION_PROMPTS_VERSION = "quantrol.io/evaluation-prompts/v1alpha1"
# A reader refuses a larger file before parsing it: the artifact may come from a registry a tenant controls.
EVALUATION_PROMPTS_MAX_BYTES = 32 * 1024 * 1024
# How many of the baseline's most likely next tokens the golden record keeps per position. vLLM returns at most
# `--max-logprobs` (default 20) per position, so a serving engine can always be scored the same way.
GOLDEN_TOP_K = 8

# Prompts are user data. Matches of these are replaced by REDACTED wherever Quantrol keeps or ships a prompt (the
# router's diff samples, the artifact's evaluation prompts, the report's sample generations).
REDACTED = "[REDACTED]"
DEFAULT_REDACT_PATTERNS: tuple[str, ...] = (
    r"[\w.+-]+@[\w-]+\.[\w.-]+",  # e-mail addresses
    r"\b(?:\d[ -]?){13,19}\b",  # card-like digit runs
    r"(?i)\b(?:bearer|api[_-]?key|token|password|secret)\b\s*[:=]?\s*\S+",  # credentials pasted into prompts
    r"\b(?:sk|pk|rk|ghp|gho|xox[abp])[-_][A-Za-z0-9_-]{16,}\b",  # API keys and tokens by their shape
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b",  # JSON web tokens
    r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key ids
    r"(?<![\w.])\+?\d{1,3}[ .-]\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]?\d{3,4}\b",  # phone numbers (with separators)
    r"\b(?:25[0-5]|2[0-4]\d|1?\d?\d)(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){3}\b",  # IPv4 addresses
    r"\b(?:[0-9a-fA-F]{1,4}:){3,7}[0-9a-fA-F]{1,4}\b",  # IPv6 addresses
)
RedactPattern = Annotated[str, StringConstraints(min_length=1, max_length=512)]


def check_patterns(patterns: list[str]) -> list[str]:
    """Every pattern must compile (as Python's `re`); the message names the one that does not."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"redact pattern {pattern!r} does not compile: {exc}") from exc
    return patterns


def redact(text: str, patterns: list[re.Pattern[str]]) -> tuple[str, int]:
    """`text` with every match of `patterns` replaced by REDACTED, and how many matches there were."""
    total = 0
    for pattern in patterns:
        text, n = pattern.subn(REDACTED, text)
        total += n
    return text, total


# --- enums shared with the operator's API (same values; the operator should import these) ---


class Scheme(StrEnum):
    """llm-compressor / compressed-tensors preset schemes."""

    FP8_DYNAMIC = "FP8_DYNAMIC"
    FP8 = "FP8"  # static per-tensor activation scales
    W8A8 = "W8A8"  # int8 weights (per channel) and activations (per token, dynamic)
    W4A16 = "W4A16"
    W4A16_ASYM = "W4A16_ASYM"
    W4A8 = "W4A8"
    W8A16 = "W8A16"


# Schemes that quantize weights only, to integers; the only ones where a group size means anything.
WEIGHT_ONLY_INT_SCHEMES = frozenset({Scheme.W4A16, Scheme.W4A16_ASYM, Scheme.W8A16})


class Method(StrEnum):
    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    SMOOTHQUANT_GPTQ = "smoothquant+gptq"


# Which method can produce which scheme (llm-compressor modifiers); everything else is refused.
METHODS_BY_SCHEME: dict[Scheme, frozenset[Method]] = {
    Scheme.FP8_DYNAMIC: frozenset({Method.RTN}),
    Scheme.FP8: frozenset({Method.RTN, Method.GPTQ}),
    Scheme.W8A8: frozenset({Method.RTN, Method.GPTQ, Method.SMOOTHQUANT_GPTQ}),
    Scheme.W4A16: frozenset({Method.RTN, Method.GPTQ, Method.AWQ}),
    Scheme.W4A16_ASYM: frozenset({Method.RTN, Method.GPTQ, Method.AWQ}),
    Scheme.W4A8: frozenset({Method.RTN, Method.GPTQ}),
    Scheme.W8A16: frozenset({Method.RTN, Method.GPTQ}),
}


class KvCacheScheme(StrEnum):
    """KV-cache quantization; `fp8` calibrates per-layer scales (vLLM's `--kv-cache-dtype fp8`)."""

    NONE = "none"
    FP8 = "fp8"


class Target(StrEnum):
    """The hardware the artifact must be served on; decides which kernels must exist."""

    CUDA_SM90 = "cuda-sm90"
    CUDA_SM89 = "cuda-sm89"
    CUDA_SM80 = "cuda-sm80"
    CPU_X86 = "cpu-x86"


class WorkerPhase(StrEnum):
    """Terminal phases the worker reports; the values are the QuantizedModel phases of the same name."""

    READY = "Ready"
    REJECTED = "Rejected"
    FAILED = "Failed"


class CalibrationReason(StrEnum):
    """Machine-readable reasons for Rejected / Failed (CamelCase, as Kubernetes condition reasons)."""

    SUCCEEDED = "Succeeded"
    QUALITY_GATE_FAILED = "QualityGateFailed"
    INTEGRITY_CHECK_FAILED = "IntegrityCheckFailed"
    KERNEL_INCOMPATIBLE = "KernelIncompatible"
    INVALID_CONFIG = "InvalidConfig"
    BASE_MODEL_UNAVAILABLE = "BaseModelUnavailable"
    DIGEST_MISMATCH = "DigestMismatch"
    CALIBRATION_DATA_INVALID = "CalibrationDataInvalid"
    EMPTY_SLICE = "EmptySlice"
    QUANTIZATION_FAILED = "QuantizationFailed"
    PUBLISH_FAILED = "PublishFailed"
    REGISTRY_UNAUTHORIZED = "RegistryUnauthorized"  # a registry answered 401/403 (oci.ArtifactReason's word)
    INTERNAL_ERROR = "InternalError"


class KernelVerdict(StrEnum):
    """What serving the scheme on the target uses: a native kernel, a slower fallback, or nothing. One vocabulary for
    the calibration pre-check, the serving launcher's verification and the rollout state machine."""

    NATIVE = "native"
    FALLBACK = "fallback"
    NONE = "none"
    # The engine has not reported yet, or named no kernel the table knows: unverified, never a pass.
    UNKNOWN = "unknown"


class Stage(StrEnum):
    LOAD = "load"
    PRECHECK = "precheck"
    DATA = "data"
    CALIBRATE = "calibrate"
    SAVE = "save"
    EVALUATE = "evaluate"
    INTEGRITY = "integrity"
    PACKAGE = "package"
    PUBLISH = "publish"


# --- base ---


class ContractModel(BaseModel):
    """camelCase on the wire, unknown fields refused (a typo in a ConfigMap fails loudly)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))


class ReportModel(ContractModel):
    """Read by older and newer readers: unknown fields are ignored, not refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# --- input: CalibrationConfig (the ConfigMap the operator writes) ---


class QualityLimits(ContractModel):
    """Limits one slice must meet against the baseline; an unset limit is not checked."""

    max_mean_kl_divergence: float | None = Field(default=None, ge=0, description="Mean next-token KL (nats).")
    max_p99_kl_divergence: float | None = Field(default=None, ge=0, description="p99 next-token KL (nats).")
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1, description="Fraction, 0..1.")
    max_perplexity_increase: float | None = Field(
        default=None, ge=0, description="Allowed perplexity increase as a fraction (0.05 = +5%)."
    )

    def merged(self, override: QualityLimits | None) -> QualityLimits:
        """This gate with the override's set fields on top (a slice's own gate overrides field by field)."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


def default_quality_gate() -> QualityLimits:
    return QualityLimits(max_mean_kl_divergence=0.05, min_top1_agreement=0.9, max_perplexity_increase=0.05)


class QuantizationConfig(ContractModel):
    scheme: Scheme
    method: Method = Method.GPTQ
    group_size: int | None = Field(default=None, ge=16, le=1024, description="Weight-only int schemes; default 128.")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], max_length=256)
    kv_cache_scheme: KvCacheScheme = KvCacheScheme.NONE
    target: Target = Target.CUDA_SM90
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    smoothing_strength: float = Field(default=0.8, gt=0, lt=1, description="SmoothQuant alpha (smoothquant+gptq).")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.method not in METHODS_BY_SCHEME[self.scheme]:
            allowed = ", ".join(sorted(m.value for m in METHODS_BY_SCHEME[self.scheme]))
            raise ValueError(f"method {self.method.value} does not fit scheme {self.scheme.value} (allowed: {allowed})")
        if self.group_size is not None and self.scheme not in WEIGHT_ONLY_INT_SCHEMES:
            raise ValueError("groupSize applies only to weight-only integer schemes (W4A16, W4A16_ASYM, W8A16)")
        return self

    @property
    def effective_group_size(self) -> int | None:
        """The weight group size the recipe will use (None: per-channel or per-tensor scales)."""
        if self.scheme in (*WEIGHT_ONLY_INT_SCHEMES, Scheme.W4A8):
            return self.group_size or 128
        return None


class SliceConfig(ContractModel):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    samples: int = Field(default=64, ge=1, le=100_000, description="Calibration samples from this slice.")
    eval_samples: int = Field(default=32, ge=1, le=100_000, description="Held-out samples to evaluate.")
    quality_gate: QualityLimits | None = None


class DataConfig(ContractModel):
    uri: str = Field(description="JSONL with `text` or `messages`, and `slice`: file:// or a path, or a digest-pinned "
                     "oci:// artifact holding one .jsonl file.")
    max_sequence_length: int = Field(default=2048, ge=16, le=1_048_576)
    seed: int = Field(default=0, ge=0)
    slices: list[SliceConfig] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        if len({s.name for s in self.slices}) != len(self.slices):
            raise ValueError("slice names must be unique")
        return self


class ArtifactConfig(ContractModel):
    repository: str = Field(pattern=r"^[a-z0-9.\-]+(:[0-9]+)?/[a-z0-9._\-/]+$", max_length=512)
    tag: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class RegistryAccess(ContractModel):
    """How the worker reaches OCI registries, for every pull (base model, calibration data) and the push."""

    credentials_file: str | None = Field(
        default=None, description="docker config.json with credentials by registry (a mounted dockerconfigjson "
        "Secret); unset: anonymous.")
    plain_http: list[str] = Field(
        default_factory=list, max_length=256, description="Registries (`host` or `host:port`) reached over plain "
        "HTTP: the install policy's list; every other registry over TLS.")


class EvaluationPromptsPolicy(ContractModel):
    """Whether the held-out prompts each slice was evaluated on travel in the artifact, and how they are cut and
    redacted first. Serving reads them: qualification replays them to score the serving engine against the
    baseline (the golden-output check), and the router replays them as quality probes."""

    publish: bool = Field(
        default=True, description="Ship the held-out prompts (redacted) and the baseline's golden log-probabilities "
        "in the artifact. false: nothing of the calibration data leaves the Job; serving then has no golden-output "
        "check and no probes from the artifact (status says so)."
    )
    max_per_slice: int = Field(default=32, ge=1, le=1024, description="At most this many prompts per slice.")
    max_tokens: int = Field(default=256, ge=8, le=32_768, description="Each prompt is cut to this many tokens.")
    redact_patterns: list[RedactPattern] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_PATTERNS), max_length=32,
        description="Regular expressions (Python `re`) whose matches are replaced by [REDACTED] before a prompt "
        "is shipped; the golden figures are measured on the redacted text.",
    )

    @field_validator("redact_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        return check_patterns(patterns)


class EvaluationConfig(ContractModel):
    sample_generations: int = Field(default=2, ge=0, le=16, description="Side-by-side generations per slice.")
    max_new_tokens: int = Field(default=24, ge=1, le=512)
    prompt_tokens: int = Field(default=24, ge=1, le=4096)
    prompts: EvaluationPromptsPolicy = Field(default_factory=EvaluationPromptsPolicy)


class CalibrationConfig(ContractModel):
    """Everything `quantrol-worker calibrate --config FILE` needs (JSON or YAML)."""

    base_model: str = Field(description="hf://org/name@rev, oci://registry/repo@sha256:…, file:///path or a path.")
    quantization: QuantizationConfig
    calibration: DataConfig
    quality_gate: QualityLimits = Field(default_factory=default_quality_gate)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    artifact: ArtifactConfig | None = Field(default=None, description="Where to push; unset: package locally only.")
    registries: RegistryAccess = Field(default_factory=RegistryAccess)
    work_dir: str = Field(default="/tmp/quantrol-work", description="Scratch space for model, checkpoint, report.")
    termination_message_path: str = TERMINATION_MESSAGE_PATH
    name: str | None = Field(default=None, description="QuantizedModel namespace/name, for annotations.")
    generation: int | None = Field(default=None, description="QuantizedModel metadata.generation.")

    def gate_for(self, slice_name: str) -> QualityLimits:
        own = next((s.quality_gate for s in self.calibration.slices if s.name == slice_name), None)
        return self.quality_gate.merged(own)


# --- output: the report ---


class SliceQuality(ReportModel):
    """One slice measured against the baseline: in the report, and (from the termination message's headline) in the
    QuantizedModel's status."""

    slice: str
    samples: int | None = None
    tokens: int | None = None
    mean_kl_divergence: float | None = None
    p99_kl_divergence: float | None = None
    top1_agreement: float | None = None
    perplexity_ratio: float | None = None
    baseline_perplexity: float | None = None
    candidate_perplexity: float | None = None
    passed: bool | None = None
    failed_limits: list[str] = Field(default_factory=list, max_length=16)


class IntegrityCheck(ReportModel):
    name: str
    passed: bool
    detail: str = ""


class LayerScaleStats(ReportModel):
    layer: str
    kind: str = Field(description="weight, input, k or v")
    max_abs: float | None = Field(default=None, description="Largest |value| the scales cover.")
    min_scale: float | None = None
    max_scale: float | None = None
    fraction_clipped: float | None = Field(default=None, description="Weights outside the quantized range.")


class KernelViolation(ReportModel):
    layer: str
    rule: str
    detail: str


class KernelPrecheck(ReportModel):
    """The calibration-time kernel pre-check (`kernels.precheck`): would every quantized Linear find a kernel?"""

    target: Target
    scheme: Scheme
    family: str | None = None
    verdict: KernelVerdict
    compatible: bool
    violations: list[KernelViolation] = Field(default_factory=list)
    note: str = ""


class SampleGeneration(ReportModel):
    slice: str
    prompt: str
    baseline: str
    candidate: str


class ExperimentEnvelope(ReportModel):
    """What it takes to reproduce the artifact: inputs by digest, the recipe, and the tools' versions."""

    base_model_uri: str | None = None
    base_model_digest: str | None = None
    tokenizer_digest: str | None = None
    calibration_data_digest: str | None = None
    recipe: str | None = None
    seed: int | None = None
    hardware: str | None = None
    tool_versions: dict[str, str] = Field(default_factory=dict)


class EvaluationPromptsSummary(ReportModel):
    """The report's word on the evaluation prompts: whether the artifact carries them, where, and what was done
    to them before they left the calibration Job."""

    published: bool
    file: str | None = Field(default=None, description="The artifact's file holding them (EvaluationPrompts).")
    digest: str | None = Field(default=None, description="sha256 of that file (its layer digest in the artifact).")
    prompts: dict[str, int] = Field(default_factory=dict, description="Prompts shipped per slice.")
    redacted_prompts: int = Field(default=0, ge=0, description="Prompts in which at least one match was redacted.")
    redact_patterns: int = Field(default=0, ge=0, description="How many redaction patterns were applied.")
    message: str = ""


class CalibrationReport(ReportModel):
    """quantrol-report.json: the evidence a human or the operator reads."""

    version: str = REPORT_VERSION
    phase: WorkerPhase
    reason: CalibrationReason
    message: str = ""
    name: str | None = None
    generation: int | None = None
    scheme: Scheme | None = None
    method: Method | None = None
    kv_cache_scheme: KvCacheScheme | None = None
    gate_passed: bool | None = None
    quality: list[SliceQuality] = Field(default_factory=list)
    integrity: list[IntegrityCheck] = Field(default_factory=list)
    scale_stats: list[LayerScaleStats] = Field(default_factory=list)
    kernel_check: KernelPrecheck | None = None
    samples: list[SampleGeneration] = Field(default_factory=list)
    evaluation_prompts: EvaluationPromptsSummary | None = None
    envelope: ExperimentEnvelope = Field(default_factory=ExperimentEnvelope)
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    checkpoint_bytes: int | None = None
    baseline_bf16_bytes: int | None = Field(default=None, description="Size of the same weights in bf16.")


# --- output: the evaluation prompts (EVALUATION_PROMPTS_FILE in the artifact) ---


class GoldenLogprobs(ReportModel):
    """The baseline's next-token distribution at every position of one prompt, as calibration computed it:
    position i predicts token i+1. Rounded to 5 significant digits (the file stays small; the figures built on
    it are means over thousands of positions)."""

    target_logprobs: list[float] = Field(description="log p(token[i+1] | token[..i]) of the baseline.")
    top_ids: list[list[int]] = Field(description="Per position, the baseline's GOLDEN_TOP_K most likely token ids.")
    top_logprobs: list[list[float]] = Field(description="Their log-probabilities, in the same order.")

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.target_logprobs) == len(self.top_ids) == len(self.top_logprobs):
            raise ValueError("targetLogprobs, topIds and topLogprobs must have one entry per position")
        if any(len(a) != len(b) for a, b in zip(self.top_ids, self.top_logprobs, strict=True)):
            raise ValueError("topIds and topLogprobs must have the same length at every position")
        return self


class EvaluationPrompt(ReportModel):
    text: str = Field(description="The prompt as shipped: cut to maxTokens, then redacted.")
    token_ids: list[int] = Field(description="`text` tokenized by the artifact's tokenizer (what was scored).")
    redactions: int = Field(default=0, ge=0, description="Matches replaced by [REDACTED] in this prompt.")
    baseline: GoldenLogprobs | None = Field(default=None, description="The baseline's golden log-probabilities.")


class SlicePrompts(ReportModel):
    slice: str
    prompts: list[EvaluationPrompt] = Field(default_factory=list)
    reference: SliceQuality | None = Field(
        default=None, description="The candidate checkpoint scored against `baseline` on exactly these prompts "
        "(quantrol_worker.golden.score): what a serving engine of this artifact must reproduce.")


class EvaluationPrompts(ReportModel):
    """Per slice, the held-out prompts calibration evaluated the artifact on, redacted, with the baseline's golden
    log-probabilities and the candidate's reference figures on them. Shipped as EVALUATION_PROMPTS_FILE."""

    version: str = EVALUATION_PROMPTS_VERSION
    top_k: int = GOLDEN_TOP_K
    tokenizer_digest: str | None = None
    redact_patterns: int = Field(default=0, ge=0, description="How many redaction patterns were applied.")
    slices: list[SlicePrompts] = Field(default_factory=list, max_length=64)

    def for_slice(self, name: str) -> SlicePrompts | None:
        return next((s for s in self.slices if s.slice == name), None)

    @classmethod
    def read(cls, path: Path, max_bytes: int = EVALUATION_PROMPTS_MAX_BYTES) -> EvaluationPrompts:
        """Parse the file, refusing one over `max_bytes` before reading it (ValueError names the size)."""
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{path.name} is {size} bytes, over the {max_bytes}-byte limit")
        return cls.model_validate_json(path.read_bytes())


# --- output: the termination message ---


class SliceHeadline(ReportModel):
    """Compact per-slice quality for the termination message (short keys keep it under 4 KB)."""

    slice: str
    mean_kl: float | None = None
    p99_kl: float | None = None
    top1: float | None = None
    ppl_ratio: float | None = None
    passed: bool | None = None
    failed: list[str] = Field(default_factory=list)

    @classmethod
    def of(cls, q: SliceQuality) -> SliceHeadline:
        def r(v: float | None) -> float | None:
            return None if v is None else float(f"{v:.5g}")

        return cls(
            slice=q.slice,
            mean_kl=r(q.mean_kl_divergence),
            p99_kl=r(q.p99_kl_divergence),
            top1=r(q.top1_agreement),
            ppl_ratio=r(q.perplexity_ratio),
            passed=q.passed,
            failed=q.failed_limits,
        )


class TerminationResult(ReportModel):
    """What the worker writes to the container's termination-message path (≤ 4096 bytes of JSON)."""

    phase: WorkerPhase
    reason: CalibrationReason
    message: str = ""
    stage: Stage | None = None
    artifact_ref: str | None = Field(default=None, description="repo@sha256:… of the published artifact.")
    digest: str | None = None
    size_bytes: int | None = None
    report_ref: str | None = Field(default=None, description="repo@sha256:… holding the report when rejected.")
    gate_passed: bool | None = None
    quality: list[SliceHeadline] = Field(default_factory=list)
    base_model_digest: str | None = None
    calibration_data_digest: str | None = None
    evaluation_prompts: int | None = Field(
        default=None, description="Prompts the artifact carries in EVALUATION_PROMPTS_FILE; unset or 0: none.")

    def to_message(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        """Compact JSON within `limit` bytes: the message is cut first, then trailing slices are dropped."""
        result = self.model_copy(deep=True)
        text = result.to_json()
        if len(text.encode()) > limit and result.message:
            excess = len(text.encode()) - limit
            keep = max(0, len(result.message.encode()) - excess - 8)
            result.message = result.message.encode()[:keep].decode(errors="ignore") + "…"
            text = result.to_json()
        while len(text.encode()) > limit and result.quality:
            result.quality = result.quality[:-1]
            result.message = (result.message + " [slices truncated]")[-512:]
            text = result.to_json()
        if len(text.encode()) > limit:
            raise ValueError(f"termination result does not fit {limit} bytes")
        return text

    @classmethod
    def from_message(cls, text: str) -> TerminationResult:
        return cls.model_validate_json(text)


# --- qualification: `quantrol-worker qualify --config FILE` (the ServingPolicy's Qualifying phase) ---

QUALIFICATION_REPORT_VERSION = "quantrol.io/qualification-report/v1alpha1"


class ArmRole(StrEnum):
    STABLE = "stable"
    CANDIDATE = "candidate"


class Regime(StrEnum):
    """The three load regimes every arm is measured in before it takes traffic (ARCHITECTURE.md, verify stage)."""

    FLOOR = "floor"  # (i) one request at a time: floor TTFT and inter-token latency
    SUSTAINABLE = "sustainable"  # (ii) a rate sweep: the highest rate meeting the latency SLOs, bounded queue age
    OVERLOAD = "overload"  # (iii) overload × factor for a bounded time, then one at a time again: recovery


class QualificationReason(StrEnum):
    """Why qualification let a candidate go on, or refused it (CamelCase, like condition reasons)."""

    QUALIFIED = "Qualified"
    QUALIFICATION_FAILED = "QualificationFailed"  # a regime's SLO, or the goodput ratio: the message names which
    GOLDEN_OUTPUT_MISMATCH = "GoldenOutputMismatch"  # the serving engine does not compute what calibration measured
    INVALID_CONFIG = "InvalidConfig"
    INTERNAL_ERROR = "InternalError"  # the Job could not measure (an arm unreachable, the tool failed): no verdict


class QualifyArm(ContractModel):
    arm: ArmRole
    url: str = Field(pattern=r"^https?://\S+$", max_length=1024, description="The arm's engine (its Service).")
    artifact: str = Field(max_length=1024)
    replicas: int = Field(default=1, ge=1, le=1000, description="Engines behind the URL: engine-seconds per second.")


class RegimeSettings(ContractModel):
    """How long each regime may run; every figure comes from a bounded run."""

    floor_requests: int = Field(default=8, ge=1, le=1000)
    floor_max_seconds: float = Field(default=60, gt=0, le=3600)
    sweep_rates: int = Field(default=4, ge=1, le=16, description="Rates on the ladder (doubling, then bisecting); "
                             "an arm that sustains none of them gets up to as many more, downwards, until one is "
                             "sustainable.")
    seconds_per_rate: float = Field(default=20, gt=0, le=3600)
    overload_factor: float = Field(default=1.5, gt=1, le=10)
    overload_seconds: float = Field(default=20, gt=0, le=3600)
    recovery_seconds: float = Field(default=30, gt=0, le=3600)


class LatencyLimits(ContractModel):
    """The policy's SLOs as the Job applies them per regime (seconds); unset: not judged."""

    ttft_seconds: float | None = Field(default=None, gt=0)
    itl_seconds: float | None = Field(default=None, gt=0)
    queue_wait_seconds: float | None = Field(default=None, gt=0)


class AdmissionBounds(ContractModel):
    """The policy's admission bounds, applied by the router the Job puts in front of each arm (as in production)."""

    max_in_flight: int = Field(default=128, ge=1)
    max_queue: int = Field(default=256, ge=0)
    max_queue_wait_seconds: float = Field(default=5.0, gt=0)


class GoldenTolerance(ContractModel):
    """How far the serving engine's golden figures may fall behind calibration's reference on the same prompts."""

    max_kl_increase: float = Field(default=0.05, ge=0, description="Mean KL (nats) over the reference's.")
    max_top1_drop: float = Field(default=0.05, ge=0, le=1, description="Top-1 agreement below the reference's.")
    max_perplexity_increase: float = Field(
        default=0.05, ge=0, description="Perplexity ratio over the reference's, as a fraction of it.")


class QualificationConfig(ContractModel):
    model: str = Field(max_length=253, description="The served model name both arms answer to.")
    arms: list[QualifyArm] = Field(min_length=1, max_length=2)
    prompts_artifact: str | None = Field(
        default=None, description="The candidate artifact (oci://…@sha256:…): its prompts and tokenizer, pulled and "
        "verified; file:///folder reads a local model folder as it is (local use: the bench).")
    registries: RegistryAccess = Field(default_factory=RegistryAccess)
    probe_prompts_file: str | None = Field(default=None, description="JSONL {slice, text}: the probe ConfigMap.")
    output_tokens: int = Field(default=32, ge=1, le=4096)
    regimes: RegimeSettings = Field(default_factory=RegimeSettings)
    limits: LatencyLimits = Field(default_factory=LatencyLimits)
    admission: AdmissionBounds = Field(default_factory=AdmissionBounds)
    golden: GoldenTolerance = Field(default_factory=GoldenTolerance)
    golden_max_seconds: float = Field(default=600, gt=0, le=3600, description="The golden check's time bound.")
    min_goodput_ratio: float = Field(default=1.0, gt=0, le=100)
    work_dir: str = "/tmp/quantrol-qualify"
    termination_message_path: str = TERMINATION_MESSAGE_PATH


class RegimeFigures(ReportModel):
    """One arm in one regime, as the load generator measured it through the policy's admission bounds. Units are
    in the names: seconds, requests per second, tokens per engine-second, fractions 0..1."""

    regime: Regime
    passed: bool | None = None
    failed: list[str] = Field(default_factory=list, max_length=8, description="`slo: value > limit` per breach.")
    rate_rps: float | None = Field(default=None, description="Offered request rate (requests per second).")
    requests: int | None = None
    ttft_p50_seconds: float | None = None
    ttft_p99_seconds: float | None = None
    itl_p50_seconds: float | None = None
    itl_p99_seconds: float | None = None
    output_tokens_per_second: float | None = None
    goodput_tokens_per_engine_second: float | None = Field(
        default=None, description="Output tokens of requests within their deadlines, per engine-second.")
    rejected_fraction: float | None = Field(default=None, description="Answered 429 (backpressure).")
    queue_wait_p99_seconds: float | None = Field(default=None, description="The router's admission queue age.")
    recovery_seconds: float | None = Field(default=None, description="After overload: back to floor latency.")


class ArmQualification(ReportModel):
    arm: ArmRole
    artifact: str | None = None
    regimes: list[RegimeFigures] = Field(default_factory=list, max_length=3)

    def regime(self, which: Regime) -> RegimeFigures | None:
        return next((r for r in self.regimes if r.regime is which), None)


class GoldenSlice(ReportModel):
    """The serving engine against calibration's reference on one slice's evaluation prompts."""

    slice: str
    prompts: int | None = None
    mean_kl: float | None = None
    top1: float | None = None
    ppl_ratio: float | None = None
    reference_mean_kl: float | None = None
    reference_top1: float | None = None
    reference_ppl_ratio: float | None = None
    passed: bool | None = None
    failed: list[str] = Field(default_factory=list, max_length=8)


class QualificationReport(ReportModel):
    """What `quantrol-worker qualify` found: its termination message (compact JSON, at most 4096 bytes)."""

    version: str = QUALIFICATION_REPORT_VERSION
    reason: QualificationReason
    message: str = ""
    tool: str | None = Field(default=None, description="The load generator and its version, e.g. guidellm 0.8.1.")
    arms: list[ArmQualification] = Field(default_factory=list, max_length=2)
    golden: list[GoldenSlice] = Field(default_factory=list, max_length=64)
    golden_source: str | None = Field(default=None, description="artifact, configMap, or why there was none.")
    goodput_ratio: float | None = Field(default=None, description="Candidate ÷ stable sustainable goodput.")
    required_goodput_ratio: float | None = None

    def arm(self, role: ArmRole) -> ArmQualification | None:
        return next((a for a in self.arms if a.arm is role), None)

    def to_message(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        """Compact JSON within `limit` bytes: the message is cut first, then trailing golden slices dropped."""
        report = self.model_copy(deep=True)
        text = report.to_json()
        while len(text.encode()) > limit and (report.golden or len(report.message) > 64):
            if len(report.message) > 64:
                report.message = report.message[: max(64, len(report.message) - (len(text.encode()) - limit) - 8)]
            else:
                report.golden = report.golden[:-1]
            text = report.to_json()
        if len(text.encode()) > limit:
            raise ValueError(f"qualification report does not fit {limit} bytes")
        return text
