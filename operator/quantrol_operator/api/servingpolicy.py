"""ServingPolicy: "serve this model; move from the stable arm to the candidate only as fast as the SLOs allow"."""

from __future__ import annotations

import itertools
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import Field, StringConstraints, field_validator

from quantrol_operator.api.base import ApiModel, CrossFieldRule, StatusModel
from quantrol_operator.api.common import (
    API_VERSION,
    CONDITIONS_LIST_MAP,
    GPU_RESOURCE,
    NAME_RULE,
    Condition,
    DnsLabel,
    ImageRef,
    K8sQuantity,
    LocalObjectReference,
    PinnedArtifact,
    Resources,
    Toleration,
)
from quantrol_operator.api.quantizedmodel import ConfigMapKeyRef
from quantrol_worker.contracts import (
    ArmQualification,
    GoldenSlice,
    GoldenTolerance,
    KernelVerdict,
    QualificationReason,
    RedactPattern,
    RegimeSettings,
    Target,
    check_patterns,
)

KIND = "ServingPolicy"
PLURAL = "servingpolicies"
HISTORY_LIMIT = 50  # status.history keeps the newest transitions, at most this many


class RolloutPhase(StrEnum):
    PENDING = "Pending"
    QUALIFYING = "Qualifying"  # both arms measured on the target before any traffic (spec.qualification)
    SHADOW = "Shadow"
    CANARY = "Canary"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    PAUSED = "Paused"
    FAILED = "Failed"


class Verdict(StrEnum):
    """One SLO's judgement over one analysis window."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"  # too few requests, NaN, no series: never counts as pass
    ERROR = "error"  # the query itself failed (e.g. Prometheus unreachable)
    OVERLOAD = "overload"  # the stable arm breaches the same absolute limit: load, not the candidate


class NoJudgement(StrEnum):
    """Why an analysis window could not judge the candidate, decided from Prometheus' own answers: its target
    health (`up`) for the policy's routers and what its query API returned. The one vocabulary for "no
    judgement": the Paused condition's reason, `status.lastAnalysis.noJudgement`, `quantrol status`, the demo."""

    NO_TARGETS = "NoTargets"  # Prometheus scrapes no router of this policy: scrape config, PodMonitor, labels
    TARGETS_DOWN = "TargetsDown"  # it has the routers as targets, and none answered its last scrape
    NO_SAMPLES = "NoSamples"  # the routers are scraped, but the window holds too few requests (no traffic)
    METRICS_UNREACHABLE = "MetricsUnreachable"  # Prometheus did not answer: connection refused, DNS, timeout
    QUERY_FAILED = "QueryFailed"  # Prometheus answered with an error: a bad query, HTTP 4xx/5xx
    NO_ENGINE_SERIES = "NoEngineSeries"  # the routers answer with traffic, but no engine series (vllm:*) exist


class Cause(StrEnum):
    """Why a window did not pass, in the control loop's four words: the status, the rollback record and
    `quantrol_analysis_causes_total` carry it. One per window, the first of these that applies."""

    DEPENDENCY = "dependency"  # the analysis could not read what it judges (a NoJudgement reason other than NoSamples)
    OVERLOAD = "overload"  # both arms break the same limit: the load, not the candidate; hold, then step back
    PRECISION = "precision"  # the candidate's answers differ from the stable arm's: a quality SLO failed
    SCHEDULING = "scheduling"  # the candidate cannot serve a load the stable arm carries: latency, queueing, errors,
    # goodput or its engine's saturation failed on the candidate alone


# What to look at next, per reason: the Paused condition's message and `quantrol status` quote it.
NO_JUDGEMENT_ADVICE: dict[NoJudgement, str] = {
    NoJudgement.NO_TARGETS: "Prometheus scrapes no router of this policy: check its PodMonitor (or scrape "
    "config) and that the series carry the namespace and policy labels",
    NoJudgement.TARGETS_DOWN: "Prometheus has the routers as targets but cannot scrape them: check the router "
    "pods and their metrics port (Prometheus' targets page says why)",
    NoJudgement.NO_SAMPLES: "the routers are scraped but the window holds too few requests: send traffic, or "
    "lower analysis.minSampleCount",
    NoJudgement.METRICS_UNREACHABLE: "Prometheus did not answer: check analysis.prometheus.address and that "
    "Prometheus is up",
    NoJudgement.QUERY_FAILED: "Prometheus answered with an error: check custom SLO queries and Prometheus' log",
    NoJudgement.NO_ENGINE_SERIES: "the routers are scraped and carry traffic, but Prometheus has no series of the "
    "arms' engines (vllm:*) for the engine SLOs: check the PodMonitor's engine endpoint (or the engine pods' "
    "scrape annotations), or unset those SLOs",
}


class KernelPolicy(StrEnum):
    ENFORCE = "enforce"  # a candidate whose kernels fall back is refused (KernelFallback)
    WARN = "warn"  # a fallback candidate may face the SLOs; `none` is refused either way


class DeletionPolicy(StrEnum):
    DELETE = "Delete"  # deleting the policy removes the serving arms
    ORPHAN = "Orphan"  # the arms keep serving without an owner


class TrafficProvider(StrEnum):
    ROUTER = "router"  # Quantrol's own router in front of both arms


class KvCacheDtype(StrEnum):
    AUTO = "auto"
    FP8 = "fp8"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"


class Baseline(ApiModel):
    artifact: PinnedArtifact = Field(
        description="The higher-precision artifact: what serves until a promotion, and the last rollback "
        "target, pinned by digest (oci://repo@sha256:…) so it cannot move under you; each pod fetches and verifies it."
    )
    tensor_parallel_size: int | None = Field(
        default=None, ge=1, le=64, description="The baseline arm's own tensor-parallel size when it differs from the "
        "candidate's (a bf16 70B needs more GPUs than its 4-bit candidate). Unset: the candidate's.")
    kv_cache_dtype: KvCacheDtype = Field(
        default=KvCacheDtype.AUTO, description="The baseline arm's KV cache: `auto` (the model's dtype) keeps the "
        "rollback target the higher-precision configuration.")


class Candidate(ApiModel):
    quantized_model_ref: LocalObjectReference | None = Field(
        default=None, description="A QuantizedModel in this namespace; served only once Ready and qualified."
    )
    artifact: PinnedArtifact | None = Field(
        default=None, description="An artifact pinned by digest, oci://repo@sha256:… (a tag can move).")

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="has(self.quantizedModelRef) != has(self.artifact)",
            message="set exactly one of quantizedModelRef and artifact",
            check=lambda c: (c.quantized_model_ref is None) != (c.artifact is None),
        ),
    )


class BatchBudget(ApiModel):
    """How much work one engine may batch: vLLM's --max-num-seqs and --max-num-batched-tokens."""

    max_num_seqs: int = Field(default=64, ge=1, le=4096)
    max_num_batched_tokens: int = Field(default=8192, ge=1, le=1_048_576)

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="self.maxNumBatchedTokens >= self.maxNumSeqs",
            message="maxNumBatchedTokens must be at least maxNumSeqs (every running sequence needs a token)",
            check=lambda b: b.max_num_batched_tokens >= b.max_num_seqs,
            field_path=".maxNumBatchedTokens",
        ),
    )


class Admission(ApiModel):
    """The policy's bound per arm, split evenly across its router replicas: beyond it, 429 with Retry-After instead
    of an unbounded queue. Bounded at what the engines can run, the queue builds in the router, where it is measured
    and judged (queueTimeP99), rather than inside the engine."""

    max_in_flight: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Requests upstream at once per arm, for the whole policy. Unset: what the arm's engines can run "
        "(batchBudget.maxNumSeqs × replicas).")
    max_queue: int = Field(default=256, ge=0, le=100_000, description="Requests waiting per arm, for the whole policy.")
    max_queue_wait_seconds: float = Field(default=5.0, gt=0, le=600)


class StorageMedium(StrEnum):
    EMPTY_DIR = "EmptyDir"  # the node's disk: sized by an ephemeral-storage request and a sizeLimit
    EPHEMERAL_VOLUME = "EphemeralVolume"  # a PersistentVolumeClaim per pod from a storage class, gone with the pod


class ModelStorage(ApiModel):
    """Where each engine pod keeps the artifact's files (≈ 140 GB for a bf16 70B: per replica, per arm)."""

    medium: StorageMedium = Field(default=StorageMedium.EMPTY_DIR)
    size: K8sQuantity | None = Field(
        default=None, description="Volume size per pod. Unset: the artifact's size (known from its QuantizedModel's "
        "manifest) plus 10% and 1Gi; an arm whose size is unknown (a pinned baseline) gets no bound, and its status "
        "says so. The fetch step refuses early when the artifact does not fit.")
    storage_class_name: DnsLabel | None = Field(
        default=None, description="EphemeralVolume: the class of each pod's claim (unset: the cluster's default).")

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="self.medium != 'EphemeralVolume' || has(self.size)",
            message="an EphemeralVolume needs a size: each pod's claim is created at that size",
            check=lambda s: s.medium is not StorageMedium.EPHEMERAL_VOLUME or s.size is not None,
            field_path=".size",
        ),
        CrossFieldRule(
            cel="self.medium == 'EphemeralVolume' || !has(self.storageClassName)",
            message="storageClassName applies only to medium EphemeralVolume",
            check=lambda s: s.medium is StorageMedium.EPHEMERAL_VOLUME or s.storage_class_name is None,
            field_path=".storageClassName",
        ),
    )


# vLLM flags Quantrol itself sets from the spec (or per arm): an engineArgs entry may not set them again.
OWNED_ENGINE_FLAGS = ("--model", "--served-model-name", "--host", "--port", "--max-num-seqs",
                      "--max-num-batched-tokens", "--max-model-len", "--kv-cache-dtype", "--tensor-parallel-size",
                      "-tp")
EngineArg = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^\S+$")]


def _no_owned_flags(t: ServingTemplate) -> bool:
    return not any(a.split("=", 1)[0] in OWNED_ENGINE_FLAGS for a in t.engine_args)


def _gpus_match_tensor_parallel(t: ServingTemplate) -> bool:
    limit = t.resources.limits.get(GPU_RESOURCE) if t.resources else None
    return t.tensor_parallel_size is None or limit is None or str(limit) == str(t.tensor_parallel_size)


class ServingTemplate(ApiModel):
    image: ImageRef | None = Field(
        default=None, description="The engine image: any vLLM OpenAI-server image (stock vllm/vllm-openai works; "
        "Quantrol's launcher and fetch step come from its own tools image). The operator's default when unset "
        "(the install policy may restrict which images a tenant may name).")
    replicas: int = Field(default=1, ge=1, le=1000, description="Engine replicas per arm.")
    resources: Resources | None = Field(
        default=None, description="Each engine container's requests and limits. nvidia.com/gpu is set per arm to its "
        "tensor-parallel size on cuda targets; a GPU limit given here must equal tensorParallelSize.")
    max_model_len: int | None = Field(default=None, ge=16, le=10_000_000)
    batch_budget: BatchBudget = Field(default_factory=BatchBudget)
    admission: Admission = Field(default_factory=Admission)
    kv_cache_dtype: KvCacheDtype | None = Field(
        default=None, description="The candidate arm's KV cache. Unset: from its QuantizedModel (fp8 with the "
        "calibrated scales when kvCacheScheme is fp8), else auto. The baseline arm has its own "
        "(baseline.kvCacheDtype).")
    target: Target = Field(
        default=Target.CUDA_SM90, description="Hardware the arms run on: decides which kernels the launcher expects."
    )
    tensor_parallel_size: int | None = Field(
        default=None, ge=1, le=64, description="GPUs per engine (vLLM's --tensor-parallel-size). Unset: the "
        "candidate QuantizedModel's quantization.tensorParallelSize, else 1.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="E.g. nvidia.com/gpu:NoSchedule of a tainted GPU pool.")
    affinity: dict[str, Any] | None = Field(
        default=None, description="The pods' affinity, as in a pod spec (nodeAffinity, podAntiAffinity, …).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    shared_memory_size: K8sQuantity | None = Field(
        default=None, description="Memory-backed /dev/shm per engine pod (NCCL and vLLM's workers exchange through "
        "it; it counts against the pod's memory). Unset: 1Gi, plus 2Gi per tensor-parallel rank beyond the first.")
    max_load_seconds: int = Field(
        default=1800, ge=60, le=86_400, description="How long an engine may take to load and warm up (weights from "
        "the volume, CUDA graphs) before the startup probe gives up; liveness starts only after it.")
    storage: ModelStorage = Field(default_factory=ModelStorage)
    engine_args: list[EngineArg] = Field(
        default_factory=list, max_length=32, description="More vLLM flags, e.g. [--gpu-memory-utilization, '0.92']: "
        "only flags the install policy allows (installPolicy.engineFlags); never one Quantrol sets itself.")
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets the kubelet pulls the engine, tools and router "
        "images with.")
    artifact_credentials_secret_ref: LocalObjectReference | None = Field(
        default=None, description="A kubernetes.io/dockerconfigjson Secret the arms' fetch step reads artifacts "
        "with (one Secret may hold several registries). Unset: the candidate QuantizedModel's "
        "spec.artifact.credentialsSecretRef, if any.")

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="!has(self.engineArgs) || self.engineArgs.all(a, "
            f"!a.matches('^({'|'.join(OWNED_ENGINE_FLAGS)})(=.*)?$'))",
            message="engineArgs may not set a flag Quantrol sets from the spec: "
            + ", ".join(OWNED_ENGINE_FLAGS),
            check=_no_owned_flags,
            field_path=".engineArgs",
        ),
        CrossFieldRule(
            cel=f"!has(self.tensorParallelSize) || !has(self.resources) || !has(self.resources.limits) || "
            f"!('{GPU_RESOURCE}' in self.resources.limits) || "
            f"string(self.resources.limits['{GPU_RESOURCE}']) == string(self.tensorParallelSize)",
            message=f"resources.limits['{GPU_RESOURCE}'] must equal tensorParallelSize: one GPU per tensor-parallel "
            "rank (or leave the GPU count out and Quantrol sets it per arm)",
            check=_gpus_match_tensor_parallel,
            field_path=".tensorParallelSize",
        ),
    )


class ShadowDiffs(ApiModel):
    """Samples of prompts where the candidate's answer differed from the stable arm's, for a human to read side by
    side on the router's admin port (with its token). Prompts are user data: off by default."""

    enabled: bool = Field(default=False)
    max_samples: int = Field(default=50, ge=1, le=1000, description="The newest this many differing pairs are kept.")
    max_chars: int = Field(default=2000, ge=16, le=8192, description="Each text is cut to this many characters.")
    retention_seconds: int = Field(default=3600, ge=60, le=604_800, description="Older samples are dropped; all "
                                   "are dropped when the candidate leaves.")
    redact_patterns: list[RedactPattern] = Field(
        default_factory=list, max_length=16, description="Regular expressions (Python `re`) redacted besides the "
        "defaults (e-mail addresses, phone numbers, card numbers, keys, tokens, IP addresses).")

    @field_validator("redact_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        return check_patterns(patterns)


class ShadowStage(ApiModel):
    duration_seconds: int = Field(default=300, ge=0, le=604_800)
    mirror_fraction: float = Field(default=0.1, ge=0, le=1, description="Fraction of stable traffic mirrored.")
    diffs: ShadowDiffs = Field(default_factory=ShadowDiffs)


class CanaryStep(ApiModel):
    weight: int = Field(ge=1, le=100, description="Percent of live traffic on the candidate.")
    min_dwell_seconds: int = Field(default=300, ge=0, le=604_800)


class Probes(ApiModel):
    """Quality probes: the router replays held-out prompts per slice greedily to the stable arm and has the candidate
    score the answers, like mirrored requests but never live, so quality is judged when the traffic is sampled or
    absent. The prompts are the candidate artifact's evaluation prompts; a pinned artifact without them may name a
    ConfigMap instead."""

    rate_per_second: float = Field(default=0.5, ge=0, le=10,
                                   description="Probes started per second, per router replica (0: off).")
    max_tokens: int = Field(default=16, ge=1, le=256, description="Tokens the stable arm generates per probe.")
    config_map_ref: LocalObjectReference | None = Field(
        default=None, description="A ConfigMap of probe prompts: one key per slice, each a JSON list of prompt "
        "strings (used instead of the artifact's evaluation prompts).")


def _weights_strictly_increasing(r: Rollout) -> bool:
    weights = [s.weight for s in r.canary_steps]
    return all(a < b for a, b in itertools.pairwise(weights))


class Rollout(ApiModel):
    shadow: ShadowStage = Field(default_factory=ShadowStage)
    canary_steps: list[CanaryStep] = Field(
        default_factory=lambda: [CanaryStep(weight=w) for w in (5, 25, 50, 100)], min_length=1, max_length=20
    )
    promotion_grace_seconds: int = Field(
        default=300, ge=0, le=86_400, description="How long the old stable arm stays up (warm, still analysed) "
        "after a promotion: a breach or the rollback annotation within it returns traffic to it at once."
    )
    probes: Probes = Field(default_factory=Probes)

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            # isSorted() is in Kubernetes' CEL list library (1.27+); exists_one makes it strict. Guarded with has():
            # the CRD cannot default a list, so `rollout: {shadow: …}` reaches the API server without canarySteps,
            # and a rule reading an absent field fails there ("no such key") while the models fill the default.
            cel="!has(self.canarySteps) || (self.canarySteps.map(s, s.weight).isSorted() && "
            "self.canarySteps.all(a, self.canarySteps.exists_one(b, b.weight == a.weight)))",
            message="canarySteps weights must be strictly increasing",
            check=_weights_strictly_increasing,
            field_path=".canarySteps",
        ),
    )


class PrometheusEndpoint(ApiModel):
    address: str = Field(pattern=r"^https?://\S+$", max_length=1024, description="e.g. http://prometheus:9090")


DEFAULT_REQUEST_KL = 0.1  # nats per token: quality acceptance of one request when nothing else says


class QualityAcceptance(ApiModel):
    """When one compared request counts as quality-accepted: its teacher-forced mean KL within a limit. The share of
    accepted requests in a window is goodput's quality-acceptance term."""

    max_request_kl: float | None = Field(
        default=None, gt=0, le=100,
        description="Mean teacher-forced KL (nats per token) one compared request may show and still be accepted. "
        "Unset: from the candidate QuantizedModel's quality gate, per slice (its maxP99KlDivergence, else 2 × its "
        "maxMeanKlDivergence), else 0.1.")


class Analysis(ApiModel):
    prometheus: PrometheusEndpoint | None = Field(
        default=None, description="Where the SLO metrics live; the operator's default when unset."
    )
    interval_seconds: int = Field(default=5, ge=1, le=3600)
    window_seconds: int = Field(default=60, ge=5, le=86_400, description="Range each query looks back over.")
    failure_limit: int = Field(default=3, ge=1, le=100, description="Consecutive failing windows → rollback.")
    success_streak: int = Field(default=3, ge=1, le=100, description="Consecutive passing windows → next step.")
    inconclusive_limit: int = Field(default=30, ge=1, le=10_000, description="Consecutive → Paused.")
    error_limit: int = Field(default=10, ge=1, le=10_000, description="Consecutive query errors → Paused.")
    min_sample_count: int = Field(default=20, ge=1, description="Fewer requests in a window: inconclusive.")
    quality_acceptance: QualityAcceptance = Field(default_factory=QualityAcceptance)
    overload_hold_seconds: int = Field(
        default=600, ge=0, le=86_400,
        description="How long the rollout holds while both arms are overloaded; then the candidate steps back one "
        "canary step (never forward), and the hold starts again.")


class SloLimit(ApiModel):
    """A limit on one metric of the candidate arm: absolute, relative to the stable arm, or both."""

    max: float | None = Field(default=None, ge=0, description="Absolute limit on the candidate's value.")
    max_relative_to_stable: float | None = Field(
        default=None, gt=0, description="Candidate value ≤ this × the stable arm's value in the same window."
    )

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="has(self.max) || has(self.maxRelativeToStable)",
            message="set max, maxRelativeToStable, or both",
            check=lambda s: s.max is not None or s.max_relative_to_stable is not None,
        ),
    )


class SloFloor(ApiModel):
    """A floor on a metric where more is better (agreement, goodput)."""

    min: float | None = Field(default=None, ge=0)
    min_relative_to_stable: float | None = Field(default=None, gt=0)

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="has(self.min) || has(self.minRelativeToStable)",
            message="set min, minRelativeToStable, or both",
            check=lambda s: s.min is not None or s.min_relative_to_stable is not None,
        ),
    )


class CustomSlo(ApiModel):
    name: DnsLabel
    query: str = Field(
        min_length=1,
        max_length=4096,
        description="PromQL returning one value; `$arm`, `$namespace`, `$policy`, `$window` are substituted.",
    )
    max: float | None = None
    min: float | None = None

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="has(self.max) || has(self.min)",
            message="a custom SLO needs max, min, or both",
            check=lambda s: s.max is not None or s.min is not None,
        ),
    )


class Slos(ApiModel):
    """Service-level objectives the candidate must keep; latencies in seconds, rates as fractions."""

    ttft_p99: SloLimit | None = Field(
        default_factory=lambda: SloLimit(max=2.0, max_relative_to_stable=1.2),
        description="Time to first token, p99 (seconds).",
    )
    inter_token_latency_p99: SloLimit | None = Field(
        default_factory=lambda: SloLimit(max=0.2, max_relative_to_stable=1.2),
        description="Inter-token latency (TPOT), p99 (seconds).",
    )
    error_rate: SloLimit | None = Field(
        default_factory=lambda: SloLimit(max=0.01),
        description="Failed requests ÷ requests, as the router saw them: engine errors, timeouts, broken streams and "
        "429s from the admission bound. A client that hung up (499) is not the arm's error.")
    queue_time_p99: SloLimit | None = Field(default_factory=lambda: SloLimit(max=1.0, max_relative_to_stable=1.5))
    quality_delta: SloLimit | None = Field(
        default_factory=lambda: SloLimit(max=0.1),
        description="Mean teacher-forced KL divergence of the candidate's next-token distribution from the stable "
        "arm's, on the stable arm's own tokens (nats/token), sampled and greedy traffic alike; judged over all "
        "compared requests and per slice.",
    )
    agreement: SloFloor | None = Field(
        default_factory=lambda: SloFloor(min=0.9),
        description="Top-1 agreement of the two arms' next-token distributions on the stable arm's tokens "
        "(teacher-forced); judged over all compared requests and per slice.",
    )
    goodput: SloFloor | None = Field(
        default_factory=lambda: SloFloor(min_relative_to_stable=1.0),
        description="Online goodput vs the stable arm: output tokens of requests within the deadlines this "
        "policy's ttftP99 and interTokenLatencyP99 limits set, times the candidate's quality acceptance, per second "
        "of the arm's request time (fair although the arms carry unequal shares of the traffic). Capacity per "
        "engine-second is compared in qualification, at matched load, and reported here "
        "(status.lastAnalysis.goodput) without deciding.",
    )
    engine_queue_time_p99: SloLimit | None = Field(
        default_factory=lambda: SloLimit(max=1.0),
        description="The engine's own queue time, p99 (vllm:request_queue_time_seconds), seconds.")
    engine_waiting: SloLimit | None = Field(
        default=None, description="Requests waiting inside the engine, mean over the window, all replicas "
        "(vllm:num_requests_waiting). Unset by default: admission keeps the queue in the router, where "
        "queueTimeP99 judges it.")
    batch_occupancy: SloLimit | None = Field(
        default=None, description="Running requests ÷ (maxNumSeqs × replicas), mean over the window "
        "(vllm:num_requests_running). Unset by default: a full batch is what a batch budget is for; the analysis "
        "reads it to name a saturated arm.")
    kv_cache_usage: SloLimit | None = Field(
        default_factory=lambda: SloLimit(max=0.95),
        description="KV-cache usage, highest over the window (vllm:kv_cache_usage_perc, 0-1).")
    preemption_rate: SloLimit | None = Field(
        default_factory=lambda: SloLimit(max=0.1),
        description="Preemptions per second (vllm:num_preemptions): requests evicted for KV-cache room.")
    custom: list[CustomSlo] = Field(default_factory=list, max_length=32)


class Qualification(ApiModel):
    """Before any traffic, on the target: each arm measured with GuideLLM in three regimes (one request at a time;
    a rate sweep to the highest rate meeting the latency SLOs with bounded queue age; overload × factor, then
    recovery), through the policy's admission bounds, and the candidate engine's golden-output check against
    its artifact's evaluation prompts. Runs as a Job in the serving image."""

    enabled: bool = Field(
        default=True, description="false skips the Qualifying phase: ready arms with verified kernels go "
        "straight to Shadow, unmeasured (status.qualification says so).")
    output_tokens: int = Field(default=32, ge=1, le=4096, description="Output tokens asked per load request.")
    regimes: RegimeSettings = Field(default_factory=RegimeSettings, description="How long each regime may run.")
    golden_tolerance: GoldenTolerance = Field(
        default_factory=GoldenTolerance, description="How far the candidate engine's golden figures may fall "
        "behind the reference calibration measured on the same prompts before it is refused (GoldenOutputMismatch).")
    min_goodput_ratio: float = Field(
        default=1.0, gt=0, le=100, description="Candidate sustainable goodput ≥ this × the stable arm's "
        "(1.0: promote because it is faster on the target, not because it fits).")
    probe_prompts: ConfigMapKeyRef | None = Field(
        default=None, description="JSONL lines {slice, text}: the load's prompts when the candidate artifact "
        "carries no evaluation prompts (a pinned artifact); its golden-output check is then skipped, and said.")
    image: ImageRef | None = Field(
        default=None, description="The Job's image; the install's serving image (Quantrol's, holding the worker "
        "and GuideLLM) when unset, not serving.image, which may be a stock vLLM image. The install policy's image "
        "prefixes apply, as to the serving image.")


def _baseline_gpus_consistent(spec: ServingPolicySpec) -> bool:
    serving = spec.serving
    limit = serving.resources.limits.get(GPU_RESOURCE) if serving.resources else None
    tp = spec.baseline.tensor_parallel_size
    return tp is None or limit is None or str(limit) == str(tp)


class ServingPolicySpec(ApiModel):
    baseline: Baseline
    candidate: Candidate
    kernel_policy: KernelPolicy = Field(default=KernelPolicy.ENFORCE)
    deletion_policy: DeletionPolicy = Field(default=DeletionPolicy.DELETE)
    serving: ServingTemplate = Field(default_factory=ServingTemplate)
    router_replicas: int = Field(default=2, ge=1, le=100)
    rollout: Rollout = Field(default_factory=Rollout)
    analysis: Analysis = Field(default_factory=Analysis)
    slos: Slos = Field(default_factory=Slos)
    qualification: Qualification = Field(default_factory=Qualification)
    traffic_provider: TrafficProvider = Field(default=TrafficProvider.ROUTER)

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel=f"!has(self.baseline.tensorParallelSize) || !has(self.serving) || !has(self.serving.resources) || "
            f"!has(self.serving.resources.limits) || !('{GPU_RESOURCE}' in self.serving.resources.limits) || "
            f"string(self.serving.resources.limits['{GPU_RESOURCE}']) == string(self.baseline.tensorParallelSize)",
            message=f"serving.resources.limits['{GPU_RESOURCE}'] applies to every arm, and the baseline's "
            "tensorParallelSize differs: leave the GPU count out (Quantrol sets one GPU per rank on each arm)",
            check=_baseline_gpus_consistent,
            field_path=".baseline.tensorParallelSize",
        ),
    )


class RollbackReason(StrEnum):
    SLO_BREACH = "SloBreach"
    MANUAL = "Manual"
    KERNEL_UNAVAILABLE = "KernelUnavailable"
    KERNEL_FALLBACK = "KernelFallback"
    CANDIDATE_FAILED = "CandidateFailed"
    # Refused in the Qualifying phase, before any traffic (the worker's words: quantrol_worker.contracts).
    QUALIFICATION_FAILED = QualificationReason.QUALIFICATION_FAILED.value
    GOLDEN_OUTPUT_MISMATCH = QualificationReason.GOLDEN_OUTPUT_MISMATCH.value


class QualificationState(StrEnum):
    RUNNING = "Running"  # the Job measures
    PASSED = "Passed"  # every regime and the golden check passed, goodput ratio met: on to Shadow
    REFUSED = "Refused"  # QualificationFailed or GoldenOutputMismatch: rolled back before any traffic
    ERROR = "Error"  # the Job could not measure: the rollout holds (Paused) until a retry
    SKIPPED = "Skipped"  # spec.qualification.enabled is false


class QualificationStatus(StatusModel):
    """What the Qualifying phase measured for the pinned candidate, per arm and regime (units in the field names),
    and the golden-output check per slice. Figures are the Job's report, bounded (at most 4 KB)."""

    state: QualificationState
    candidate_artifact: str | None = None
    attempt: int = Field(default=0, ge=0, description="Counts qualification runs of this policy; names the Job.")
    job_name: str | None = None
    reason: str | None = Field(default=None, description="Qualified, QualificationFailed, GoldenOutputMismatch, …")
    message: str = ""
    tool: str | None = Field(default=None, description="The load generator and its version.")
    arms: list[ArmQualification] = Field(default_factory=list, max_length=2)
    golden: list[GoldenSlice] = Field(default_factory=list, max_length=64)
    golden_source: str | None = None
    goodput_ratio: float | None = Field(default=None, description="Candidate ÷ stable sustainable goodput.")
    required_goodput_ratio: float | None = Field(default=None, description="spec.qualification.minGoodputRatio.")
    started: datetime | None = None
    finished: datetime | None = None


class MetricResult(StatusModel):
    slo: str
    slice: str | None = Field(default=None, description="The slice this row judges; unset: all traffic.")
    arm: str = "candidate"
    value: float | None = None
    stable_value: float | None = None
    limit: float | None = None
    verdict: Verdict
    cause: Cause | None = Field(default=None, description="Why this row did not pass.")
    suspect: bool | None = Field(
        default=None, description="A slice with too few comparisons to judge whose figure so far breaks the limit: "
        "it holds the window (never a pass) until it has enough to fail, or clears.")
    message: str | None = None


class GoodputFigures(StatusModel):
    """One arm's goodput in the window, both ways (README, "Goodput"): the online SLO decides on `value`;
    `perEngineSecond` is capacity, which only qualification compares fairly."""

    arm: str
    accepted_share: float | None = Field(
        default=None, description="Output tokens of requests within their deadlines ÷ all output tokens.")
    quality_acceptance: float | None = Field(
        default=None, description="Share of compared requests quality-accepted; 1 for the stable arm (the "
        "reference); unset when nothing was compared.")
    value: float | None = Field(
        default=None, description="Accepted output tokens × qualityAcceptance per second of the arm's request time: "
        "the goodput SLO's figure (on time, good and fast per token, whatever share of traffic the arm carries).")
    per_engine_second: float | None = Field(
        default=None, description="Accepted output tokens × quality acceptance ÷ (replicas × engine slots × window).")


class RequestMix(StatusModel):
    """What the window judged: requests per slice (both arms, live and mirrored) and compared requests by decoding."""

    slices: dict[str, int] = Field(default_factory=dict, max_length=64)
    decoding: dict[str, int] = Field(default_factory=dict, max_length=4)


class AnalysisRun(StatusModel):
    time: datetime
    window_seconds: int
    verdict: Verdict
    cause: Cause | None = Field(default=None, description="Why this window did not pass, when it did not.")
    no_judgement: NoJudgement | None = Field(
        default=None, description="Why this window could not judge (set when the verdict is inconclusive or error).")
    metrics: list[MetricResult] = Field(default_factory=list, max_length=64)
    goodput: list[GoodputFigures] = Field(default_factory=list, max_length=2)
    request_mix: RequestMix | None = None


class RollbackRecord(StatusModel):
    reason: RollbackReason
    slo: str | None = Field(default=None, description="The first failing SLO of the deciding window.")
    slice: str | None = Field(default=None, description="The slice that SLO failed on, when one slice failed it.")
    cause: Cause | None = Field(default=None, description="The deciding window's cause.")
    failing_slos: list[str] = Field(default_factory=list, max_length=64,
                                    description="Every SLO that failed in the deciding window.")
    candidate_value: float | None = None
    stable_value: float | None = None
    limit: float | None = None
    window_seconds: int | None = None
    time: datetime
    candidate_artifact: str | None = None
    message: str = ""


class Transition(StatusModel):
    time: datetime
    from_phase: RolloutPhase | None = Field(default=None, alias="from")
    to_phase: RolloutPhase = Field(alias="to")
    step: int | None = None
    reason: str
    message: str = ""


class Weights(StatusModel):
    stable: int = Field(default=100, ge=0, le=100)
    candidate: int = Field(default=0, ge=0, le=100)
    mirror_fraction: float = Field(default=0.0, ge=0, le=1)


class KernelReport(StatusModel):
    """What the candidate engine's launcher found in use, against the scheme's promise."""

    verdict: KernelVerdict = Field(default=KernelVerdict.UNKNOWN)
    kernels: list[str] = Field(default_factory=list, max_length=32)
    message: str = ""


class RouterReplicas(StatusModel):
    """How far the push of `version` got: router pods that confirmed it, of those that serve now or will."""

    confirmed: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0, description="The router Deployment's current pods, ready or not.")


class RouterState(StatusModel):
    """The router config the operator last wrote (ConfigMap) and pushed (each router pod's admin endpoint)."""

    version: int = 0
    config_hash: str | None = None
    applied_version: int | None = Field(
        default=None, description="The last version every current router pod confirmed on its admin endpoint.")
    replicas: RouterReplicas | None = None


class ProbeSource(StrEnum):
    ARTIFACT = "artifact"  # the candidate artifact's evaluation prompts
    CONFIG_MAP = "configMap"  # spec.rollout.probes.configMapRef
    NONE = "none"  # quality rests on live comparison alone


class ProbeStatus(StatusModel):
    """Where the quality probes' prompts come from, and how many the routers hold per slice (as they report them
    to Prometheus; unset until an analysis window read it)."""

    source: ProbeSource = ProbeSource.NONE
    prompts: dict[str, int] | None = Field(default=None, max_length=64,
                                           description="Prompts per slice the routers hold.")
    message: str = ""


class EngineReport(StatusModel):
    """What an arm's engine reported at start through its launcher, and the image its pods run: with the arm's
    settings, the serving-side experiment envelope. Read once per arm: an engine's start does not change."""

    version: str | None = Field(default=None, description="The engine's version, as it logs it at start.")
    device: str | None = Field(default=None, description="The engine's device, as it reports it (cpu, cuda, …).")
    image: str | None = Field(default=None, description="The engine container's image digest (pod imageID).")
    flags: list[str] = Field(default_factory=list, max_length=64, description="The engine's command-line flags.")
    settings: dict[str, str] = Field(default_factory=dict, max_length=16,
                                     description="Effective settings the engine reports (dtype, kv-cache dtype, …).")


class ArmStatus(StatusModel):
    """One serving arm: as it is built now (its engine flags are what vLLM runs with) and what its engine reported
    once it started (`engine`)."""

    artifact: str
    short_digest: str
    settings: str = Field(description="Whose engine settings the arm runs with: baseline or candidate (they stay "
                          "with the artifact when it is promoted, so a stable arm may run the candidate's; its role is "
                          "stableArtifact/candidateArtifact's business).")
    replicas: int = 0
    tensor_parallel_size: int = 1
    gpus: int = Field(default=0, description="nvidia.com/gpu per engine pod.")
    kv_cache_dtype: str = "auto"
    size_bytes: int | None = Field(default=None, description="The artifact's size, when its manifest told it.")
    storage: str = Field(default="", description="The model volume per pod: medium and size, or why unbounded.")
    engine_args: list[str] = Field(default_factory=list, max_length=96, description="vLLM's flags, as run.")
    engine: EngineReport | None = Field(default=None, description="Unset until the arm's engine has started and "
                                        "reported.")


class HandledAnnotations(StatusModel):
    retry: str | None = None
    rollback: str | None = None


class AnalysisCounters(StatusModel):
    """Streak counters, kept in status so an operator restart resumes them instead of resetting
    (rollout.analysis.decide folds each window into them)."""

    consecutive_failures: int = 0
    consecutive_successes: int = 0
    consecutive_inconclusive: int = 0
    consecutive_errors: int = 0
    newest_sample_time: datetime | None = None
    overloaded_since: datetime | None = Field(
        default=None, description="The newest sample time of the first window of the current overload hold.")


class ServingPolicyStatus(StatusModel):
    phase: RolloutPhase = RolloutPhase.PENDING
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST_MAP)
    message: str | None = None
    step: int | None = Field(default=None, description="Index of the current canary step, from 0.")
    weights: Weights = Field(default_factory=Weights)
    stable_artifact: str | None = Field(default=None, description="What serves now, pinned by digest.")
    stable_short_digest: str | None = None
    candidate_artifact: str | None = Field(default=None, description="The pinned candidate under rollout.")
    candidate_short_digest: str | None = None
    rollback_target: str | None = None
    guard_until: datetime | None = Field(
        default=None, description="After a promotion: until when the previous stable arm is kept warm and the "
        "analysis goes on (promotionGraceSeconds); a breach or the rollback annotation returns traffic to it.")
    phase_since: datetime | None = None
    paused_from: RolloutPhase | None = Field(default=None, description="The phase a user pause interrupted.")
    candidate_kernels: KernelReport | None = None
    probes: ProbeStatus | None = None
    arms: list[ArmStatus] = Field(default_factory=list, max_length=4,
                                  description="Each serving arm's effective engine settings and what its engine "
                                  "reported (stable, candidate, and the old stable arm kept warm after a promotion).")
    qualification: QualificationStatus | None = None
    router: RouterState = Field(default_factory=RouterState)
    last_analysis: AnalysisRun | None = None
    counters: AnalysisCounters = Field(default_factory=AnalysisCounters)
    rollback: RollbackRecord | None = None
    handled_annotations: HandledAnnotations = Field(default_factory=HandledAnnotations)
    history: list[Transition] = Field(default_factory=list, max_length=HISTORY_LIMIT)


class ServingPolicy(ApiModel):
    api_version: str = Field(default=API_VERSION)
    kind: str = Field(default=KIND)
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: ServingPolicySpec
    status: ServingPolicyStatus | None = None

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (NAME_RULE,)
