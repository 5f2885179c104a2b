"""Per-arm admission: a bounded number of requests upstream, a bounded FIFO queue, a bounded wait.

The decisions are pure functions (tested without a server); `ArmGate` is the small asyncio object that applies
them. Why bound at the router at all: vLLM accepts every request and queues it internally without limit, so an
overloaded (or slow, quantized) arm turns into unbounded latency for everyone; a 429 with Retry-After lets the
client back off and keeps the latency SLO about the requests actually served.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from quantrol_worker.router.config import AdmissionLimits

Decision = Literal["admit", "queue", "reject"]


def admission_decision(in_flight: int, waiting: int, limits: AdmissionLimits, may_wait: bool) -> Decision:
    """Admit when a slot is free and nobody is ahead in the queue (FIFO fairness); queue when the queue has room
    and the caller may wait; otherwise reject. Mirror and probe traffic never waits (`may_wait=False`): it must
    never take a queue place from a live request."""
    if in_flight < limits.max_in_flight and waiting == 0:
        return "admit"
    if may_wait and waiting < limits.max_queue and limits.max_queue_wait_s > 0:
        return "queue"
    return "reject"


def retry_after_seconds(waiting: int, limits: AdmissionLimits, mean_service_s: float) -> int:
    """A whole-second Retry-After: roughly how long until the queue ahead drains, at least 1 s, at most 60 s.

    The estimate is the queue length over the slots, times the recent mean time a request holds a slot.
    """
    if mean_service_s <= 0 or not math.isfinite(mean_service_s):
        mean_service_s = 1.0
    estimate = (waiting + 1) / max(1, limits.max_in_flight) * mean_service_s
    return max(1, min(60, math.ceil(estimate)))


class Rejected(Exception):
    """Admission refused; `reason` is `queue_full` or `queue_timeout` (metric label), `retry_after` in seconds."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(f"admission rejected: {reason}")
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class _ServiceTime:
    # An exponentially weighted mean of slot-holding time, only for the Retry-After estimate.
    mean_s: float = 1.0
    alpha: float = 0.1

    def observe(self, seconds: float) -> None:
        self.mean_s += self.alpha * (seconds - self.mean_s)


class ArmGate:
    """In-flight slots and a FIFO wait queue for one arm. Limits can be replaced at run time (config reload):
    raising `max_in_flight` wakes waiters at once; lowering it lets the requests already in flight finish."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._service = _ServiceTime()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_limits(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._hand_over()

    async def acquire(self, may_wait: bool) -> float:
        """Take a slot; return the seconds spent queued. Raises `Rejected`."""
        decision = admission_decision(self.in_flight, self.waiting, self.limits, may_wait)
        if decision == "admit":
            self.in_flight += 1
            return 0.0
        if decision == "reject":
            raise Rejected("queue_full", self._retry_after())
        started = time.monotonic()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            # asyncio.wait (not wait_for) so a timeout never cancels a future that was just handed a slot.
            await asyncio.wait({future}, timeout=self.limits.max_queue_wait_s)
        except asyncio.CancelledError:
            self._abandon(future)
            raise
        if not future.done():
            self._abandon(future)
            raise Rejected("queue_timeout", self._retry_after())
        return time.monotonic() - started

    def release(self, held_s: float) -> None:
        self._service.observe(held_s)
        self.in_flight -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        # Slots pass to waiters in FIFO order; a slot handed over is counted in in_flight at once.
        while self._waiters and self.in_flight < self.limits.max_in_flight:
            future = self._waiters.popleft()
            if not future.done():
                self.in_flight += 1
                future.set_result(None)

    def _abandon(self, future: asyncio.Future[None]) -> None:
        if future.done() and not future.cancelled():
            # The slot arrived just as the waiter gave up (client gone): give it back.
            self.in_flight -= 1
            self._hand_over()
            return
        future.cancel()
        with contextlib.suppress(ValueError):  # already handed over and popped
            self._waiters.remove(future)

    def _retry_after(self) -> int:
        return retry_after_seconds(self.waiting, self.limits, self._service.mean_s)
