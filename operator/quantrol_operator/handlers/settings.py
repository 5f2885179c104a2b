"""kopf settings for Quantrol, applied at start-up, and the start-up line saying what the operator watches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import kopf
import prometheus_client
from kubernetes.client.exceptions import ApiException

from quantrol_operator.api.common import GROUP
from quantrol_operator.api.kinds import KINDS
from quantrol_operator.apply import PodMonitors
from quantrol_operator.children import monitoring
from quantrol_operator.delivery import RouterDelivery
from quantrol_operator.handlers.common import DEFAULTS, FINALIZER, MEMO_KEY, Runtime, poll_forever
from quantrol_operator.kube import Kube
from quantrol_operator.policy import InstallPolicy
from quantrol_worker.addresses import from_environment

# kopf keeps its bookkeeping in annotations under our own prefix, never in `status`: status belongs to the
# models (and the CRD schema prunes undeclared status fields, which would lose kopf's progress).
ANNOTATION_PREFIX = GROUP
WATCHED_KINDS = tuple(k.kind for k in KINDS)
# Set by `quantrol-operator` (run.py) from the kopf arguments; kopf does not pass the namespaces to handlers.
SCOPE_ENV = "QUANTROL_OPERATOR_SCOPE"
METRICS_PORT_ENV = "QUANTROL_METRICS_PORT"


@kopf.on.startup()
def start_runtime(memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """The operator's runtime, made once: the API client, where pods answer (QUANTROL_ADDRESS_RESOLVER, the
    cluster's by default), and whether to write PodMonitors (QUANTROL_POD_MONITORS; `auto` asks API discovery)."""
    kube = Kube.from_environment()
    addresses = from_environment()
    try:
        enabled, why = DEFAULTS.pod_monitors_enabled(lambda: kube.serves(monitoring.API_VERSION, monitoring.KIND))
    except ApiException as exc:
        raise kopf.TemporaryError(f"API discovery failed ({exc.status} {exc.reason}); retrying", delay=5) from exc
    monitors = PodMonitors(dict(DEFAULTS.pod_monitor_labels) if enabled else None)
    policy = InstallPolicy.from_env()  # invalid JSON or values stop the start-up, naming the field
    memo[MEMO_KEY] = Runtime(kube=kube, defaults=DEFAULTS, addresses=addresses,
                             delivery=RouterDelivery(kube, addresses, policy.reads), pod_monitors=monitors,
                             policy=policy)
    logger.info("%s: %s", "writing one PodMonitor per ServingPolicy" if enabled else "writing no PodMonitors", why)
    logger.info("install policy: plain-HTTP registries %s", ", ".join(policy.registries.plain_http) or "none")


POLLER_KEY = "quantrol-poller"


@kopf.on.startup()
async def start_poller(memo: kopf.Memo, **_: Any) -> None:
    """The control loop's clock (handlers.common.poll_forever), started once the runtime exists."""
    rt = memo.get(MEMO_KEY)
    if not isinstance(rt, Runtime):
        raise kopf.TemporaryError("the runtime is not made yet", delay=1)
    memo[POLLER_KEY] = asyncio.create_task(poll_forever(rt, DEFAULTS.poll_seconds), name="quantrol-poller")


@kopf.on.cleanup()
async def stop_poller(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get(POLLER_KEY)
    if isinstance(task, asyncio.Task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _QuietPasses(logging.Filter):
    """Drops kopf's "Timer … succeeded." and "Handler … succeeded." lines: one per pass per object at INFO, they
    bury what happened under what merely ran. Failures, retries and our own Events stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).endswith("succeeded."))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    for handler in logging.getLogger().handlers:  # kopf's objects logger propagates to the root handlers
        handler.addFilter(_QuietPasses())
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    # Only warnings become Events on their own; transitions are posted explicitly with kopf.event().
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "quantrol-operator"
    port = os.environ.get(METRICS_PORT_ENV)
    if port:
        # quantrol_* metrics (phase, weight, verdicts, rollbacks, reconcile errors) for the chart's ServiceMonitor.
        prometheus_client.start_http_server(int(port))
        logger.info("serving quantrol_* metrics on :%s/metrics", port)
    scope = os.environ.get(SCOPE_ENV, "the namespaces given to kopf run")
    logger.info("watching %s in %s", " and ".join(WATCHED_KINDS), scope)
