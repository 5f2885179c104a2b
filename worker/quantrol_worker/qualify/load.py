"""Qualification's runs of the field load generator (quantrol_worker.fleet: GuideLLM), one arm at a time.

Why GuideLLM (and not kubernetes-sigs' inference-perf): inference-perf needs Python >= 3.12 and these images run
3.11; GuideLLM's hard dependencies (torch, transformers) are already in the serving image. It runs offline: the
tokenizer is a local directory (the artifact's own files), the prompts a local JSONL, and the only address it
talks to is the one it is given. Every run carries a `max_duration` (and, one at a time, `max_requests`)
constraint, and a run's data holds no more prompts than its bound needs, so nothing here can run on. Qualification
measures what one kind of request costs, so it sends GuideLLM's own requests (greedy, streamed), not the fleet's mix.
GuideLLM starts worker processes (multiprocessing, spawn): callers must sit under `if __name__ == "__main__"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantrol_worker.fleet import benchmark, planned_requests, requests_of, scenario, tool_version, write_data
from quantrol_worker.qualify.regimes import LoadRun, RequestSample

__all__ = ["run", "tool_version"]


def _sample(request: Any, t0: float, ok: bool) -> RequestSample:
    error = str(getattr(request.info, "error", "") or "")
    ttft = request.time_to_first_token_ms
    itl = request.inter_token_latency_ms
    start = request.request_start_time or t0
    return RequestSample(start=max(0.0, start - t0), ok=ok, rejected="429" in error,
                         ttft=None if ttft is None else ttft / 1000, itl=None if itl is None else itl / 1000,
                         output_tokens=int(request.output_tokens or 0) if ok else 0)


def run(target: str, tokenizer: Path, prompts: Sequence[str], output_tokens: int, work: Path, *,
        rate: float | None, seconds: float, max_requests: int | None = None) -> LoadRun:
    """One bounded run: one request at a time (`rate` None) or a constant `rate` (requests per second)."""
    data = write_data(work / "load.jsonl", prompts, output_tokens, planned_requests(rate, seconds, max_requests))
    profile: dict[str, Any] = {"kind": "synchronous"} if rate is None else {"kind": "constant", "rate": [rate]}
    bench = benchmark(scenario({"kind": "openai_http", "target": target}, tokenizer, data, profile, seconds,
                               max_requests))
    if bench is None:
        # Not one request finished within the bound: an engine that slow is a result (a request sent, nothing
        # back in `seconds`), not a failure of the measurement.
        return LoadRun(requests=[RequestSample(start=0.0, ok=False)], seconds=seconds, rate_rps=rate)
    successful, failed = requests_of(bench)
    everything = [*successful, *failed]
    started = [r.request_start_time for r in everything if r.request_start_time]
    t0 = min(started) if started else 0.0
    samples = [_sample(r, t0, True) for r in successful] + [_sample(r, t0, False) for r in failed]
    ends = [r.request_end_time for r in everything if r.request_end_time]
    wall = (max(ends) - t0) if ends and started else seconds
    return LoadRun(requests=samples, seconds=max(wall, 1e-3), rate_rps=rate)
