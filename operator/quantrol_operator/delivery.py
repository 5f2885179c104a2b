"""Router config delivery: push each new router config to every router pod's admin endpoint until each confirms it.

Which pods, and what counts as confirmed, is planning.routers (pure); this module does the I/O: it lists the router
pods (one read per pass), pushes only to those that have not confirmed the desired version since their container
started (so a steady state pushes nothing, while a new or restarted replica is caught up at the next pass), and
remembers the confirmations. The ConfigMap stays the durable copy.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from quantrol_operator.api.servingpolicy import RouterState
from quantrol_operator.children import router
from quantrol_operator.kube import Kube
from quantrol_operator.observe import http
from quantrol_operator.planning import routers
from quantrol_operator.policy import ReadBounds
from quantrol_worker.addresses import Addresses

PUSH_SECONDS = 2.0  # per router pod; pushes run concurrently, so a hung pod delays a pass by about this much
log = logging.getLogger(__name__)


@dataclass
class _Confirmations:
    """What this operator knows of one policy's router pods (lost on restart: it then pushes once more to each)."""

    confirmed: dict[str, int] = field(default_factory=dict)  # pod key → the config version it confirmed
    refused: dict[str, str] = field(default_factory=dict)  # pod key → why it last refused a push (logged once)


def push(url: str, config: bytes, token: str, max_bytes: int = http.MAX_BYTES) -> tuple[int | None, str]:
    """POST the router config to one pod's admin endpoint: (the version it says it applied, why it refused)."""
    try:
        answer = http.request_json(url, config, token, total_seconds=PUSH_SECONDS, max_bytes=max_bytes)
    except http.HttpStatusError as exc:  # a wrong token, or two writers disagreeing under one version number
        return None, f"{exc.status} {exc.detail}"
    except (OSError, ValueError):
        return None, ""  # not up yet, or gone: the next pass pushes again
    version = answer.get("applied_version") if isinstance(answer, dict) else None
    return (version if isinstance(version, int) else None), ""


@dataclass
class RouterDelivery:
    kube: Kube
    addresses: Addresses
    bounds: ReadBounds = field(default_factory=ReadBounds)
    _policies: dict[tuple[str, str], _Confirmations] = field(default_factory=dict)

    def forget(self, namespace: str, policy: str) -> None:
        self._policies.pop((namespace, policy), None)

    def sync(self, state: RouterState, children: list[dict[str, Any]], deployments: list[dict[str, Any]],
             namespace: str, policy: str, token: str) -> RouterState:
        """Push the desired config (`state.version`) to the policy's router pods; returns `status.router` after."""
        document = next((c["data"][router.CONFIG_FILE] for c in children
                         if c["kind"] == "ConfigMap" and c["metadata"]["name"] == router.router_name(policy)), None)
        if document is None:
            return state  # an invalid spec: no router config this pass, status.router stays as it was
        desired = state.version
        deployment = next((d for d in deployments if d["metadata"]["name"] == router.router_name(policy)), None)
        pods: list[routers.RouterPod] = []
        if deployment is not None:  # else created this pass: no pods yet
            selector = ",".join(f"{k}={v}" for k, v in router.router_selector(policy).items())
            pods = routers.current_pods(self.kube.list_objects("v1", "Pod", namespace, selector), deployment)
        known = self._policies.setdefault((namespace, policy), _Confirmations())
        answers = self._push_all(namespace, routers.to_push(pods, desired, known.confirmed), document, token, known)
        known.confirmed = routers.remember(pods, known.confirmed, answers)
        known.refused = {p.key: known.refused[p.key] for p in pods if known.refused.get(p.key)}
        return routers.router_status(state, pods, known.confirmed)

    def _push_all(self, namespace: str, pods: list[routers.RouterPod], config: str, token: str,
                  known: _Confirmations) -> dict[str, int | None]:
        """Push to every pod at once, each bounded by PUSH_SECONDS: a hung pod delays the pass, never stalls it.
        Returns pod key → the version it applied (None: no answer); a refusal is logged once per pod and reason."""
        urls = {p.name: self.addresses.pod_url(p.ip, namespace, p.name, router.ADMIN_PORT, "/quantrol/config")
                for p in pods}
        reachable = [p for p in pods if urls[p.name]]
        if not reachable:
            return {}
        with ThreadPoolExecutor(max_workers=min(len(reachable), 16), thread_name_prefix="router-push") as pool:
            futures = {p: pool.submit(push, str(urls[p.name]), config.encode(), token, self.bounds.max_bytes)
                       for p in reachable}
        answers: dict[str, int | None] = {}
        for pod, future in futures.items():
            answers[pod.key], why = future.result()
            if why and known.refused.get(pod.key) != why:
                log.warning("router pod %s/%s refused the config push: %s", namespace, pod.name, why)
            known.refused[pod.key] = why
        return answers
