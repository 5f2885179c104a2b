"""Kubernetes-style conditions on the typed status models: set by type, `lastTransitionTime` moves only when
`status` does."""

from __future__ import annotations

from datetime import datetime

from quantrol_operator.api.common import Condition, ConditionStatus


def set_condition(conditions: list[Condition], type_: str, status: ConditionStatus | bool | None, reason: str,
                  message: str, *, now: datetime, generation: int | None = None) -> list[Condition]:
    """A new list with `type_` set (None: Unknown); other conditions kept in their order."""
    if status is None:
        status = ConditionStatus.UNKNOWN
    elif isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    index = next((i for i, c in enumerate(conditions) if c.type == type_), None)
    previous = conditions[index] if index is not None else None
    moved = previous is None or previous.status != status or previous.last_transition_time is None
    condition = Condition(type=type_, status=status, reason=reason, message=message,
                          last_transition_time=now if moved or previous is None else previous.last_transition_time,
                          observed_generation=generation)
    out = list(conditions)
    if index is None:
        out.append(condition)
    else:
        out[index] = condition
    return out


def condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
