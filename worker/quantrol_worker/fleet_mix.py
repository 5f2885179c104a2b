"""The client fleet's request mix: what each request of a production fleet looks like (pure; fleet.py runs it,
fleet_guidellm.py applies it inside GuideLLM's worker processes)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from quantrol_worker.router.config import SliceRule

SLICE_HEADER: str = SliceRule.model_fields["header"].default  # the router's default: one word, in one place
FLEET_BACKEND = "quantrol_fleet"  # fleet_guidellm's GuideLLM backend: its HTTP backend, each request shaped by Mix
STOP = threading.Event()  # set by SIGTERM/SIGINT in the process that runs GuideLLM's scheduler


@dataclass(frozen=True)
class Mix:
    """How a production client fleet shapes its requests (the defaults: a chat fleet's)."""

    sampled_temperature: float = 0.8
    sampled_every: int = 2  # every other request is sampled, the rest greedy
    unstreamed_every: int = 4  # one request in four is not streamed (the router still measures its latencies)
    slice_header: str = SLICE_HEADER


@dataclass(frozen=True)
class Prompt:
    text: str
    slice: str | None = None  # the workload slice the client names in the header; None: the header is left out


def shape(n: int, mix: Mix) -> tuple[float, bool]:
    """(temperature, streamed) of the n-th request a fleet worker sends."""
    sampled = mix.sampled_every > 0 and n % mix.sampled_every == mix.sampled_every - 1
    unstreamed = mix.unstreamed_every > 0 and n % mix.unstreamed_every == mix.unstreamed_every // 2
    return (mix.sampled_temperature if sampled else 0.0), not unstreamed


def endpoint(n: int, mix: Mix, endpoints: int) -> int:
    """Which endpoint the n-th request goes to: in turn, a whole period of the mix at a time, so that every
    endpoint sees the same mix (taking them in turn request by request would send every sampled one to one)."""
    period = math.lcm(max(mix.sampled_every, 1), max(mix.unstreamed_every, 1))
    return (n // period) % max(endpoints, 1)
