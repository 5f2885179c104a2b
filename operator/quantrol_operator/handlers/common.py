"""What every handler shares: the API client, the installation's defaults, and the read-plan-apply wrapper."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from quantrol_operator import metrics
from quantrol_operator.defaults import OperatorDefaults
from quantrol_operator.kube import Kube, status_digest

DEFAULTS = OperatorDefaults.from_env()
_kube: Kube | None = None

# (type, reason, message) of the Events a reconcile pass wants posted.
Events = list[tuple[str, str, str]]


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube.from_environment()
    return _kube


# One pass per object at a time, held in the worker thread, not by an asyncio lock: kopf's tasks never wait on
# each other (an asyncio lock between the watch worker and the timer kept kopf reconciling for seconds after
# SIGTERM). Weak values: a lock lives only while a pass holds or awaits it.
_turns: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
_turns_guard = threading.Lock()


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


async def handle(body: kopf.Body, logger: kopf.Logger, kind: str, handler: str,
                 reconcile: Callable[[dict[str, Any]], Events]) -> None:
    """Run one blocking reconcile pass off the event loop, one per object at a time and never from a superseded
    status (see `superseded`); post its Events; count errors and time."""
    obj = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body.meta),
           "spec": dict(body.spec), "status": dict(body.status)}
    uid = str(body.meta.uid or f"{body.meta.namespace}/{body.meta.name}")
    with _turns_guard:
        turn = _turns.get(uid) or _turns.setdefault(uid, threading.Lock())

    def one_pass() -> Events | None:
        with turn:
            if superseded(obj, kube().status_written_from):
                logger.debug("%s pass skipped: resourceVersion %s carries a status our own write already replaced",
                             handler, obj["metadata"].get("resourceVersion"))
                return None
            return reconcile(obj)

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
