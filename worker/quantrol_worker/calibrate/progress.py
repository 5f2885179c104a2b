"""Progress lines on stderr (one JSON object per line: stage, layer i/N, elapsed), and per-stage timings."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from quantrol_worker.contracts import Stage


class Progress:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}
        self.stage: Stage | None = None

    def log(self, message: str, *, i: int | None = None, n: int | None = None, **extra: Any) -> None:
        line: dict[str, Any] = {
            "elapsed": round(time.monotonic() - self.started, 3),
            "stage": self.stage.value if self.stage else None,
            "msg": message,
        }
        if i is not None:
            line["i"], line["n"] = i, n
        line.update(extra)
        print("quantrol " + json.dumps(line, default=str), file=self.stream, flush=True)

    @contextmanager
    def stage_of(self, stage: Stage) -> Iterator[None]:
        self.stage = stage
        start = time.monotonic()
        self.log("start")
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.timings[stage.value] = round(self.timings.get(stage.value, 0.0) + took, 3)
            self.log("done", seconds=round(took, 3))
