"""One Prometheus Operator PodMonitor per ServingPolicy: the scrape config for its arms and routers.

kube-prometheus-stack ignores the `prometheus.io/scrape` pod annotations, so where the Prometheus Operator runs the
operator also writes a PodMonitor (the annotations stay, for a plain Prometheus). It maps the pods' labels to the
label contract the analysis queries and the dashboard select on (charts/README.md): every series gets `namespace`
(the Prometheus Operator's own relabelling) and `policy`; engine and launcher series also get `arm` (the arm's short
digest). Router series get no `arm` target label: the router exports its own `arm` (the role, stable or candidate),
and a target label of the same name would rename it to `exported_arm` and break every SLO query.

Both arms and routers name their HTTP port `http`, so the endpoints tell them apart by pod label (a `keep`
relabelling), one scrape job each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quantrol_operator.api.servingpolicy import ServingPolicySpec
from quantrol_operator.children import MANAGED_BY, label_value, owner_reference
from quantrol_operator.children.router import LABEL_COMPONENT, ROUTER_PORT_NAME
from quantrol_operator.children.serving import ENGINE_PORT_NAME, LABEL_ARM, LABEL_POLICY, LAUNCHER_PORT_NAME

API_VERSION = "monitoring.coreos.com/v1"
KIND = "PodMonitor"
COMPONENT = "monitoring"
METRICS_PATH = "/metrics"
MIN_INTERVAL_S, MAX_INTERVAL_S = 5, 30


def pod_monitor_name(policy: str) -> str:
    """The policy's own name, like its router Service: `kubectl get podmonitor <policy>`."""
    return policy


def pod_label(label: str) -> str:
    """The meta label Prometheus's Kubernetes service discovery gives a pod label (non-alphanumerics become `_`)."""
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in label)


def scrape_interval_seconds(window_seconds: int) -> int:
    """A quarter of the analysis window, within 5–30 s.

    The SLO queries take `rate()` and `histogram_quantile()` over the window, which need at least two samples of a
    series inside it; four leave a rate even when one scrape is missed. Below 5 s vLLM's /metrics costs a busy engine
    more than it tells; above 30 s the dashboard and the routers' config-version confirmation lag. A window shorter
    than 10 s therefore holds fewer than two samples: its queries come back empty, which the analysis counts as
    inconclusive (never as a pass).
    """
    return max(MIN_INTERVAL_S, min(MAX_INTERVAL_S, window_seconds // 4))


def _relabel_policy() -> dict[str, Any]:
    return {"action": "replace", "sourceLabels": [pod_label(LABEL_POLICY)], "targetLabel": "policy"}


def _endpoint(port: str, interval: str, relabelings: list[dict[str, Any]]) -> dict[str, Any]:
    return {"port": port, "path": METRICS_PATH, "interval": interval, "relabelings": relabelings}


def pod_monitor(owner: dict[str, Any], spec: ServingPolicySpec,
                extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The policy's PodMonitor, owned by it, for its arm and router pods.

    `extra_labels`: what this installation's Prometheus selects PodMonitors by (kube-prometheus-stack:
    `release: <its release name>`); Quantrol's own labels win over them.
    """
    meta = owner["metadata"]
    policy = meta["name"]
    interval = f"{scrape_interval_seconds(spec.analysis.window_seconds)}s"
    is_arm = {"action": "keep", "sourceLabels": [pod_label(LABEL_ARM)], "regex": ".+"}
    is_router = {"action": "keep", "sourceLabels": [pod_label(LABEL_COMPONENT)], "regex": "router"}
    arm = {"action": "replace", "sourceLabels": [pod_label(LABEL_ARM)], "targetLabel": "arm"}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": pod_monitor_name(policy),
            "namespace": meta["namespace"],
            "labels": {**(extra_labels or {}), **MANAGED_BY, LABEL_POLICY: label_value(policy),
                       LABEL_COMPONENT: COMPONENT},
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            # Arm and router pods both carry these two (children/serving.py, children/router.py); the pods of
            # another policy, or anything not made by Quantrol, do not. Pods are found in the PodMonitor's own
            # namespace, which is the policy's.
            "selector": {"matchLabels": {LABEL_POLICY: label_value(policy),
                                         "app.kubernetes.io/managed-by": MANAGED_BY["app.kubernetes.io/managed-by"]}},
            # The engine's vllm:*, the launcher's quantrol_engine_kernel_info, the router's quantrol_router_*.
            "podMetricsEndpoints": [
                _endpoint(ENGINE_PORT_NAME, interval, [is_arm, _relabel_policy(), arm]),
                _endpoint(LAUNCHER_PORT_NAME, interval, [is_arm, _relabel_policy(), arm]),
                _endpoint(ROUTER_PORT_NAME, interval, [is_router, _relabel_policy()]),
            ],
        },
    }
