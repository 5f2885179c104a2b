"""QuantizedModel handlers: kopf wiring only. Read the object and its Job, plan, apply, patch status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

from quantrol_operator import metrics
from quantrol_operator.api.kinds import QUANTIZED_MODEL as QM
from quantrol_operator.apply import apply_plan
from quantrol_operator.handlers.common import Events, Runtime, handle, runtime, track
from quantrol_operator.observe.quantizedmodel import observe
from quantrol_operator.planning.quantizedmodel import TERMINAL, plan


def _reconcile(rt: Runtime, obj: dict[str, Any]) -> Events:
    result = plan(observe(rt.kube, obj, datetime.now(UTC)), rt.defaults.worker_image, rt.policy)
    apply_plan(rt.kube, result)
    rt.kube.patch_status(obj, result.status)
    if result.status.get("phase") in TERMINAL and (obj.get("status") or {}).get("phase") not in TERMINAL:
        metrics.CALIBRATIONS.labels(obj["metadata"]["namespace"], obj["metadata"]["name"],
                                    str(result.status["phase"]).lower()).inc()
    return [(e.type, e.reason, e.message) for e in result.events]


def _settled(body: kopf.Body) -> bool:
    status = body.get("status") or {}
    return bool(status.get("observedGeneration") == body.meta.get("generation") and status.get("phase") in TERMINAL)


@kopf.on.event(QM.group, QM.version, QM.plural)
async def quantized_model_changed(type: str, body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo,
                                  **_: Any) -> None:
    """Every change: one pass (unless settled); the poller follows the Job while it runs (reads only; a write happens
    only when the plan changes something). A Ready, Rejected or Failed generation costs nothing."""
    rt = runtime(memo)
    if track(rt, type, body, QM.kind, _reconcile, _settled(body)):
        await handle(body, logger, rt, QM.kind, "event", _reconcile)
