"""kopf settings for Quantrol, applied at start-up, and the start-up line saying what the operator watches."""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
import prometheus_client

from quantrol_operator.api import quantizedmodel, servingpolicy
from quantrol_operator.api.common import GROUP

# kopf keeps its bookkeeping in annotations under our own prefix, never in `status`: status belongs to the
# models (and the CRD schema prunes undeclared status fields, which would lose kopf's progress).
ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/finalizer"
WATCHED_KINDS = (quantizedmodel.KIND, servingpolicy.KIND)
# Set by `quantrol-operator` (run.py) from the kopf arguments; kopf does not pass the namespaces to handlers.
SCOPE_ENV = "QUANTROL_OPERATOR_SCOPE"
METRICS_PORT_ENV = "QUANTROL_METRICS_PORT"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
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
