"""The demo's client fleet and engine warm-up, written once for both demos: `quantrol demo --local` runs them in
threads of its own process, `quantrol demo --cluster` ships this file's source into a pod (`python -c`), so it
imports the standard library only and every entry point reads plain arguments or environment variables.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

# Both slices of the tiny model's calibration data (prose and code), each request naming its slice in the header the
# router reads (its allowed values are the QuantizedModel's slice names), as a client that knows its workload would.
PROMPTS = (("The licence grants", "prose"), ("def parse(self, text):", "code"),
           ("Permission is hereby granted", "prose"), ("import os\nimport", "code"),
           ("You may not use this file except", "prose"), ("for i in range(", "code"))
SLICE_HEADER = "X-Quantrol-Slice"
# Chat fleets sample: every other request is sampled at this temperature (the rest greedy), so the quality verdicts
# come from sampled traffic too; one request in four is not streamed (the router still measures its latencies).
SAMPLED_TEMPERATURE = 0.8
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy


class Counts:
    """Answers and failures of a load run; failures before the first answer are start-up, not counted."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self._lock = threading.Lock()

    def answered(self) -> None:
        with self._lock:
            self.ok += 1

    def refused(self) -> None:
        with self._lock:
            self.failed += 1 if self.ok else 0


def completion(model: str, prompt: str, max_tokens: int, n: int = 0) -> bytes:
    """The n-th request of a client: sampled when n is odd, not streamed when n % 4 == 2."""
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": SAMPLED_TEMPERATURE if n % 2 else 0, "stream": n % 4 != 2}).encode()


def client(worker: int, workers: int, url_of: Callable[[], str | None], model: str, max_tokens: int,
           stop: threading.Event, counts: Counts) -> None:
    """One client: a streamed completion in flight at a time against `url_of()` (None: not ready yet), until `stop`."""
    n = worker
    while not stop.is_set():
        url = url_of()
        if url is None:
            stop.wait(1.0)
            continue
        prompt, slice_ = PROMPTS[n % len(PROMPTS)]
        request = urllib.request.Request(url, data=completion(model, prompt, max_tokens, n // len(PROMPTS)),
                                         headers={"Content-Type": "application/json", SLICE_HEADER: slice_})
        n += workers
        try:
            with _DIRECT.open(request, timeout=60) as rsp:
                rsp.read()
            counts.answered()
        except OSError:
            counts.refused()
            stop.wait(0.5)  # the router is not ready yet, or refused: do not spin
        stop.wait(0.1)


def start_clients(workers: int, url_of: Callable[[], str | None], model: str, max_tokens: int,
                  stop: threading.Event, counts: Counts) -> list[threading.Thread]:
    threads = [threading.Thread(target=client, args=(i, workers, url_of, model, max_tokens, stop, counts),
                                name=f"demo-load-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    return threads


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


def load_main() -> None:
    """In a pod: QUANTROL_LOAD_{URL,MODEL,WORKERS,MAX_TOKENS}; runs until SIGTERM, printing its counts."""
    stop, counts = threading.Event(), Counts()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    url = os.environ["QUANTROL_LOAD_URL"]
    threads = start_clients(int(os.environ["QUANTROL_LOAD_WORKERS"]), lambda: url, os.environ["QUANTROL_LOAD_MODEL"],
                            int(os.environ["QUANTROL_LOAD_MAX_TOKENS"]), stop, counts)
    while not stop.wait(5.0):
        print(f"quantrol-load ok={counts.ok} failed={counts.failed}", flush=True)
    for thread in threads:
        thread.join(70)
    print(f"quantrol-load ok={counts.ok} failed={counts.failed}", flush=True)


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
