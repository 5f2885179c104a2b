"""What every handler shares: the API client, the installation's defaults, and the read-plan-apply wrapper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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


async def handle(body: kopf.Body, logger: kopf.Logger, kind: str, handler: str,
                 reconcile: Callable[[dict[str, Any]], Events]) -> None:
    """Run one blocking reconcile pass off the event loop; post its Events; count errors and time."""
    obj = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body.meta),
           "spec": dict(body.spec), "status": dict(body.status)}
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
