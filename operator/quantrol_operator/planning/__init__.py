"""Pure planners: (spec, status, observed children, now) → (children to apply, status, events). No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Plan:
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[dict[str, Any]] = field(default_factory=list)  # objects (kind, namespace, name) to remove
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
