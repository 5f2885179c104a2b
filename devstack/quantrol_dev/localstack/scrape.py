"""Glue between the local workload runner and Prometheus: scrape every router and every engine the runner serves.

On a cluster, a ServiceMonitor (or the `prometheus.io/scrape` pod annotations) makes Prometheus scrape each
ServingPolicy's router, and relabelling gives every series the `namespace` and `policy` labels the operator's
analysis queries select on. Locally, the runner's `services.json` says where each Service answers on 127.0.0.1,
and the emulated API says which Services are routers (component label `router`, policy label); this thread turns
the two into Prometheus file_sd target groups with those labels, rewritten only when they change. Every router pod
is a target (the runner's `"pods"` section says where each answers), as a PodMonitor would make it, so a policy
with several router replicas is judged on all of its traffic; the Service's endpoint stands in when the runner
has not listed the pods yet. Every serving arm's engine is a target too, with the arm's short digest as `arm`
(the PodMonitor's relabelling), so the analysis reads vLLM's own queue, batch and KV-cache signals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from quantrol_dev.localstack.prometheus import PrometheusServer, TargetGroup
from quantrol_operator.children.router import LABEL_COMPONENT, ROUTER_PORT
from quantrol_operator.children.serving import ENGINE_PORT, LABEL_ARM, LABEL_POLICY

log = logging.getLogger("quantrol.localstack.scrape")


def router_targets(services: Mapping[str, Any], router_services: Sequence[Mapping[str, Any]],
                   pods: Sequence[Mapping[str, Any]] = ()) -> list[TargetGroup]:
    """One target group per router Service, with every router pod of its policy that `services` (the runner's
    map) has an address for, or else the Service's ready endpoint; routers with neither are left out.

    `router_services` and `pods` are objects as the API returns them (dicts); those without the router component
    and policy labels are ignored, so the caller may pass every object it listed (the emulation ignores label
    selectors).
    """
    addresses = services.get("pods") or {}
    groups: list[TargetGroup] = []
    for svc in router_services:
        meta = svc.get("metadata") or {}
        labels = meta.get("labels") or {}
        namespace, policy = meta.get("namespace"), labels.get(LABEL_POLICY)
        if labels.get(LABEL_COMPONENT) != "router" or not policy:
            continue
        targets = []
        for pod in pods:
            pod_meta = pod.get("metadata") or {}
            pod_labels = pod_meta.get("labels") or {}
            if (pod_meta.get("namespace"), pod_labels.get(LABEL_POLICY), pod_labels.get(LABEL_COMPONENT)) != (
                    namespace, policy, "router"):
                continue
            entry = addresses.get(f"{namespace}/{pod_meta.get('name')}") or {}
            port = (entry.get("ports") or {}).get(str(ROUTER_PORT))
            if port is not None:
                targets.append(f"{entry.get('host', '127.0.0.1')}:{port}")
        if not targets:
            endpoint = services.get(f"{namespace}/{meta.get('name')}") or {}
            port = (endpoint.get("ports") or {}).get(str(ROUTER_PORT))
            if port is None:
                continue  # not ready yet: no endpoint, nothing to scrape
            targets = [f"{endpoint.get('host', '127.0.0.1')}:{port}"]
        groups.append(TargetGroup(sorted(targets), {"namespace": str(namespace), "policy": str(policy)}))
    return sorted(groups, key=lambda g: (g.labels["namespace"], g.labels["policy"]))


def engine_targets(services: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> list[TargetGroup]:
    """One target group per arm pod that `services` has an engine address for, labelled as the PodMonitor's engine
    endpoint labels it: namespace, policy, and `arm` (the arm's short digest)."""
    addresses = services.get("pods") or {}
    groups: list[TargetGroup] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        policy, arm = labels.get(LABEL_POLICY), labels.get(LABEL_ARM)
        entry = addresses.get(f"{meta.get('namespace')}/{meta.get('name')}") or {}
        port = (entry.get("ports") or {}).get(str(ENGINE_PORT))
        if policy and arm and port is not None:
            groups.append(TargetGroup([f"{entry.get('host', '127.0.0.1')}:{port}"],
                                      {"namespace": str(meta.get("namespace")), "policy": str(policy),
                                       "arm": str(arm)}))
    return sorted(groups, key=lambda g: (g.labels["namespace"], g.labels["policy"], g.labels["arm"], g.targets[0]))


class RouterScrapeSync:
    """Keeps Prometheus's file_sd targets equal to the routers in `services_path`, every `interval` seconds."""

    def __init__(self, *, kubeconfig: Path, services_path: Path, prometheus: PrometheusServer,
                 interval: float = 1.0) -> None:
        self.kubeconfig = kubeconfig
        self.services_path = services_path
        self.prometheus = prometheus
        self.interval = interval
        self.current: list[TargetGroup] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._api: Any = None

    def start(self) -> RouterScrapeSync:
        self._thread = threading.Thread(target=self._loop, name="router-scrape-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._api is not None:
            self._api.close()
            self._api = None
        with contextlib.suppress(Exception):
            self.prometheus.set_file_sd_targets([])

    def tick(self) -> None:
        from kubernetes import client, config

        try:
            services: dict[str, Any] = json.loads(self.services_path.read_text())
        except (OSError, ValueError):
            return  # not written yet, or being replaced: the next tick reads it
        if self._api is None:
            self._api = config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]
        core = client.CoreV1Api(self._api)
        listed = core.list_service_for_all_namespaces(_request_timeout=10)
        objects = [self._api.sanitize_for_serialization(s) for s in listed.items]
        pods = [self._api.sanitize_for_serialization(p)
                for p in core.list_pod_for_all_namespaces(_request_timeout=10).items]
        groups = router_targets(services, objects, pods) + engine_targets(services, pods)
        if [g.as_json() for g in groups] != [g.as_json() for g in self.current]:
            self.prometheus.set_file_sd_targets(groups)
            self.current = groups
            log.info("Prometheus now scrapes routers %s", [f"{g.labels} at {', '.join(g.targets)}" for g in groups])

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the API or the file may be going away at shutdown; keep trying
                self.errors += 1
                log.debug("router scrape sync pass failed: %r", exc)
            self._stop.wait(self.interval)
