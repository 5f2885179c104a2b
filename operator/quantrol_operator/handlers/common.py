"""What every handler shares: the operator's runtime (made once at start-up, handed to handlers through kopf's memo)
and the wrapper that runs one reconcile pass per object at a time, off the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import logging
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
FINALIZER = "quantrol.io/finalizer"  # kopf's, on ServingPolicies with deletionPolicy Orphan only

# (type, reason, message) of the Events a reconcile pass wants posted.
Events = list[tuple[str, str, str]]
Reconcile = Callable[["Runtime", dict[str, Any]], Events]
log = logging.getLogger("quantrol.poll")


@dataclass
class Tracked:
    """An object the poller follows: its latest version as the watch delivered it, and whether it is settled."""

    kind: str
    body: kopf.Body
    reconcile: Reconcile
    settled: bool
    # The event handler's context: kopf keeps what kopf.event() posts through (its settings, the object's event
    # queue) in context variables it sets for each object's handlers; the poller's passes run in a copy of it.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


@dataclass
class Runtime:
    """What the operator holds for its whole life: the API client, this installation's defaults, where pods answer,
    and what it remembers between passes (router confirmations, PodMonitor failures, whose turn it is)."""

    kube: Kube
    defaults: OperatorDefaults
    addresses: Addresses
    delivery: RouterDelivery
    pod_monitors: PodMonitors = field(default_factory=PodMonitors)
    policy: InstallPolicy = field(default_factory=InstallPolicy)  # the chart's installPolicy (QUANTROL_INSTALL_POLICY)
    # One pass per object at a time, held in the worker thread, not by an asyncio lock: kopf's tasks never wait on
    # each other (an asyncio lock between the watch worker and the timer kept kopf reconciling for seconds after
    # SIGTERM). Weak values: a lock lives only while a pass holds or awaits it.
    _turns: weakref.WeakValueDictionary[str, threading.Lock] = field(default_factory=weakref.WeakValueDictionary)
    # uid -> the objects the watches delivered, for the poller (poll_forever): kept in memory, never read from the API.
    tracked: dict[str, Tracked] = field(default_factory=dict)
    # uids whose deletion the operator has handled (deletionPolicy Orphan): no pass may write their children again.
    released: set[str] = field(default_factory=set)
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


async def handle(body: kopf.Body, logger: kopf.Logger | logging.Logger, rt: Runtime, kind: str, handler: str,
                 reconcile: Reconcile) -> None:
    """Run one blocking reconcile pass off the event loop, one per object at a time and never from a superseded
    status (see `superseded`); post its Events; count errors and time."""
    obj = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body.meta),
           "spec": dict(body.spec), "status": dict(body.status)}
    turn = rt.turn(str(body.meta.uid or f"{body.meta.namespace}/{body.meta.name}"))

    def one_pass() -> Events | None:
        with turn:
            if str(body.meta.uid) in rt.released:
                return None  # a pass that was due before the deletion was handled: it would re-own the children
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


def track(rt: Runtime, event_type: str, body: kopf.Body, kind: str, reconcile: Reconcile, settled: bool) -> bool:
    """Remember the object's newest version for the poller; returns whether a pass should run for this event."""
    uid = str(body.meta.uid or f"{body.meta.namespace}/{body.meta.name}")
    if event_type == "DELETED":
        rt.tracked.pop(uid, None)
        return False
    rt.tracked[uid] = Tracked(kind, body, reconcile, settled)
    return not (settled or body.meta.get("deletionTimestamp"))


async def poll_forever(rt: Runtime, interval: float, concurrency: int = 16) -> None:
    """The control loop's clock: every `interval`, one pass for each object that is not settled, at most
    `concurrency` at a time (a slow Prometheus delays its own policy, not the others).

    One poller for the operator rather than a kopf timer per object: kopf holds a finalizer on every object that
    has a timer, so after `helm uninstall` every object (and its namespace) would hang on deletion. A settled
    object (a finished calibration, a Promoted/RolledBack/Failed policy) costs no API call at all; an event
    (a spec edit, an annotation) reaches it through its event handler and, if it unsettles it, brings it back here.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Tracked) -> None:
        async with gate:
            try:
                await asyncio.create_task(handle(item.body, log, rt, item.kind, "timer", item.reconcile),
                                          context=item.context.copy())
            except kopf.TemporaryError as exc:
                log.warning("%s %s/%s: %s", item.kind, item.body.meta.namespace, item.body.meta.name, exc)
            except Exception:  # one object's failure must never stop the clock of all the others
                log.exception("%s %s/%s: pass failed", item.kind, item.body.meta.namespace, item.body.meta.name)

    while True:
        await asyncio.sleep(interval)
        due = [t for t in list(rt.tracked.values()) if not t.settled and not t.body.meta.get("deletionTimestamp")]
        if due:
            await asyncio.gather(*(one(t) for t in due))
