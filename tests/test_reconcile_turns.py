"""handlers.common.handle: one reconcile pass per object at a time, never from a version already written over.

kopf runs an object's event handler and its timer independently; without this, both start from the same
resourceVersion and the second repeats the first's decision (the demo counted one KernelUnavailable refusal twice
in quantrol_rollbacks_total). No server is needed: the passes are plain functions, the Kube client never calls out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import kopf
import pytest
from kubernetes import client

from quantrol_operator.defaults import OperatorDefaults
from quantrol_operator.delivery import RouterDelivery
from quantrol_operator.handlers import common
from quantrol_operator.kube import Kube, status_digest
from quantrol_worker.addresses import ClusterAddresses

LOG = logging.getLogger("test")


def body(version: str, uid: str = "uid-1", phase: str | None = None) -> kopf.Body:
    """A version of the object; its status differs per version unless `phase` pins it."""
    return kopf.Body({"apiVersion": "quantrol.io/v1alpha1", "kind": "ServingPolicy",
                      "metadata": {"name": "p", "namespace": "ns", "uid": uid, "resourceVersion": version},
                      "spec": {}, "status": {"phase": phase or f"Phase-{version}"}})


@pytest.fixture
def rt() -> common.Runtime:
    kube = Kube(client.ApiClient())  # never used for a request here
    addresses = ClusterAddresses()
    return common.Runtime(kube=kube, defaults=OperatorDefaults(), addresses=addresses,
                          delivery=RouterDelivery(kube, addresses))


class Passes:
    """A reconcile pass that takes a while, records overlap, and 'writes status' as the real one would."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.seen: list[str] = []
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, _rt: common.Runtime, obj: dict[str, Any]) -> common.Events:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        time.sleep(0.1)
        meta = obj["metadata"]
        self.seen.append(meta["resourceVersion"])
        # What Kube.patch_status records when it writes: the status this pass started from.
        self.kube.status_written_from.setdefault(meta["uid"], []).append(status_digest(obj["status"]))
        with self._lock:
            self.running -= 1
        return []


async def test_event_and_timer_from_the_same_version_make_one_pass(rt: common.Runtime) -> None:
    passes = Passes(rt.kube)
    same = body("7")
    await asyncio.gather(common.handle(same, LOG, rt, "ServingPolicy", "event", passes),
                         common.handle(same, LOG, rt, "ServingPolicy", "timer", passes))
    assert passes.seen == ["7"]  # the second started from a version the first had written over


async def test_a_version_someone_else_wrote_in_between_is_stale_too(rt: common.Runtime) -> None:
    """The demo counted one refusal twice: the pass from v2 (status Pending) wrote RolledBack, but kopf's own patch
    of the object had made v3 in between, with v2's status; the pass from v3 decided the same refusal again."""
    passes = Passes(rt.kube)
    await common.handle(body("2", phase="Pending"), LOG, rt, "ServingPolicy", "event", passes)
    await common.handle(body("3", phase="Pending"), LOG, rt, "ServingPolicy", "event", passes)  # same status
    await common.handle(body("4", phase="RolledBack"), LOG, rt, "ServingPolicy", "event", passes)  # our write's own
    assert passes.seen == ["2", "4"]


async def test_passes_of_one_object_never_overlap_and_newer_versions_run(rt: common.Runtime) -> None:
    passes = Passes(rt.kube)
    await asyncio.gather(*(common.handle(body(v), LOG, rt, "ServingPolicy", "timer", passes) for v in ("1", "2", "3")))
    assert sorted(passes.seen) == ["1", "2", "3"]
    assert passes.max_running == 1


async def test_different_objects_are_not_serialized(rt: common.Runtime) -> None:
    passes = Passes(rt.kube)
    await asyncio.gather(*(common.handle(body("1", uid=f"u{i}"), LOG, rt, "ServingPolicy", "timer", passes)
                           for i in range(3)))
    assert len(passes.seen) == 3 and passes.max_running > 1


def test_superseded_means_a_status_one_of_our_writes_started_from() -> None:
    obj = {"metadata": {"uid": "u", "resourceVersion": "5"}, "status": {"phase": "Pending", "step": 0}}
    same = {"metadata": {"uid": "u", "resourceVersion": "9"}, "status": {"step": 0, "phase": "Pending"}}
    written = {"u": [status_digest({"phase": "Canary"}), status_digest({"phase": "Pending", "step": 0})]}
    assert common.superseded(obj, written)
    assert common.superseded(same, written)  # any version, key order aside: the status is what counts
    assert not common.superseded(obj, {"u": [status_digest({"phase": "Canary"})]})  # fresh
    assert not common.superseded(obj, {})  # never written (e.g. after a restart): run
    assert not common.superseded({"metadata": {}, "status": {}}, written)  # no uid: run
