"""One serving arm per artifact: a Deployment running vLLM under Quantrol's launcher, and its Service.

Arms are named after the artifact's digest, not after their role: a role (stable, candidate) moves from
artifact to artifact at promotion without restarting a single pod, because only the router's weights change.
"""

from __future__ import annotations

import hashlib
from typing import Any

from quantrol_operator.api.servingpolicy import KvCacheDtype, ServingPolicySpec
from quantrol_operator.children import (
    MANAGED_BY,
    child_name,
    label_value,
    owner_reference,
    quantities,
    restricted,
)

ENGINE_PORT = 8000
LAUNCHER_PORT = 9400  # the launcher's status port: /metrics (quantrol_engine_kernel_info) and /kernels
# Container and Service port names (at most 15 characters); the PodMonitor's endpoints name them.
ENGINE_PORT_NAME = "http"  # vLLM's OpenAI server, /metrics included
LAUNCHER_PORT_NAME = "launcher"
MODEL_DIR = "/models/artifact"
LABEL_POLICY = "quantrol.io/servingpolicy"
LABEL_ARM = "quantrol.io/arm"
LOOPBACK_REGISTRIES = ("127.0.0.1", "localhost")
TERMINATION_LOG = "/dev/termination-log"


def short_digest(ref: str) -> str:
    """12 hex digits naming an artifact: its sha256 digest when pinned, else a hash of the reference."""
    if "@sha256:" in ref:
        return ref.rsplit("@sha256:", 1)[1][:12]
    return hashlib.sha256(ref.encode()).hexdigest()[:12]


def arm_name(policy: str, ref: str) -> str:
    return child_name(policy, short_digest(ref))


def arm_selector(policy: str, ref: str) -> dict[str, str]:
    return {LABEL_POLICY: label_value(policy), LABEL_ARM: short_digest(ref)}


def engine_args(policy: str, spec: ServingPolicySpec) -> list[str]:
    """vLLM's OpenAI server flags (the launcher runs `python -m vllm.entrypoints.openai.api_server` with them),
    with the batch budget as flags: the bound that keeps the candidate honest."""
    serving = spec.serving
    args = [
        "--model", MODEL_DIR,
        "--served-model-name", policy,
        "--host", "0.0.0.0",
        "--port", str(ENGINE_PORT),
        "--max-num-seqs", str(serving.batch_budget.max_num_seqs),
        "--max-num-batched-tokens", str(serving.batch_budget.max_num_batched_tokens),
    ]
    if serving.kv_cache_dtype is not KvCacheDtype.AUTO:
        args += ["--kv-cache-dtype", serving.kv_cache_dtype.value]
    if serving.max_model_len:
        args += ["--max-model-len", str(serving.max_model_len)]
    return args


def fetch_args(ref: str) -> list[str]:
    args = ["quantrol-worker", "fetch", "--ref", ref, "--dest", MODEL_DIR, "--termination-log", TERMINATION_LOG]
    host = ref.removeprefix("oci://").split("/", 1)[0].split(":", 1)[0]
    if host in LOOPBACK_REGISTRIES:
        args.append("--insecure")  # plain HTTP only for a registry on the node itself (the local stack)
    return args


def arm_deployment(owner: dict[str, Any], spec: ServingPolicySpec, ref: str, image: str,
                   replicas: int) -> dict[str, Any]:
    meta = owner["metadata"]
    policy = meta["name"]
    selector = arm_selector(policy, ref)
    serving = spec.serving
    # The launcher holds fp8 KV caches to their promise (calibrated scales, not a default 1.0).
    kv_flags = ["--kv-cache-scheme", "fp8"] if serving.kv_cache_dtype is not KvCacheDtype.AUTO else []
    container: dict[str, Any] = {
        "name": "engine",
        "image": serving.image or image,
        # The termination-message path is passed explicitly so it is the same on a cluster and under the local
        # runner, which rewrites declared paths (a program's built-in default it cannot see).
        "command": ["quantrol-worker", "serve", "--target", serving.target.value, "--status-port",
                    str(LAUNCHER_PORT), "--termination-log", TERMINATION_LOG, *kv_flags, "--",
                    *engine_args(policy, spec)],
        "ports": [{"name": ENGINE_PORT_NAME, "containerPort": ENGINE_PORT},
                  {"name": LAUNCHER_PORT_NAME, "containerPort": LAUNCHER_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": ENGINE_PORT}, "periodSeconds": 2,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", "port": ENGINE_PORT}, "initialDelaySeconds": 600,
                          "periodSeconds": 10},
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if serving.resources:
        container["resources"] = quantities(serving.resources.to_wire())
    pod_spec: dict[str, Any] = {
        "initContainers": [{
            "name": "fetch",
            "image": serving.image or image,
            "command": fetch_args(ref),
            "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}],
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }],
        "containers": [container],
        "volumes": [{"name": "model", "emptyDir": {}}],
    }
    if serving.node_selector:
        pod_spec["nodeSelector"] = dict(serving.node_selector)
    labels = {**MANAGED_BY, **selector}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": arm_name(policy, ref), "namespace": meta["namespace"], "labels": labels,
                     "annotations": {"quantrol.io/artifact": ref},
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(ENGINE_PORT),
                    "quantrol.io/artifact": ref}},
                "spec": restricted(pod_spec),
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
