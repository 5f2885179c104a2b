"""One serving arm per artifact: a Deployment running vLLM under Quantrol's launcher, and its Service.

Arms are named after the artifact's digest, not after their role: a role (stable, candidate) moves from
artifact to artifact at promotion without restarting a single pod, because only the router's weights change. So an
arm's engine settings belong to the artifact too (`ArmEngine`: the baseline's or the candidate's), never to the
role it holds today.

The engine image is the user's: any vLLM OpenAI-server image, stock `vllm/vllm-openai` included. Quantrol's part of
the pod comes from its tools image (the operator's own release) in two init containers: `launcher` copies the
launcher, pure Python that needs only what vLLM brings (pydantic, prometheus_client), into a shared volume, and
`fetch` pulls the artifact by digest into the model volume, verifying every byte, and refuses a mismatch, a
registry that says no, or a volume too small. The engine container then runs `python3 -m quantrol_worker serve`
from that volume, which starts vLLM's OpenAI server with the arm's flags and verifies the kernels it loads.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from quantrol_operator.api.common import GPU_RESOURCE
from quantrol_operator.api.servingpolicy import KvCacheDtype, ServingPolicySpec, StorageMedium
from quantrol_operator.children import (
    MANAGED_BY,
    canonical_quantity,
    child_name,
    label_value,
    owner_reference,
    placed,
    quantities,
    restricted,
)
from quantrol_operator.children.calibration import (
    REGISTRY_CONFIG,
    registry_credentials_mount,
    registry_credentials_volume,
)
from quantrol_operator.policy import InstallPolicy, registry_host
from quantrol_worker.contracts import Target

ENGINE_PORT = 8000
LAUNCHER_PORT = 9400  # the launcher's status port: /metrics (quantrol_engine_kernel_info), /kernels and /ready
# Container and Service port names (at most 15 characters); the PodMonitor's endpoints name them.
ENGINE_PORT_NAME = "http"  # vLLM's OpenAI server, /metrics included
LAUNCHER_PORT_NAME = "launcher"
MODEL_DIR = "/models/artifact"
# The launcher's package, copied by the `launcher` init container: a folder of its own, since a mount there hides
# whatever the engine image keeps at that path (Quantrol's own images keep their Python in /opt/quantrol).
LAUNCHER_DIR = "/opt/quantrol-launcher"
SHM_DIR = "/dev/shm"
LABEL_POLICY = "quantrol.io/servingpolicy"
LABEL_ARM = "quantrol.io/arm"
TERMINATION_LOG = "/dev/termination-log"
GIB = 1 << 30
PROBE_PERIOD = 10  # seconds between startup and liveness probes


@dataclass(frozen=True)
class ArmEngine:
    """What one arm's engine runs with, decided by the planner for its artifact: the baseline's settings or the
    candidate's (kept when the candidate is promoted), its tensor-parallel size and KV-cache dtype, and the
    artifact's size when a manifest told it (a QuantizedModel's status)."""

    ref: str
    settings: str  # "baseline" or "candidate": whose settings, not the role (stable, candidate) it holds today
    tensor_parallel_size: int = 1
    kv_cache_dtype: KvCacheDtype = KvCacheDtype.AUTO
    size_bytes: int | None = None


@dataclass(frozen=True)
class ServingContext:
    """What every arm of one policy shares beyond its spec: the installation's images and policy, and the Secret the
    fetch step logs in to registries with."""

    serving_image: str
    tools_image: str
    policy: InstallPolicy = field(default_factory=InstallPolicy)
    credentials_secret: str | None = None


def short_digest(ref: str) -> str:
    """12 hex digits naming an artifact: its sha256 digest when pinned, else a hash of the reference."""
    if "@sha256:" in ref:
        return ref.rsplit("@sha256:", 1)[1][:12]
    return hashlib.sha256(ref.encode()).hexdigest()[:12]


def arm_name(policy: str, ref: str) -> str:
    return child_name(policy, short_digest(ref))


def arm_selector(policy: str, ref: str) -> dict[str, str]:
    return {LABEL_POLICY: label_value(policy), LABEL_ARM: short_digest(ref)}


def engine_args(policy: str, spec: ServingPolicySpec, arm: ArmEngine) -> list[str]:
    """vLLM's OpenAI server flags (the launcher runs `python -m vllm.entrypoints.openai.api_server` with them),
    with the batch budget as flags (the bound that keeps the candidate honest), the arm's own tensor-parallel size
    and KV cache, then the spec's extra flags (which may not repeat any of these: admission refuses that)."""
    serving = spec.serving
    args = [
        "--model", MODEL_DIR,
        "--served-model-name", policy,
        "--host", "0.0.0.0",
        "--port", str(ENGINE_PORT),
        "--max-num-seqs", str(serving.batch_budget.max_num_seqs),
        "--max-num-batched-tokens", str(serving.batch_budget.max_num_batched_tokens),
        "--tensor-parallel-size", str(arm.tensor_parallel_size),
    ]
    if arm.kv_cache_dtype is not KvCacheDtype.AUTO:
        args += ["--kv-cache-dtype", arm.kv_cache_dtype.value]
    if serving.max_model_len:
        args += ["--max-model-len", str(serving.max_model_len)]
    return [*args, *serving.engine_args]


def gpus(spec: ServingPolicySpec, arm: ArmEngine) -> int:
    """nvidia.com/gpu per engine pod: one per tensor-parallel rank on a cuda target, none on a CPU."""
    return 0 if spec.serving.target is Target.CPU_X86 else arm.tensor_parallel_size


def storage_bytes(spec: ServingPolicySpec, arm: ArmEngine) -> int | None:
    """The model volume per pod: the spec's size, else the artifact's plus 10% and 1 GiB (the fetch step stages one
    file at a time inside the volume), else None (unknown: unbounded)."""
    if spec.serving.storage.size is not None:
        return int(parse_quantity(spec.serving.storage.size))  # type: ignore[no-untyped-call]
    if arm.size_bytes is None:
        return None
    return math.ceil(arm.size_bytes * 1.1) + GIB


def storage_summary(spec: ServingPolicySpec, arm: ArmEngine) -> str:
    size = storage_bytes(spec, arm)
    medium = spec.serving.storage.medium.value
    if size is None:
        return (f"{medium}, unbounded: the artifact's size is unknown (set spec.serving.storage.size to request "
                "ephemeral storage and bound the volume)")
    return f"{medium}, {_mebibytes(size)}"


def shared_memory(spec: ServingPolicySpec, arm: ArmEngine) -> str:
    """/dev/shm per pod: NCCL's shared-memory transport and vLLM's worker queues grow with the ranks."""
    if spec.serving.shared_memory_size is not None:
        return canonical_quantity(spec.serving.shared_memory_size)
    return canonical_quantity(f"{1 + 2 * (arm.tensor_parallel_size - 1)}Gi")


def _mebibytes(size: int) -> str:
    """Whole MiB, rounded up, in the API server's canonical form (`307200Mi` is stored as `300Gi`): a re-read compares
    equal, so a steady state writes nothing."""
    return canonical_quantity(f"{math.ceil(size / (1 << 20))}Mi")


def fetch_args(ref: str, context: ServingContext, max_bytes: int | None = None) -> list[str]:
    args = ["quantrol-worker", "fetch", "--ref", ref, "--dest", MODEL_DIR, "--termination-log", TERMINATION_LOG]
    if context.policy.allows_plain_http(registry_host(ref)):
        args.append("--insecure")  # the install policy's plain-HTTP registries, the same list push honours
    if context.credentials_secret:
        args += ["--registry-config", REGISTRY_CONFIG]
    if max_bytes is not None:
        args += ["--max-bytes", str(max_bytes)]  # refuse before downloading what cannot fit
    return args


def _engine_resources(spec: ServingPolicySpec, arm: ArmEngine) -> dict[str, dict[str, str]]:
    resources = quantities(spec.serving.resources.to_wire()) if spec.serving.resources else {}
    count = gpus(spec, arm)
    if count:
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(count)
        if GPU_RESOURCE in resources.get("requests", {}):
            resources["requests"][GPU_RESOURCE] = str(count)  # extended resources: requests equal limits
    size = storage_bytes(spec, arm)
    if spec.serving.storage.medium is StorageMedium.EMPTY_DIR and size is not None:
        # The scheduler places the pod only where the node's disk holds the model; the kubelet evicts beyond it.
        resources.setdefault("requests", {}).setdefault("ephemeral-storage", _mebibytes(size))
    return resources


def _model_volume(spec: ServingPolicySpec, arm: ArmEngine, labels: dict[str, str]) -> dict[str, Any]:
    storage, size = spec.serving.storage, storage_bytes(spec, arm)
    if storage.medium is StorageMedium.EPHEMERAL_VOLUME:
        claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": _mebibytes(size or GIB)}}}
        if storage.storage_class_name:
            claim["storageClassName"] = storage.storage_class_name
        return {"name": "model", "ephemeral": {"volumeClaimTemplate": {"metadata": {"labels": labels},
                                                                        "spec": claim}}}
    return {"name": "model", "emptyDir": {"sizeLimit": _mebibytes(size)} if size is not None else {}}


def _probes(spec: ServingPolicySpec) -> dict[str, Any]:
    """Startup covers the load (weights from the volume, CUDA graphs) up to maxLoadSeconds; liveness runs only after
    it; readiness is the launcher's: vLLM healthy and its kernels verified (never `none`)."""
    health = {"path": "/health", "port": ENGINE_PORT_NAME}
    return {
        "startupProbe": {"httpGet": health, "periodSeconds": PROBE_PERIOD, "timeoutSeconds": 5,
                         "failureThreshold": math.ceil(spec.serving.max_load_seconds / PROBE_PERIOD)},
        "livenessProbe": {"httpGet": health, "periodSeconds": PROBE_PERIOD, "timeoutSeconds": 5,
                          "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": LAUNCHER_PORT_NAME}, "periodSeconds": 2,
                           "timeoutSeconds": 3, "failureThreshold": 3},
    }


def _engine(policy: str, spec: ServingPolicySpec, arm: ArmEngine, image: str) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "engine",
        "image": image,
        # The termination-message path is passed explicitly so it is the same on a cluster and under the local
        # runner, which rewrites declared paths (a program's built-in default it cannot see).
        "command": ["python3", "-m", "quantrol_worker", "serve", "--target", spec.serving.target.value,
                    "--status-port", str(LAUNCHER_PORT), "--termination-log", TERMINATION_LOG, "--",
                    *engine_args(policy, spec, arm)],
        "env": [{"name": "PYTHONPATH", "value": LAUNCHER_DIR}],
        "ports": [{"name": ENGINE_PORT_NAME, "containerPort": ENGINE_PORT},
                  {"name": LAUNCHER_PORT_NAME, "containerPort": LAUNCHER_PORT}],
        **_probes(spec),
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True},
                         {"name": "quantrol", "mountPath": LAUNCHER_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": SHM_DIR}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _engine_resources(spec, arm)
    if resources:
        container["resources"] = resources
    return container


def _init_containers(arm: ArmEngine, context: ServingContext, max_bytes: int | None) -> list[dict[str, Any]]:
    fetch_mounts: list[dict[str, Any]] = [{"name": "model", "mountPath": MODEL_DIR}]
    if context.credentials_secret:
        fetch_mounts.append(registry_credentials_mount())
    return [
        {"name": "launcher", "image": context.tools_image,
         "command": ["quantrol-worker", "install-launcher", "--dest", LAUNCHER_DIR],
         "volumeMounts": [{"name": "quantrol", "mountPath": LAUNCHER_DIR}],
         "terminationMessagePolicy": "FallbackToLogsOnError"},
        {"name": "fetch", "image": context.tools_image, "command": fetch_args(arm.ref, context, max_bytes),
         "volumeMounts": fetch_mounts, "terminationMessagePolicy": "FallbackToLogsOnError"},
    ]


def _pod_spec(policy: str, spec: ServingPolicySpec, arm: ArmEngine, context: ServingContext,
              labels: dict[str, str]) -> dict[str, Any]:
    serving = spec.serving
    volumes = [_model_volume(spec, arm, labels),
               {"name": "quantrol", "emptyDir": {"sizeLimit": "64Mi"}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shared_memory(spec, arm)}}]
    if context.credentials_secret:
        volumes.append(registry_credentials_volume(context.credentials_secret))
    pod_spec: dict[str, Any] = {
        "initContainers": _init_containers(arm, context, storage_bytes(spec, arm)),
        "containers": [_engine(policy, spec, arm, serving.image or context.serving_image)],
        "volumes": volumes,
    }
    return placed(pod_spec, serving)


def arm_deployment(owner: dict[str, Any], spec: ServingPolicySpec, arm: ArmEngine, context: ServingContext,
                   replicas: int) -> dict[str, Any]:
    meta = owner["metadata"]
    policy = meta["name"]
    selector = arm_selector(policy, arm.ref)
    labels = {**MANAGED_BY, **selector}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": arm_name(policy, arm.ref), "namespace": meta["namespace"], "labels": labels,
                     "annotations": {"quantrol.io/artifact": arm.ref, "quantrol.io/arm-settings": arm.settings},
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(ENGINE_PORT),
                    "quantrol.io/artifact": arm.ref}},
                "spec": restricted(_pod_spec(policy, spec, arm, context, labels)),
            },
        },
    }


def arm_service(owner: dict[str, Any], ref: str) -> dict[str, Any]:
    meta = owner["metadata"]
    selector = arm_selector(meta["name"], ref)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": arm_name(meta["name"], ref), "namespace": meta["namespace"],
                     "labels": {**MANAGED_BY, **selector}, "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "selector": selector,
            "ports": [{"name": ENGINE_PORT_NAME, "port": ENGINE_PORT, "targetPort": ENGINE_PORT},
                      {"name": LAUNCHER_PORT_NAME, "port": LAUNCHER_PORT, "targetPort": LAUNCHER_PORT}],
        },
    }
