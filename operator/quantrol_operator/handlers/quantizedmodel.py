"""QuantizedModel handlers: read the object and its Job, plan, apply, patch status. Nothing else."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

from quantrol_operator import metrics
from quantrol_operator.api import quantizedmodel
from quantrol_operator.api.common import GROUP, VERSION
from quantrol_operator.children import calibration
from quantrol_operator.handlers.common import DEFAULTS, Events, handle, kube
from quantrol_operator.planning.quantizedmodel import TERMINAL, QmObserved, plan


def _observe(obj: dict[str, Any]) -> QmObserved:
    meta = obj["metadata"]
    k = kube()
    jobs = k.list_owned("batch/v1", "Job", meta["namespace"], meta["uid"], f"{calibration.LABEL_QM}={meta['name']}")
    current = calibration.job_name(meta["name"], int(meta.get("generation", 1)))
    job = next((j for j in jobs if j["metadata"]["name"] == current), None)
    pods = (
        k.list_owned("v1", "Pod", meta["namespace"], job["metadata"]["uid"], f"{calibration.LABEL_QM}={meta['name']}")
        if job is not None
        else []
    )
    return QmObserved(obj=obj, jobs=jobs, pods=pods, now=datetime.now(UTC))


def _reconcile(obj: dict[str, Any]) -> Events:
    observed = _observe(obj)
    result = plan(observed, DEFAULTS.worker_image)
    k = kube()
    for ref in result.delete:
        k.delete(ref)
    for child in result.apply:
        k.apply(child)
    k.patch_status(obj, result.status)
    if result.status.get("phase") in TERMINAL and (obj.get("status") or {}).get("phase") not in TERMINAL:
        outcome = str(result.status["phase"]).lower()
        metrics.CALIBRATIONS.labels(obj["metadata"]["namespace"], obj["metadata"]["name"], outcome).inc()
    return [(e.type, e.reason, e.message) for e in result.events]


def _settled(body: kopf.Body) -> bool:
    status = body.get("status") or {}
    return bool(status.get("observedGeneration") == body.meta.get("generation") and status.get("phase") in TERMINAL)


@kopf.on.event(GROUP, VERSION, quantizedmodel.PLURAL)
async def quantized_model_changed(type: str, body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    if type == "DELETED" or body.meta.get("deletionTimestamp") or _settled(body):
        return
    await handle(body, logger, quantizedmodel.KIND, "event", _reconcile)


@kopf.timer(GROUP, VERSION, quantizedmodel.PLURAL, interval=DEFAULTS.poll_seconds, initial_delay=1)
async def quantized_model_poll(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    """Follows the Job while it runs (reads only; a write happens only when the plan changes something)."""
    if body.meta.get("deletionTimestamp") or _settled(body):
        return
    await handle(body, logger, quantizedmodel.KIND, "timer", _reconcile)
