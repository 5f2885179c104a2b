"""The router in front of the arms: its config (ConfigMap, the durable copy), Deployment and Service.

The Service carries the policy's own name: it is the address clients use, whatever serves behind it.
"""

from __future__ import annotations

import math
from typing import Any

from quantrol_operator.api.servingpolicy import ProbeSource, ServingPolicySpec, SloLimit
from quantrol_operator.children import MANAGED_BY, child_name, label_value, owner_reference, restricted
from quantrol_operator.children.calibration import (
    REGISTRY_CONFIG,
    registry_credentials_mount,
    registry_credentials_volume,
)
from quantrol_operator.children.serving import ENGINE_PORT, LABEL_POLICY, ServingContext, arm_name
from quantrol_operator.policy import InstallPolicy, registry_host
from quantrol_worker.contracts import DEFAULT_REDACT_PATTERNS
from quantrol_worker.router.config import (
    INTERACTIVE,
    MAX_BODY_BYTES,
    AdmissionLimits,
    ArmConfig,
    CompareConfig,
    DiffsConfig,
    GoodputDeadline,
    ProbeConfig,
    RouterConfig,
    SliceRule,
    dump_config,
)

ROUTER_PORT = 8080
ROUTER_PORT_NAME = "http"  # container and Service port name; the PodMonitor's router endpoint names it
# The admin API (config pushes, diffs) on its own port: a container port the Service does not expose, which the chart's
# NetworkPolicy opens to the operator only. Defences hold without it too: a token, arm URLs only of this namespace's
# Services, versions only from the operator's sequence (quantrol_worker.router.config).
ADMIN_PORT = 8081
ADMIN_PORT_NAME = "admin"
# The router holds requests and streams, not models: bounded so that no client can grow it past its node's share.
ROUTER_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
CONFIG_DIR = "/etc/quantrol/router"
CONFIG_FILE = "router.yaml"
TOKEN_DIR = "/etc/quantrol/admin"
PROBES_DIR = "/etc/quantrol/probes"  # the policy's ConfigMap of probe prompts, when it names one
TOKEN_KEY = "token"
LABEL_COMPONENT = "app.kubernetes.io/component"
UPSTREAM_TIMEOUT_S = 600.0


def router_name(policy: str) -> str:
    return child_name(policy, "router")


def router_selector(policy: str) -> dict[str, str]:
    return {LABEL_POLICY: label_value(policy), LABEL_COMPONENT: "router"}


def admin_secret_name(policy: str) -> str:
    return child_name(policy, "router-admin")


def arm_url(policy: str, namespace: str, ref: str) -> str:
    return f"http://{arm_name(policy, ref)}.{namespace}.svc:{ENGINE_PORT}"


def admission_limits(spec: ServingPolicySpec) -> AdmissionLimits:
    """One router replica's share of the policy's admission bound per arm. Unset, the bound is what the arm's
    engines can run at once (maxNumSeqs × replicas), so requests beyond it wait in the router, where the queue is
    measured and judged, not unseen inside the engine."""
    admission, replicas = spec.serving.admission, spec.router_replicas
    total = admission.max_in_flight or spec.serving.batch_budget.max_num_seqs * spec.serving.replicas
    return AdmissionLimits(max_in_flight=math.ceil(total / replicas),
                           max_queue=math.ceil(admission.max_queue / replicas),
                           max_queue_wait_s=admission.max_queue_wait_seconds)


def goodput_deadline(spec: ServingPolicySpec) -> GoodputDeadline:
    """The deadline a request must meet for its tokens to count as accepted (goodput): the policy's absolute TTFT
    and inter-token limits; a latency without an absolute limit sets no deadline (the upstream timeout)."""
    def bound(limit: SloLimit | None) -> float:
        return limit.max if limit is not None and limit.max else UPSTREAM_TIMEOUT_S

    return GoodputDeadline(name=INTERACTIVE, ttft_s=bound(spec.slos.ttft_p99),
                           tpot_s=bound(spec.slos.inter_token_latency_p99))


def probe_config(spec: ServingPolicySpec, candidate_ref: str | None, source: ProbeSource,
                 context: ServingContext | None = None) -> ProbeConfig:
    """The router reads the candidate artifact's evaluation prompts as the arms' fetch step does: plain HTTP only to
    the install policy's registries, logged in with the same Secret (mounted by router_deployment)."""
    probes = spec.rollout.probes
    if candidate_ref is None or source is ProbeSource.NONE:
        return ProbeConfig()
    if source is ProbeSource.CONFIG_MAP:
        return ProbeConfig(directory=PROBES_DIR, rate_per_second=probes.rate_per_second, max_tokens=probes.max_tokens)
    policy = context.policy if context is not None else InstallPolicy()
    logged_in = context is not None and bool(context.credentials_secret)
    return ProbeConfig(artifact=candidate_ref, insecure=policy.allows_plain_http(registry_host(candidate_ref)),
                       registry_config=REGISTRY_CONFIG if logged_in else None,
                       rate_per_second=probes.rate_per_second, max_tokens=probes.max_tokens)


def router_config(policy: str, namespace: str, spec: ServingPolicySpec, stable_ref: str, candidate_ref: str | None,
                  stable_weight: int, candidate_weight: int, mirror_fraction: float, version: int, *,
                  max_body_bytes: int = MAX_BODY_BYTES, slices: SliceRule | None = None,
                  compare: CompareConfig | None = None, probe_source: ProbeSource = ProbeSource.NONE,
                  context: ServingContext | None = None) -> RouterConfig:
    """`slices` and `compare`: the slice names and per-request quality limits; `probe_source`: where the probes'
    prompts come from (planning/slices.py). Probes run only while there is a candidate to compare."""
    limits = admission_limits(spec)
    arms = {"stable": ArmConfig(url=arm_url(policy, namespace, stable_ref), weight=stable_weight, admission=limits)}
    if candidate_ref is not None:
        arms["candidate"] = ArmConfig(url=arm_url(policy, namespace, candidate_ref), weight=candidate_weight,
                                      admission=limits)
    wanted = spec.rollout.shadow.diffs
    diffs = DiffsConfig(enabled=wanted.enabled, capacity=wanted.max_samples, max_chars=wanted.max_chars,
                        retention_s=float(wanted.retention_seconds),
                        redact_patterns=[*DEFAULT_REDACT_PATTERNS, *wanted.redact_patterns])
    return RouterConfig(version=version, arms=arms, mirror_fraction=mirror_fraction if candidate_ref else 0.0,
                        max_body_bytes=max_body_bytes, diffs=diffs, slices=slices or SliceRule(),
                        compare=compare or CompareConfig(),
                        probes=probe_config(spec, candidate_ref, probe_source, context),
                        goodput_deadlines=[goodput_deadline(spec)], upstream_timeout_s=UPSTREAM_TIMEOUT_S)


def _meta(owner: dict[str, Any], name: str) -> dict[str, Any]:
    policy = owner["metadata"]["name"]
    return {"name": name, "namespace": owner["metadata"]["namespace"],
            "labels": {**MANAGED_BY, LABEL_POLICY: label_value(policy), LABEL_COMPONENT: "router"},
            "ownerReferences": [owner_reference(owner)]}


def router_config_map(owner: dict[str, Any], config: RouterConfig) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(owner, router_name(owner["metadata"]["name"])),
            "data": {CONFIG_FILE: dump_config(config)}}


def router_deployment(owner: dict[str, Any], spec: ServingPolicySpec, image: str,
                      credentials_secret: str | None = None) -> dict[str, Any]:
    """`credentials_secret`: the arms' registry Secret; the router logs in with it to read the candidate artifact's
    evaluation prompts (probes)."""
    policy = owner["metadata"]["name"]
    selector = router_selector(policy)
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                    {"name": "admin", "mountPath": TOKEN_DIR, "readOnly": True}]
    container = {
        "name": "router",
        "image": image,
        "command": ["quantrol-worker", "route", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--port", str(ROUTER_PORT),
                    "--admin-port", str(ADMIN_PORT), "--namespace", owner["metadata"]["namespace"],
                    "--admin-token-file", f"{TOKEN_DIR}/{TOKEN_KEY}"],
        "ports": [{"name": ROUTER_PORT_NAME, "containerPort": ROUTER_PORT},
                  {"name": ADMIN_PORT_NAME, "containerPort": ADMIN_PORT}],
        "resources": {section: dict(values) for section, values in ROUTER_RESOURCES.items()},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": ROUTER_PORT}, "periodSeconds": 2},
        "volumeMounts": mounts,
    }
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": router_name(policy)}},
                                     {"name": "admin", "secret": {"secretName": admin_secret_name(policy)}}]
    probes = spec.rollout.probes.config_map_ref
    if probes is not None:
        mounts.append({"name": "probes", "mountPath": PROBES_DIR, "readOnly": True})
        # optional: a missing ConfigMap costs the probes (the router says so), never the router's start
        volumes.append({"name": "probes", "configMap": {"name": probes.name, "optional": True}})
    if credentials_secret:
        mounts.append(registry_credentials_mount())
        volumes.append(registry_credentials_volume(credentials_secret))
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if spec.serving.image_pull_secrets:  # the router image defaults to the serving image: same registry, same login
        pod_spec["imagePullSecrets"] = [s.to_wire() for s in spec.serving.image_pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, router_name(policy)),
        "spec": {
            "replicas": spec.router_replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**MANAGED_BY, **selector}, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(ROUTER_PORT)}},
                "spec": restricted(pod_spec),
            },
        },
    }


def router_service(owner: dict[str, Any]) -> dict[str, Any]:
    policy = owner["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, policy),
        "spec": {"selector": router_selector(policy),
                 "ports": [{"name": ROUTER_PORT_NAME, "port": ROUTER_PORT, "targetPort": ROUTER_PORT}]},
    }


def admin_secret(owner: dict[str, Any], token: str) -> dict[str, Any]:
    name = admin_secret_name(owner["metadata"]["name"])
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(owner, name), "type": "Opaque",
            "stringData": {TOKEN_KEY: token}}
