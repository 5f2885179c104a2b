"""The field load generator: GuideLLM (PyPI `guidellm`), driven through its Python API, one bounded run at a time.

Why GuideLLM (and not kubernetes-sigs' inference-perf): inference-perf needs Python >= 3.12 and these images run
3.11; GuideLLM's hard dependencies (torch, transformers) are already in the serving image. It runs offline: the
tokenizer is a local directory (the artifact's own files), the prompts a local JSONL, and the only address it
talks to is the one it is given. Every run carries a `max_duration` (and, one at a time, `max_requests`)
constraint, and a run's data holds no more prompts than its bound needs, so nothing here can run on.
GuideLLM starts worker processes (multiprocessing, spawn): callers must sit under `if __name__ == "__main__"`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from quantrol_worker.qualify.regimes import LoadRun, RequestSample

TOOL = "guidellm"
MAX_PROMPTS = 20_000  # the most requests one run may plan, whatever rate × seconds says
NOTHING_COMPLETED = "No measurement start or end times available"  # GuideLLM 0.8's words for it


def tool_version() -> str:
    try:
        return f"{TOOL} {metadata.version(TOOL)}"
    except metadata.PackageNotFoundError:
        return f"{TOOL} (not installed)"


def write_data(path: Path, prompts: Sequence[str], output_tokens: int, count: int) -> Path:
    """`count` requests cycling through `prompts` (GuideLLM's column names: prompt, output_tokens_count)."""
    count = max(1, min(count, MAX_PROMPTS))
    lines = (json.dumps({"prompt": prompts[i % len(prompts)], "output_tokens_count": output_tokens})
             for i in range(count))
    path.write_text("\n".join(lines) + "\n")
    return path


def _scenario(target: str, tokenizer: Path, data: Path, profile: dict[str, Any], seconds: float,
              max_requests: int | None) -> Any:
    from guidellm.schemas.benchmark import BenchmarkScenario

    constraints: list[dict[str, Any]] = [{"kind": "max_duration", "seconds": seconds}]
    if max_requests is not None:
        constraints.append({"kind": "max_requests", "count": max_requests})
    return BenchmarkScenario.create(scenario=None, spec={
        "backend": {"kind": "openai_http", "target": target},
        "profile": profile,
        "constraints": constraints,
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "data": [{"kind": "json_file", "path": str(data)}],
        "outputs": [],
    })


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
    from guidellm.benchmark.entrypoints import benchmark_generative_text

    planned = max_requests if rate is None and max_requests else math.ceil((rate or 1.0) * seconds * 1.2) + 4
    data = write_data(work / "load.jsonl", prompts, output_tokens, planned)
    profile: dict[str, Any] = {"kind": "synchronous"} if rate is None else {"kind": "constant", "rate": [rate]}
    scenario = _scenario(target, tokenizer, data, profile, seconds, max_requests)
    try:
        report, _ = asyncio.run(benchmark_generative_text(args=scenario, progress=False, console=None))
    except ValueError as exc:
        if NOTHING_COMPLETED not in str(exc):
            raise
        # GuideLLM compiles no benchmark when not one request finished within the bound: an engine that slow is a
        # result (a request sent, nothing back in `seconds`), not a failure of the measurement.
        return LoadRun(requests=[RequestSample(start=0.0, ok=False)], seconds=seconds, rate_rps=rate)
    benchmark = report.benchmarks[0]
    started = [r.request_start_time for r in _all(benchmark) if r.request_start_time]
    t0 = min(started) if started else 0.0
    samples = [_sample(r, t0, True) for r in benchmark.requests.successful or []]
    samples += [_sample(r, t0, False) for r in [*(benchmark.requests.errored or []),
                                                *(benchmark.requests.incomplete or [])]]
    ends = [r.request_end_time for r in _all(benchmark) if r.request_end_time]
    wall = (max(ends) - t0) if ends and started else seconds
    return LoadRun(requests=samples, seconds=max(wall, 1e-3), rate_rps=rate)


def _all(benchmark: Any) -> list[Any]:
    breakdown = benchmark.requests
    return [*(breakdown.successful or []), *(breakdown.errored or []), *(breakdown.incomplete or [])]
