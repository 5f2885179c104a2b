"""The router in front of the arms: its config (ConfigMap, the durable copy), Deployment and Service.

The Service carries the policy's own name: it is the address clients use, whatever serves behind it.
"""

from __future__ import annotations

from typing import Any

from quantrol_operator.api.servingpolicy import ServingPolicySpec
from quantrol_operator.children import MANAGED_BY, child_name, label_value, owner_reference, restricted
from quantrol_operator.children.serving import ENGINE_PORT, LABEL_POLICY, arm_name
from quantrol_worker.contracts import DEFAULT_REDACT_PATTERNS
from quantrol_worker.router.config import (
    MAX_BODY_BYTES,
    AdmissionLimits,
    ArmConfig,
    DiffsConfig,
    RouterConfig,
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
TOKEN_KEY = "token"
LABEL_COMPONENT = "app.kubernetes.io/component"


def router_name(policy: str) -> str:
    return child_name(policy, "router")


def router_selector(policy: str) -> dict[str, str]:
    return {LABEL_POLICY: label_value(policy), LABEL_COMPONENT: "router"}


def admin_secret_name(policy: str) -> str:
    return child_name(policy, "router-admin")


def arm_url(policy: str, namespace: str, ref: str) -> str:
    return f"http://{arm_name(policy, ref)}.{namespace}.svc:{ENGINE_PORT}"


def router_config(policy: str, namespace: str, spec: ServingPolicySpec, stable_ref: str, candidate_ref: str | None,
                  stable_weight: int, candidate_weight: int, mirror_fraction: float, version: int,
                  max_body_bytes: int = MAX_BODY_BYTES) -> RouterConfig:
    admission = spec.serving.admission
    limits = AdmissionLimits(max_in_flight=admission.max_in_flight, max_queue=admission.max_queue,
                             max_queue_wait_s=admission.max_queue_wait_seconds)
    arms = {"stable": ArmConfig(url=arm_url(policy, namespace, stable_ref), weight=stable_weight, admission=limits)}
    if candidate_ref is not None:
        arms["candidate"] = ArmConfig(url=arm_url(policy, namespace, candidate_ref), weight=candidate_weight,
                                      admission=limits)
    wanted = spec.rollout.shadow.diffs
    diffs = DiffsConfig(enabled=wanted.enabled, capacity=wanted.max_samples, max_chars=wanted.max_chars,
                        retention_s=float(wanted.retention_seconds),
                        redact_patterns=[*DEFAULT_REDACT_PATTERNS, *wanted.redact_patterns])
    return RouterConfig(version=version, arms=arms, mirror_fraction=mirror_fraction if candidate_ref else 0.0,
                        max_body_bytes=max_body_bytes, diffs=diffs)


def _meta(owner: dict[str, Any], name: str) -> dict[str, Any]:
    policy = owner["metadata"]["name"]
    return {"name": name, "namespace": owner["metadata"]["namespace"],
            "labels": {**MANAGED_BY, LABEL_POLICY: label_value(policy), LABEL_COMPONENT: "router"},
            "ownerReferences": [owner_reference(owner)]}


def router_config_map(owner: dict[str, Any], config: RouterConfig) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(owner, router_name(owner["metadata"]["name"])),
            "data": {CONFIG_FILE: dump_config(config)}}


def router_deployment(owner: dict[str, Any], spec: ServingPolicySpec, image: str) -> dict[str, Any]:
    policy = owner["metadata"]["name"]
    selector = router_selector(policy)
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
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "admin", "mountPath": TOKEN_DIR, "readOnly": True}],
    }
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
                "spec": restricted({
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": router_name(policy)}},
                                {"name": "admin", "secret": {"secretName": admin_secret_name(policy)}}],
                }),
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
