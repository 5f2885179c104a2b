"""Router config delivery: which router pods get the config pushed, and whether every one confirmed it. Pure.

The ConfigMap is the durable copy, but a mounted ConfigMap reaches a running pod only at the kubelet's next sync
(a minute or more), so the handler also pushes each config to every router pod's admin endpoint, and the router
answers the version it applied. A push through the router Service would reach one arbitrary replica.

Which pods count: the router Deployment's current pods, ready or not. A pod that is not Ready gets no traffic from
the Service now, but will once it is, and the file it read at start may predate the change (the kubelet writes a
ConfigMap volume when it sets the pod up, then only at its syncs): so it is pushed to as well, and counts as not
confirmed until it answers. A pod without an IP yet (not started) counts too, as not confirmed: there is nothing
to push to, and it reads the ConfigMap when it starts. Terminating and finished pods do not count: the Service
has dropped them and they never come back.

One confirmation covers one pod's container start: a restarted router re-reads its mounted file, which may be
older than the last push, so a restart (a new pod key) is pushed to again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from quantrol_operator.api.servingpolicy import RouterReplicas, RouterState

FINISHED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class RouterPod:
    name: str
    ip: str  # "" while the pod has none
    key: str  # uid and container restarts: what one confirmation covers


def created_by(pod: Mapping[str, Any], deployment: Mapping[str, Any]) -> bool:
    """Whether `deployment` made the pod: through one of its ReplicaSets (named after the Deployment and the pod's
    template hash, as the Deployment controller names them), or directly (the local runner has no ReplicaSets)."""
    meta, owner = pod.get("metadata") or {}, deployment.get("metadata") or {}
    template_hash = (meta.get("labels") or {}).get("pod-template-hash")
    replica_set = f"{owner.get('name')}-{template_hash}" if template_hash else None
    return any((ref.get("kind") == "Deployment" and ref.get("uid") == owner.get("uid"))
               or (ref.get("kind") == "ReplicaSet" and ref.get("name") == replica_set)
               for ref in meta.get("ownerReferences") or [])


def current_pods(pods: Iterable[Mapping[str, Any]], deployment: Mapping[str, Any] | None) -> list[RouterPod]:
    """The router Deployment's pods that serve now or will (see the module docstring), by name."""
    if deployment is None:
        return []
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") in FINISHED or not created_by(pod, deployment):
            continue
        restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
        out.append(RouterPod(str(meta["name"]), str(status.get("podIP") or ""),
                             f"{meta.get('uid') or meta['name']}/{restarts}"))
    return sorted(out, key=lambda p: p.name)


def to_push(pods: Iterable[RouterPod], desired: int, confirmed: Mapping[str, int]) -> list[RouterPod]:
    """Pods with an address that have not confirmed `desired` since their container started."""
    return [p for p in pods if p.ip and confirmed.get(p.key) != desired]


def remember(pods: Iterable[RouterPod], confirmed: Mapping[str, int],
             answers: Mapping[str, int | None]) -> dict[str, int]:
    """What each current pod has confirmed after this round's `answers` (None: no answer, the older one holds);
    pods that are gone, or restarted, are forgotten."""
    merged = {**confirmed, **{key: version for key, version in answers.items() if version is not None}}
    return {p.key: merged[p.key] for p in pods if p.key in merged}


def router_status(state: RouterState, pods: list[RouterPod], confirmed: Mapping[str, int]) -> RouterState:
    """`status.router` after a round: `appliedVersion` moves to the desired `version` only once every current router
    pod confirmed it (and there is at least one: no pod confirms nothing); `replicas` says how far it got."""
    done = sum(1 for p in pods if confirmed.get(p.key) == state.version)
    update: dict[str, Any] = {"replicas": RouterReplicas(confirmed=done, total=len(pods))}
    if pods and done == len(pods):
        update["applied_version"] = state.version
    return state.model_copy(update=update)
