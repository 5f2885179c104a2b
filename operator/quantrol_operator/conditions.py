"""Kubernetes-style conditions: set by type, `lastTransitionTime` moves only when `status` does."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from quantrol_operator.api.common import ConditionStatus


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: ConditionStatus | bool,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new list with `type_` set; other conditions kept in their order."""
    if isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    previous = next((c for c in conditions if c.get("type") == type_), None)
    moved = previous is None or previous.get("status") != status.value
    condition: dict[str, Any] = {
        "type": type_,
        "status": status.value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": iso(now) if moved or previous is None else previous.get("lastTransitionTime"),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    out = [c for c in conditions if c.get("type") != type_]
    index = next((i for i, c in enumerate(conditions) if c.get("type") == type_), len(out))
    out.insert(index, condition)
    return out


def condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)
