"""Router config delivery (planning/routers.py, pure): which router pods get the config pushed, and when the
push counts as confirmed. The HTTP part is exercised for real in tests/test_control_loop.py (several replicas)."""

from __future__ import annotations

from typing import Any

from quantrol_operator.api.servingpolicy import RouterState
from quantrol_operator.planning.routers import RouterPod, created_by, current_pods, remember, router_status, to_push

DEPLOYMENT = {"metadata": {"name": "tiny-router", "uid": "d-uid"}}


def pod(name: str, ip: str = "10.0.0.1", *, uid: str | None = None, owner: str = "rs", template_hash: str = "abc12",
        phase: str = "Running", restarts: int = 0, deleting: bool = False) -> dict[str, Any]:
    refs = {"rs": [{"kind": "ReplicaSet", "name": f"tiny-router-{template_hash}", "uid": "rs-uid", "controller": True}],
            "deployment": [{"kind": "Deployment", "name": "tiny-router", "uid": "d-uid", "controller": True}],
            "other-rs": [{"kind": "ReplicaSet", "name": "someone-else-abc12", "uid": "x"}],
            "other-deployment": [{"kind": "Deployment", "name": "tiny-router", "uid": "old-uid"}],
            "none": []}[owner]
    meta: dict[str, Any] = {"name": name, "uid": uid or f"{name}-uid", "ownerReferences": refs,
                            "labels": {"pod-template-hash": template_hash}}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase, "containerStatuses": [{"name": "router", "restartCount": restarts}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_router_pods_are_those_the_deployment_made_through_a_replica_set_or_directly() -> None:
    assert created_by(pod("a"), DEPLOYMENT)  # a cluster: Deployment → ReplicaSet <name>-<template hash> → pod
    assert created_by(pod("a", owner="deployment"), DEPLOYMENT)  # the local runner: no ReplicaSets
    assert not created_by(pod("a", owner="other-rs"), DEPLOYMENT)
    assert not created_by(pod("a", owner="other-deployment"), DEPLOYMENT)  # same name, another object
    assert not created_by(pod("a", owner="none"), DEPLOYMENT)  # labels alone do not make a router pod
    assert not created_by(pod("a", template_hash=""), DEPLOYMENT)


def test_current_pods_count_unready_and_unstarted_ones_but_not_terminating_or_finished() -> None:
    pods = [pod("c", ip=""), pod("b", restarts=2), pod("a"), pod("gone", deleting=True), pod("done", phase="Failed"),
            pod("stray", owner="none")]
    assert current_pods(pods, DEPLOYMENT) == [
        RouterPod("a", "10.0.0.1", "a-uid/0"), RouterPod("b", "10.0.0.1", "b-uid/2"), RouterPod("c", "", "c-uid/0")]
    assert current_pods(pods, None) == []  # the Deployment was created this pass: nothing of it runs yet


def test_push_to_each_pod_with_an_address_that_has_not_confirmed_this_version_since_it_started() -> None:
    a, b, unstarted = RouterPod("a", "10.0.0.1", "a/0"), RouterPod("b", "10.0.0.2", "b/0"), RouterPod("c", "", "c/0")
    assert to_push([a, b, unstarted], 3, {}) == [a, b]
    assert to_push([a, b, unstarted], 3, {"a/0": 3, "b/0": 2}) == [b]
    restarted = RouterPod("a", "10.0.0.1", "a/1")  # its container re-read a file that may predate the push
    assert to_push([restarted, b], 3, {"a/0": 3, "b/0": 3}) == [restarted]


def test_confirmations_are_kept_for_current_pods_only_and_a_missing_answer_keeps_the_older_one() -> None:
    a, b = RouterPod("a", "10.0.0.1", "a/0"), RouterPod("b", "10.0.0.2", "b/0")
    assert remember([a, b], {"a/0": 2, "b/0": 2, "gone/0": 2}, {"a/0": 3, "b/0": None}) == {"a/0": 3, "b/0": 2}
    assert remember([a], {"a/0": 3}, {}) == {"a/0": 3}


def test_applied_version_moves_only_once_every_current_pod_confirmed_it() -> None:
    a, b, unstarted = RouterPod("a", "10.0.0.1", "a/0"), RouterPod("b", "10.0.0.2", "b/0"), RouterPod("c", "", "c/0")
    wire = {"version": 3, "configHash": "h", "appliedVersion": 2}
    state = RouterState.model_validate(wire)
    partly = router_status(state, [a, b], {"a/0": 3, "b/0": 2}).to_wire()
    assert partly == {**wire, "replicas": {"confirmed": 1, "total": 2}}  # still the version all of them have
    done = router_status(state, [a, b], {"a/0": 3, "b/0": 3}).to_wire()
    assert done == {**wire, "appliedVersion": 3, "replicas": {"confirmed": 2, "total": 2}}
    assert router_status(state, [a, b, unstarted], {"a/0": 3, "b/0": 3}).applied_version == 2
    assert router_status(RouterState(version=1), [], {}).to_wire() == {
        "version": 1, "replicas": {"confirmed": 0, "total": 0}}
