"""The demo's engine warm-up, written once for both demos: `quantrol demo --local` runs it in threads of its own
process, `quantrol demo --cluster` ships this file's source into a pod (`python -c`), so it imports the standard
library only and its entry point reads environment variables. Not a load generator (the demo's traffic is the
client fleet, quantrol_worker.fleet: GuideLLM): one request of each kind the router sends, straight to an engine.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

SAMPLED_TEMPERATURE = 0.8  # the fleet's (quantrol_worker.fleet.Mix): the sampled kind is warmed at it
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy


def warm_bodies(model: str) -> list[dict[str, Any]]:
    """One request of each kind the router sends (a streamed completion with token ids and top-k log-probabilities,
    greedy and sampled; a teacher-forced scoring with prompt_logprobs — it sends token ids, not text, as
    protocol.score_body does) at several prompt lengths: CPU kernels are built per shape (oneDNN primitives,
    inductor graphs) at the first request that needs them."""
    words = ["the", "licence", "grants", "permission", "to", "use", "copy", "modify", "merge", "publish", "and",
             "distribute", "the", "software"]
    bodies: list[dict[str, Any]] = []
    for n in (1, 3, 6, 10, 15, 22, 30):
        prompt = " ".join(words[i % len(words)] for i in range(n))
        bodies.append({"model": model, "prompt": prompt, "max_tokens": 4, "stream": True, "return_token_ids": True,
                       "temperature": SAMPLED_TEMPERATURE if n % 2 else 0, "logprobs": 5,
                       "return_tokens_as_token_ids": True})
        bodies.append({"model": model, "prompt": [(17 * i + 5) % 1000 + 10 for i in range(n + 4)], "max_tokens": 1,
                       "temperature": 0, "prompt_logprobs": 5})
    return bodies


def warm(url: str, bodies: Sequence[dict[str, Any]], timeout: float) -> list[str]:
    """Send each body straight to one engine: the first two alone (the first of each kind may compile for minutes),
    then the rest four side by side, as traffic will come. Returns the failures."""
    failures: list[str] = []

    def send(body: dict[str, Any]) -> None:
        request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with _DIRECT.open(request, timeout=timeout) as rsp:
                rsp.read()
        except OSError as exc:
            failures.append(repr(exc))

    for body in bodies[:2]:
        send(body)
    for start in range(2, len(bodies), 4):
        threads = [threading.Thread(target=send, args=(b,), daemon=True) for b in bodies[start:start + 4]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
    return failures


def warm_main() -> None:
    """In a pod: QUANTROL_WARM_{URL,MODEL,TIMEOUT}; exits 1 when any warm-up request failed."""
    began = time.monotonic()
    failures = warm(os.environ["QUANTROL_WARM_URL"], warm_bodies(os.environ["QUANTROL_WARM_MODEL"]),
                    float(os.environ["QUANTROL_WARM_TIMEOUT"]))
    print(f"warm after {time.monotonic() - began:.0f}s; failures: {failures}", flush=True)
    sys.exit(1 if failures else 0)


def pod_script(main: Callable[[], None]) -> str:
    """This module's source as a `python -c` program that runs `main` (one of the `*_main` functions above)."""
    with open(__file__, encoding="utf-8") as handle:
        source = handle.read()
    return f"{source}\n{main.__name__}()\n"
