"""What every handler shares: the operator's runtime (made once at start-up, handed to handlers through kopf's memo)
and the wrapper that runs one reconcile pass per object at a time, off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from quantrol_operator import metrics
from quantrol_operator.apply import PodMonitors
from quantrol_operator.defaults import OperatorDefaults
from quantrol_operator.delivery import RouterDelivery
from quantrol_operator.kube import Kube, status_digest
from quantrol_operator.policy import InstallPolicy
from quantrol_worker.addresses import Addresses

# Read once at import: the timers' interval is fixed when kopf registers them. Never changed afterwards.
DEFAULTS = OperatorDefaults.from_env()
MEMO_KEY = "quantrol"

# (type, reason, message) of the Events a reconcile pass wants posted.
Events = list[tuple[str, str, str]]


@dataclass
class Runtime:
    """What the operator holds for its whole life: the API client, this installation's defaults, where pods answer,
    and what it remembers between passes (router confirmations, PodMonitor failures, whose turn it is)."""

    kube: Kube
    defaults: OperatorDefaults
    addresses: Addresses
    delivery: RouterDelivery
    pod_monitors: PodMonitors = field(default_factory=PodMonitors)
    policy: InstallPolicy = field(default_factory=InstallPolicy)  # what this installation lets tenants choose
    # One pass per object at a time, held in the worker thread, not by an asyncio lock: kopf's tasks never wait on
    # each other (an asyncio lock between the watch worker and the timer kept kopf reconciling for seconds after
    # SIGTERM). Weak values: a lock lives only while a pass holds or awaits it.
    _turns: weakref.WeakValueDictionary[str, threading.Lock] = field(default_factory=weakref.WeakValueDictionary)
    _turns_guard: threading.Lock = field(default_factory=threading.Lock)

    def turn(self, uid: str) -> threading.Lock:
        with self._turns_guard:
            return self._turns.get(uid) or self._turns.setdefault(uid, threading.Lock())


def runtime(memo: kopf.Memo) -> Runtime:
    found = memo.get(MEMO_KEY)
    if not isinstance(found, Runtime):
        raise kopf.TemporaryError("the operator is still starting up", delay=1)
    return found


def superseded(obj: Mapping[str, Any], status_written_from: Mapping[str, list[str]]) -> bool:
    """Whether a pass would start from a status that this operator has already written over.

    kopf runs an object's event handler and its timer independently, and the watch delivers every version, also
    versions that someone else wrote (kopf's own patches, a user's label edit) between our status write and its
    event. A pass from such a version would repeat the previous pass's decision on a status that pass already
    replaced: a rollback counted and announced twice, one analysis window counted twice toward a streak. The
    operator is the only writer of status, so a status that one of our last writes started from is stale: the
    pass is skipped, and the event of our own write brings the fresh version within a moment.
    """
    uid = (obj.get("metadata") or {}).get("uid")
    return bool(uid) and status_digest(dict(obj.get("status") or {})) in status_written_from.get(str(uid), ())


async def handle(body: kopf.Body, logger: kopf.Logger, rt: Runtime, kind: str, handler: str,
                 reconcile: Callable[[Runtime, dict[str, Any]], Events]) -> None:
    """Run one blocking reconcile pass off the event loop, one per object at a time and never from a superseded
    status (see `superseded`); post its Events; count errors and time."""
    obj = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body.meta),
           "spec": dict(body.spec), "status": dict(body.status)}
    turn = rt.turn(str(body.meta.uid or f"{body.meta.namespace}/{body.meta.name}"))

    def one_pass() -> Events | None:
        with turn:
            if superseded(obj, rt.kube.status_written_from):
                logger.debug("%s pass skipped: resourceVersion %s carries a status our own write already replaced",
                             handler, obj["metadata"].get("resourceVersion"))
                return None
            return reconcile(rt, obj)

    began = time.monotonic()
    try:
        events = await asyncio.to_thread(one_pass)
    except ApiException as exc:
        metrics.RECONCILE_ERRORS.labels(kind, handler).inc()
        raise kopf.TemporaryError(f"Kubernetes API error {exc.status} {exc.reason}; retrying", delay=5) from exc
    finally:
        metrics.RECONCILE_DURATION.labels(kind, handler).observe(time.monotonic() - began)
    for type_, reason, message in events or []:
        kopf.event(body, type=type_, reason=reason, message=message)
        log = logger.warning if type_ == "Warning" else logger.info
        log("%s %s/%s: %s", reason, body.meta.namespace, body.meta.name, message)
