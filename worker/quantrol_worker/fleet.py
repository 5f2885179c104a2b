"""The one load generator: GuideLLM (PyPI `guidellm`), for qualification, the demo's client fleet and the benches.

Qualification (qualify/load.py) drives GuideLLM's own OpenAI backend, one arm at a time. The demo and the benches
also need what a production fleet sends and GuideLLM 0.8 sets only per run: each request naming its slice in the
router's header, every other one sampled, one in four not streamed, spread over several router endpoints as a
Service spreads connections. That is added through GuideLLM's registries, not beside it: a backend
(`quantrol_fleet`, GuideLLM's HTTP backend shaping each request from the mix) and a constraint
(`quantrol_until_stopped`: SIGTERM or SIGINT ends the run the way `max_duration` does, so GuideLLM stops its worker
processes and still compiles the report the counts come from). Scheduling, rates, timing and statistics stay
GuideLLM's.

Offline: prompts come from a local file and the tokenizer is a local directory; without one, a byte-level BPE
tokenizer is trained on the prompts themselves (GuideLLM counts prompt tokens with it; the engines' usage counts
the output). Every run is bounded by `max_duration`. GuideLLM starts worker processes (multiprocessing, spawn):
callers must sit under `if __name__ == "__main__"`.

    quantrol-worker fleet --target URL [--target URL ...] --model NAME --prompts FILE.jsonl (--rate RPS | --clients N)
        --seconds S
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import import_module, metadata
from pathlib import Path
from typing import Any

from quantrol_worker.fleet_mix import FLEET_BACKEND, STOP, Mix, Prompt, endpoint, shape

__all__ = ["STOP", "Mix", "Prompt", "endpoint", "shape"]  # with this module's own names: one import for callers

TOOL = "guidellm"
MAX_PROMPTS = 100_000  # the most requests one run may plan, whatever rate × seconds says
NOTHING_COMPLETED = "No measurement start or end times available"  # GuideLLM 0.8's words for it
COUNTS_LINE = "quantrol-load ok={ok} failed={failed}"  # the fleet's last line
# What the demos read from the fleet's log while it runs: GuideLLM's own progress lines (every ~10 s), then ours.
COUNTS = re.compile(r"(?:successful|ok)=(\d+) (?:errored|failed)=(\d+)")
PROCESSES = 1  # GuideLLM worker processes: one sends a few hundred requests a second; more cost CPU the engines need


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


def planned_requests(rate: float | None, seconds: float, max_requests: int | None = None) -> int:
    """How many rows a run's data needs: its bound, with room for a rate that runs a little ahead (one at a time
    without a request bound: one a second)."""
    if rate is None and max_requests:
        return min(MAX_PROMPTS, max_requests)
    return min(MAX_PROMPTS, math.ceil((rate or 1.0) * seconds * 1.2) + 4)


def scenario(backend: dict[str, Any], tokenizer: Path, data: Path, profile: dict[str, Any], seconds: float,
             max_requests: int | None = None, until_stopped: bool = False) -> Any:
    from guidellm.schemas.benchmark import BenchmarkScenario

    constraints: list[dict[str, Any]] = [{"kind": "max_duration", "seconds": seconds}]
    if max_requests is not None:
        constraints.append({"kind": "max_requests", "count": max_requests})
    if until_stopped or backend.get("kind") == FLEET_BACKEND:
        _register()
    if until_stopped:
        constraints.append({"kind": "quantrol_until_stopped"})
    return BenchmarkScenario.create(scenario=None, spec={
        "backend": backend,
        "profile": profile,
        "constraints": constraints,
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "data": [{"kind": "json_file", "path": str(data)}],
        "outputs": [],
    })


def benchmark(scenario_: Any) -> Any | None:
    """GuideLLM's benchmark of one run; None when not one request finished within the run's bounds (GuideLLM
    compiles no benchmark then: for a slow engine that is a result, not a failure of the measurement)."""
    from guidellm.benchmark.entrypoints import benchmark_generative_text

    try:
        report, _ = asyncio.run(benchmark_generative_text(args=scenario_, progress=False, console=None))
    except ValueError as exc:
        if NOTHING_COMPLETED not in str(exc):
            raise
        return None
    return report.benchmarks[0]


def requests_of(bench: Any) -> tuple[list[Any], list[Any]]:
    """(successful, failed) requests of a benchmark; cut off by the run's end counts as failed."""
    breakdown = bench.requests
    return list(breakdown.successful or []), [*(breakdown.errored or []), *(breakdown.incomplete or [])]


def tokenizer_for(prompts: Sequence[str], work: Path) -> Path:
    """A local tokenizer trained on the prompts (byte-level BPE, seconds): no hub, no model needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = work / "tokenizer"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(prompts) * 4, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Answer:
    """One request as the fleet saw it (seconds)."""

    ok: bool
    latency: float | None  # request sent to its last byte
    ttft: float | None


@dataclass(frozen=True)
class FleetResult:
    answers: tuple[Answer, ...]
    wall: float  # first request sent to the last one ended

    @property
    def ok(self) -> int:
        return sum(a.ok for a in self.answers)

    @property
    def failed(self) -> int:
        return sum(not a.ok for a in self.answers)


def run_fleet(targets: Sequence[str], model: str, prompts: Sequence[Prompt], output_tokens: int, seconds: float,
              work: Path, *, rate: float | None = None, clients: int | None = None, requests: int | None = None,
              mix: Mix | None = None, tokenizer: Path | None = None, processes: int = PROCESSES,
              rampup: float = 0.0) -> FleetResult:
    """A client fleet for at most `seconds` (and `requests`), or until SIGTERM/SIGINT: `rate` requests per second
    with Poisson arrivals (independent users, an open loop), or `clients` each with one request in flight (a closed
    loop), their first requests spread over `rampup` seconds. A request cut off by the end counts as failed."""
    if (rate is None) == (clients is None):
        raise ValueError("a fleet has either a rate or a number of clients")
    from guidellm.settings import settings

    settings.max_worker_processes = max(1, processes)
    mix = mix or Mix()
    work.mkdir(parents=True, exist_ok=True)
    texts = [p.text for p in prompts]
    rows = requests if requests else planned_requests(rate, seconds) if rate else MAX_PROMPTS
    data = write_data(work / "fleet.jsonl", texts, output_tokens, rows)
    backend = {"kind": FLEET_BACKEND, "target": targets[0], "targets": list(targets), "model": model,
               "request_format": "/v1/completions", "validate_backend": False,
               "slices": {p.text: p.slice for p in prompts if p.slice}, "slice_header": mix.slice_header,
               "sampled_temperature": mix.sampled_temperature, "sampled_every": mix.sampled_every,
               "unstreamed_every": mix.unstreamed_every}
    profile: dict[str, Any] = ({"kind": "poisson", "rate": [rate]} if rate is not None
                               else {"kind": "concurrent", "streams": [clients]})
    if rampup > 0:
        profile["rampup_duration"] = rampup
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: STOP.set())
    bench = benchmark(scenario(backend, tokenizer or tokenizer_for(texts, work), data, profile, seconds,
                               max_requests=requests, until_stopped=True))
    if bench is None:
        return FleetResult((), 0.0)
    successful, failed = requests_of(bench)
    answers = tuple(_answer(r, True) for r in successful) + tuple(_answer(r, False) for r in failed)
    starts = [r.request_start_time for r in (*successful, *failed) if r.request_start_time]
    ends = [r.request_end_time for r in (*successful, *failed) if r.request_end_time]
    return FleetResult(answers, (max(ends) - min(starts)) if starts and ends else 0.0)


def _answer(request: Any, ok: bool) -> Answer:
    start, end, ttft = request.request_start_time, request.request_end_time, request.time_to_first_token_ms
    return Answer(ok, (end - start) if start and end else None, None if ttft is None else ttft / 1000)


def _register() -> None:
    """Import the module holding the GuideLLM extensions: it registers them on import (once a process, as every
    import), in every process that unpickles the backend too."""
    import_module("quantrol_worker.fleet_guidellm")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("fleet", help="a client fleet against a router (GuideLLM with the fleet's mix)")
    parser.add_argument("--target", action="append", required=True,
                        help="base URL (http://host:port); repeat to spread over several endpoints")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, type=Path,
                        help="JSONL, one {\"prompt\": ..., \"slice\": ...} per line (slice optional)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="requests per second (Poisson arrivals: an open loop)")
    load.add_argument("--clients", type=int, help="clients with one request in flight each (a closed loop)")
    parser.add_argument("--seconds", type=float, required=True, help="hard bound; SIGTERM ends it earlier")
    parser.add_argument("--requests", type=int, help="a bound on the requests sent too")
    parser.add_argument("--rampup", type=float, default=0.0, help="spread the first requests over these seconds")
    parser.add_argument("--report", type=Path, help="write every request's outcome and latencies here (JSON)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tokenizer", type=Path, help="a local tokenizer directory (default: one trained here)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantrol-fleet"))
    parser.add_argument("--processes", type=int, default=PROCESSES, help="GuideLLM worker processes")
    parser.add_argument("--sampled-temperature", type=float, default=Mix.sampled_temperature)
    parser.add_argument("--sampled-every", type=int, default=Mix.sampled_every, help="0: all greedy")
    parser.add_argument("--unstreamed-every", type=int, default=Mix.unstreamed_every, help="0: all streamed")


def read_prompts(path: Path) -> list[Prompt]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return [Prompt(str(row["prompt"]), row.get("slice")) for row in rows]


def prompts_jsonl(prompts: Sequence[Prompt]) -> str:
    """The prompts as `--prompts` reads them (read_prompts): one {"prompt", "slice"} per line, no slice when None."""
    return "".join(json.dumps({"prompt": p.text, **({"slice": p.slice} if p.slice else {})}) + "\n"
                   for p in prompts)


def write_prompts(path: Path, prompts: Sequence[Prompt]) -> Path:
    path.write_text(prompts_jsonl(prompts))
    return path


def run(args: argparse.Namespace) -> int:
    mix = Mix(sampled_temperature=args.sampled_temperature, sampled_every=args.sampled_every,
              unstreamed_every=args.unstreamed_every)
    result = run_fleet([t.rstrip("/") for t in args.target], args.model, read_prompts(args.prompts),
                       args.max_tokens, args.seconds, args.work, rate=args.rate, clients=args.clients,
                       requests=args.requests, mix=mix, tokenizer=args.tokenizer, processes=args.processes,
                       rampup=args.rampup)
    if args.report:
        args.report.write_text(json.dumps({"wall": result.wall, "answers": [asdict(a) for a in result.answers]}))
    print(COUNTS_LINE.format(ok=result.ok, failed=result.failed), flush=True)
    return 0
