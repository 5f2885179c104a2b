"""Placeholders until reconciliation lands: log each QuantizedModel and ServingPolicy the operator sees."""

from __future__ import annotations

from typing import Any

import kopf

from quantrol_operator.api import quantizedmodel, servingpolicy
from quantrol_operator.api.common import GROUP, VERSION


@kopf.on.resume(GROUP, VERSION, quantizedmodel.PLURAL)
@kopf.on.create(GROUP, VERSION, quantizedmodel.PLURAL)
def seen_quantized_model(namespace: str | None, name: str | None, logger: kopf.Logger, **_: Any) -> None:
    logger.info("seen %s %s/%s", quantizedmodel.KIND, namespace, name)


@kopf.on.resume(GROUP, VERSION, servingpolicy.PLURAL)
@kopf.on.create(GROUP, VERSION, servingpolicy.PLURAL)
def seen_serving_policy(namespace: str | None, name: str | None, logger: kopf.Logger, **_: Any) -> None:
    logger.info("seen %s %s/%s", servingpolicy.KIND, namespace, name)
