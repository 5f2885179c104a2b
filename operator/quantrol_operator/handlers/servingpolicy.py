"""ServingPolicy handlers: kopf wiring only. Read the object, observe the world, plan, apply, deliver the router
config, patch status, export metrics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

from quantrol_operator import metrics
from quantrol_operator.api.kinds import SERVING_POLICY as SP
from quantrol_operator.api.servingpolicy import ServingPolicyStatus
from quantrol_operator.apply import apply_plan, orphan_children
from quantrol_operator.handlers.common import DEFAULTS, Events, Runtime, handle, runtime
from quantrol_operator.observe import servingpolicy as observe
from quantrol_operator.planning.servingpolicy import Images, orphaned_on_delete, plan, read_spec


def _reconcile(rt: Runtime, obj: dict[str, Any]) -> Events:
    meta = obj["metadata"]
    observed, token = observe.observe(rt.kube, rt.addresses, rt.defaults.prometheus_url, obj, datetime.now(UTC))
    images = Images(rt.defaults.serving_image, rt.defaults.router_image, rt.defaults.tools_image)
    result = plan(observed, images, rt.pod_monitors.labels, rt.policy)
    apply_plan(rt.kube, result, rt.pod_monitors)
    status = ServingPolicyStatus.model_validate(result.status)
    status.router = rt.delivery.sync(status.router, result.apply, observed.deployments, meta["namespace"],
                                     meta["name"], token)
    rt.kube.patch_status(obj, status.to_wire())
    metrics.export_rollout(meta["namespace"], meta["name"], status, result.analysis, result.rollback)
    return [(e.type, e.reason, e.message) for e in result.events]


@kopf.on.event(SP.group, SP.version, SP.plural)
async def serving_policy_changed(type: str, body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo,
                                 **_: Any) -> None:
    if type == "DELETED" or body.meta.get("deletionTimestamp"):
        return
    await handle(body, logger, runtime(memo), SP.kind, "event", _reconcile)


@kopf.timer(SP.group, SP.version, SP.plural, interval=DEFAULTS.poll_seconds, initial_delay=1)
async def serving_policy_poll(body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    """The control loop's clock: arms' readiness, kernels, and SLO analysis when due (reads; writes on change)."""
    if body.meta.get("deletionTimestamp"):
        return
    await handle(body, logger, runtime(memo), SP.kind, "timer", _reconcile)


@kopf.on.delete(SP.group, SP.version, SP.plural)
def serving_policy_deleted(body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    """deletionPolicy Orphan: the arms keep serving without an owner (the PodMonitor with them: arms that keep
    serving keep being scraped; `kubectl delete podmonitor` once they go)."""
    rt = runtime(memo)
    namespace, policy, uid = str(body.meta.namespace), str(body.meta.name), str(body.meta.uid)
    rt.delivery.forget(namespace, policy)
    spec = read_spec({"spec": dict(body.spec)}).spec
    # An invalid spec still says what its deletionPolicy is: nothing serving is lost on a typo elsewhere.
    if not (orphaned_on_delete(spec) if spec else dict(body.spec).get("deletionPolicy") == "Orphan"):
        return
    released = orphan_children(rt.kube, namespace, policy, uid, rt.pod_monitors)
    logger.info("deletionPolicy Orphan: %s/%s removed, its %d children keep serving", namespace, policy, released)
