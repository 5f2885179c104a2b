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
from quantrol_operator.handlers.common import FINALIZER, Events, Runtime, handle, runtime, track
from quantrol_operator.observe import servingpolicy as observe
from quantrol_operator.planning.servingpolicy import Images, orphaned_on_delete, plan, read_spec, settled


def _reconcile(rt: Runtime, obj: dict[str, Any]) -> Events:
    meta = obj["metadata"]
    observed, token = observe.observe(rt.kube, rt.addresses, rt.defaults.prometheus_url, obj, datetime.now(UTC),
                                      rt.policy)
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
    """Every change: one pass, settled or not (a retry or rollback annotation, a spec edit, must be acted on), and
    the newest version handed to the poller, which runs the control loop's clock (arms' readiness, kernels, SLO
    analysis when due) while the policy is not settled."""
    rt = runtime(memo)
    # An Orphan policy without its finalizer yet: kopf adds it right after this handler (its test-and-set patch
    # would lose the race against this pass's writes); the pass runs on the event that write brings.
    unguarded = _orphaned(body.spec) and FINALIZER not in (body.meta.get("finalizers") or [])
    if track(rt, type, body, SP.kind, _reconcile, settled(body) or unguarded) or (
            type != "DELETED" and not body.meta.get("deletionTimestamp") and not unguarded):
        await handle(body, logger, rt, SP.kind, "event", _reconcile)


def _orphaned(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("deletionPolicy") == "Orphan"


# The finalizer (kopf adds it where a deletion handler's filter matches) only where deletion needs the operator:
# deletionPolicy Orphan. Every other policy (and every QuantizedModel) goes with its namespace, operator or not.
@kopf.on.delete(SP.group, SP.version, SP.plural, when=_orphaned)
def serving_policy_deleted(body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    """deletionPolicy Orphan: the arms keep serving without an owner (the PodMonitor with them: arms that keep
    serving keep being scraped; `kubectl delete podmonitor` once they go)."""
    rt = runtime(memo)
    namespace, policy, uid = str(body.meta.namespace), str(body.meta.name), str(body.meta.uid)
    with rt.turn(uid):  # after any pass in flight, and before any later one (which `released` then stops)
        rt.released.add(uid)
        rt.tracked.pop(uid, None)
    rt.delivery.forget(namespace, policy)
    spec = read_spec({"spec": dict(body.spec)}).spec
    # An invalid spec still says what its deletionPolicy is: nothing serving is lost on a typo elsewhere.
    if not (orphaned_on_delete(spec) if spec else dict(body.spec).get("deletionPolicy") == "Orphan"):
        return
    released = orphan_children(rt.kube, namespace, policy, uid, rt.pod_monitors)
    logger.info("deletionPolicy Orphan: %s/%s removed, its %d children keep serving", namespace, policy, released)
