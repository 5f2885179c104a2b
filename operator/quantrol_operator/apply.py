"""Applying a plan: children written (zero writes when nothing differs, kube.Kube.apply), stale ones deleted, and the
two write policies that are not the applier's default: PodMonitors never block a pass, and deletionPolicy Orphan
takes the policy's owner references off what keeps serving."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from quantrol_operator.children import label_value, monitoring, router
from quantrol_operator.children.serving import LABEL_POLICY
from quantrol_operator.kube import Kube
from quantrol_operator.planning import Plan

log = logging.getLogger(__name__)


@dataclass
class PodMonitors:
    """Whether this installation writes PodMonitors (decided once at start-up), with which extra labels, and the
    last failed write per policy (so a failure is logged once, not every pass)."""

    labels: dict[str, str] | None = None  # None: no PodMonitors
    _failures: dict[tuple[str, str], int] = field(default_factory=dict)

    def write(self, kube: Kube, desired: dict[str, Any]) -> None:
        """Write the PodMonitor; a failure is logged (once, until it changes), never raised.

        Scraping must not hold the rollout: a refused write (the Prometheus Operator's CRDs removed after start-up,
        QUANTROL_POD_MONITORS=true without them, RBAC without the podmonitors rule) would otherwise fail every pass,
        before the router sync and the status patch, and so block rollbacks too. With no metrics the analysis reads
        no data, which holds the rollout (inconclusive), never promotes it.
        """
        meta = desired["metadata"]
        key = (meta["namespace"], meta["name"])
        try:
            kube.apply(desired)
        except ApiException as exc:
            if self._failures.get(key) != exc.status:
                log.warning("PodMonitor %s/%s not written (%s %s); the rollout goes on without it",
                            *key, exc.status, exc.reason)
            self._failures[key] = int(exc.status or 0)
        else:
            self._failures.pop(key, None)


def apply_plan(kube: Kube, plan: Plan, pod_monitors: PodMonitors | None = None) -> None:
    for child in plan.apply:
        if child["kind"] == monitoring.KIND and pod_monitors is not None:
            pod_monitors.write(kube, child)
        else:
            kube.apply(child)
    for ref in plan.delete:
        kube.delete(ref)


def orphan_children(kube: Kube, namespace: str, policy: str, uid: str, pod_monitors: PodMonitors) -> int:
    """deletionPolicy Orphan: take the policy's owner reference off its arms, router, config, admin Secret and
    PodMonitor so that nothing garbage-collects them; returns how many objects were released."""
    children = [(api_version, kind, c) for api_version, kind in (("apps/v1", "Deployment"), ("v1", "Service"),
                                                                 ("v1", "ConfigMap"))
                for c in kube.list_owned(api_version, kind, namespace, uid, f"{LABEL_POLICY}={label_value(policy)}")]
    # Secrets are read by name only: the operator holds no right to list them (or read others by enumeration).
    secret = kube.get("v1", "Secret", namespace, router.admin_secret_name(policy))
    if secret is not None:
        children.append(("v1", "Secret", secret))
    if pod_monitors.labels is not None:
        children += _owned_pod_monitor(kube, namespace, policy, uid)
    for api_version, kind, child in children:
        refs = child["metadata"].get("ownerReferences") or []
        kube.patch(api_version, kind, namespace, child["metadata"]["name"],
                   {"metadata": {"ownerReferences": [r for r in refs if r.get("uid") != uid]}})
    return len(children)


def _owned_pod_monitor(kube: Kube, namespace: str, policy: str, uid: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The policy's PodMonitor, read by name like the Secret (the operator never lists PodMonitors)."""
    try:
        monitor = kube.get(monitoring.API_VERSION, monitoring.KIND, namespace, monitoring.pod_monitor_name(policy))
    except ApiException as exc:  # as when writing it: monitoring never holds the policy's deletion back
        log.warning("PodMonitor %s/%s not read (%s %s); left as it is", namespace, policy, exc.status, exc.reason)
        return []
    if monitor is None or not any(r.get("uid") == uid for r in monitor["metadata"].get("ownerReferences") or []):
        return []
    return [(monitoring.API_VERSION, monitoring.KIND, monitor)]
