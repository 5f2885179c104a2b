"""What every handler shares: the API client, the installation's defaults, and the read-plan-apply wrapper."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from quantrol_operator import metrics
from quantrol_operator.defaults import OperatorDefaults
from quantrol_operator.kube import Kube

DEFAULTS = OperatorDefaults.from_env()
_kube: Kube | None = None

# (type, reason, message) of the Events a reconcile pass wants posted.
Events = list[tuple[str, str, str]]


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube.from_environment()
    return _kube


# One pass per object at a time. Weak values: a lock lives only while a pass holds or awaits it.
_turns: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def superseded(meta: Mapping[str, Any], status_written_from: Mapping[str, str]) -> bool:
    """Whether a pass would start from a version of the object that this operator has already written over.

    kopf runs an object's event handler and its timer independently, and both can start from the same
    resourceVersion. The second would then repeat the first's decision on a status its predecessor already
    replaced: a rollback counted and announced twice, one analysis window counted twice toward a success streak.
    Such a pass is skipped; the watch event of our own write brings the fresh version within a moment.
    """
    uid, version = meta.get("uid"), meta.get("resourceVersion")
    return bool(uid and version) and status_written_from.get(str(uid)) == str(version)


async def handle(body: kopf.Body, logger: kopf.Logger, kind: str, handler: str,
                 reconcile: Callable[[dict[str, Any]], Events]) -> None:
    """Run one blocking reconcile pass off the event loop, one per object at a time and never from a superseded
    version (see `superseded`); post its Events; count errors and time."""
    uid = str(body.meta.uid or f"{body.meta.namespace}/{body.meta.name}")
    turn = _turns.get(uid) or _turns.setdefault(uid, asyncio.Lock())
    async with turn:
        await _pass(body, logger, kind, handler, reconcile)


async def _pass(body: kopf.Body, logger: kopf.Logger, kind: str, handler: str,
                reconcile: Callable[[dict[str, Any]], Events]) -> None:
    # Read after the turn came: a timer's body is kopf's live view, fresher now than when the pass was queued.
    obj = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body.meta),
           "spec": dict(body.spec), "status": dict(body.status)}
    if superseded(obj["metadata"], kube().status_written_from):
        logger.debug("%s pass skipped: resourceVersion %s is already superseded by our own status write",
                     handler, obj["metadata"].get("resourceVersion"))
        return
    began = time.monotonic()
    try:
        events = await asyncio.to_thread(reconcile, obj)
    except ApiException as exc:
        metrics.RECONCILE_ERRORS.labels(kind, handler).inc()
        raise kopf.TemporaryError(f"Kubernetes API error {exc.status} {exc.reason}; retrying", delay=5) from exc
    finally:
        metrics.RECONCILE_DURATION.labels(kind, handler).observe(time.monotonic() - began)
    for type_, reason, message in events:
        kopf.event(body, type=type_, reason=reason, message=message)
        log = logger.warning if type_ == "Warning" else logger.info
        log("%s %s/%s: %s", reason, body.meta.namespace, body.meta.name, message)
