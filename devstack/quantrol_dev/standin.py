"""ENGINE STAND-IN, for tests and benchmarks: a small OpenAI-compatible server that imitates vLLM's OpenAI server.

It is NOT vLLM and no model runs here. It exists so the router can be tested and benchmarked over real HTTP in
milliseconds; the real-engine tier (vLLM CPU, see ARCHITECTURE.md) checks the same paths against the real thing.

What it imitates (shapes from vllm/entrypoints/openai/{completion,chat_completion}/protocol.py):
- POST /v1/completions and /v1/chat/completions, non-streamed and streamed (SSE `data: {...}` chunks, then
  `data: [DONE]`), `logprobs` (completions: CompletionLogProbs; chat: `logprobs: true` + `top_logprobs`), `echo`,
  `prompt_logprobs` (per prompt token: null first, then `{token_id: {logprob, rank, decoded_token}}`; refused with
  stream, as vLLM does), `return_token_ids` (`token_ids`, `prompt_token_ids`), `stream_options.include_usage`,
  prompts as text or token ids; GET /v1/models, /health, /metrics (a few `vllm:*` series).
- A deterministic toy language model with a real next-token distribution: after a context, its top-1 token (a
  hash of the last three tokens and the position) has probability 0.85, four runner-ups 0.03 each, and every other
  token shares the rest; so both arms agree on every distribution unless told otherwise. Greedy requests take the
  top-1, sampled ones (temperature > 0, or none given: vLLM's default is 1.0) draw from the distribution sharpened by
  the temperature. Log-probabilities are those of the raw distribution, as vLLM's default `raw_logprobs` mode
  returns them (top-k at generation with `logprobs`, top-k per prompt token with `prompt_logprobs`, keyed
  `token_id:<id>` with `return_tokens_as_token_ids`). `deviation` (0..1) swaps this engine's top-1 with its first
  runner-up at that share of positions (a quality drop the router must see, sampled or greedy); with
  `deviation_when` set to a word, only in requests whose prompt holds that word (one slice damaged).
- A batch budget like vLLM's `--max-num-seqs`: at most `max_num_seqs` requests run at once (0: no limit), the rest
  wait in the engine (`vllm:num_requests_waiting`, `vllm:request_queue_time_seconds`); `vllm:kv_cache_usage_perc`
  follows the running share of the budget, and a request that waited past `preempt_after_s` counts one
  `vllm:num_preemptions` (a stand-in for KV-cache pressure, which this toy does not have).
- Behaviour knobs (per-token latency, prefill latency, error rate, deviation, batch budget) are set at construction
  or at run time with POST /standin/behaviour, so one process can play a healthy arm, then a slow or broken one.

Run standalone (the benchmark does): `python -m quantrol_dev.standin --port 8001 [--token-latency 0.01]`;
it prints `READY <port>` on stdout once listening. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from quantrol_worker.fleet_mix import SLICE_HEADER

VOCAB_SIZE = 512
_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "zu", "he", "fo", "gi", "ba", "wu"]
# Pronounceable toy words, so a diff sample is readable by a human.
VOCAB = [_SYLLABLES[i % 16] + _SYLLABLES[(i // 16) % 16] + ("n" if i >= 256 else "") for i in range(VOCAB_SIZE)]
_WORD_IDS = {word: i for i, word in enumerate(VOCAB)}
TOP1_P, RUNNER_UP_P, RUNNER_UPS = 0.85, 0.03, 4  # the toy distribution; the rest is spread over the vocabulary
REST_P = (1.0 - TOP1_P - RUNNER_UP_P * RUNNER_UPS) / (VOCAB_SIZE - 1 - RUNNER_UPS)


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def tokenize(text: str) -> list[int]:
    """Whitespace words; vocabulary words keep their id, others get a stable id above the vocabulary."""
    return [_WORD_IDS.get(w, VOCAB_SIZE + _h("w", w) % 1_000_000) for w in text.split()]


def token_text(token: int) -> str:
    return " " + (VOCAB[token] if 0 <= token < VOCAB_SIZE else f"<{token}>")


def reference_next(context: list[int]) -> int:
    return _h("next", tuple(context[-3:]), len(context)) % VOCAB_SIZE


def reference_ranking(context: list[int]) -> list[int]:
    """The reference model's top-1 and runner-ups after `context`, most likely first (distinct tokens)."""
    top = reference_next(context)
    offset = _h("alt", tuple(context[-3:]), len(context)) % 97
    return [top, *((top + 1 + offset + 37 * i) % VOCAB_SIZE for i in range(RUNNER_UPS))]


@dataclass
class Behaviour:
    model: str = "standin"
    token_latency_s: float = 0.0
    prefill_latency_s: float = 0.0
    error_rate: float = 0.0  # share of generation requests answered 500 (deterministic spacing)
    deviation: float = 0.0  # share of positions where this engine's top-1 differs from the reference
    deviation_when: str = ""  # a prompt word: deviate only in requests whose prompt holds it ("": every request)
    seed: int = 1
    max_num_seqs: int = 0  # requests running at once, like vLLM's --max-num-seqs (0: no limit)
    preempt_after_s: float = 1.0  # a request that waited longer counts one preemption


@dataclass
class Stats:
    requests: dict[str, int] = field(default_factory=dict)
    prompt_logprob_requests: int = 0
    streamed: int = 0  # generation requests asked with stream: true
    sampled: int = 0  # generation requests with a temperature above 0 (vLLM's default, 1.0, when none is given)
    slices: dict[str, int] = field(default_factory=dict)  # "<slice header's value>|<prompt>": requests
    token_id_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    waiting: int = 0


class EngineStandin:
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self._error_credit = 0.0
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.m_running = Gauge("vllm:num_requests_running", "Running", labels, registry=self.registry)
        self.m_waiting = Gauge("vllm:num_requests_waiting", "Waiting", labels, registry=self.registry)
        self.m_ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT", labels, registry=self.registry)
        self.m_e2e = Histogram("vllm:e2e_request_latency_seconds", "E2E", labels, registry=self.registry)
        self.m_itl = Histogram("vllm:inter_token_latency_seconds", "ITL", labels, registry=self.registry)
        self.m_success = Counter("vllm:request_success", "Finished", [*labels, "finished_reason"],
                                 registry=self.registry)
        self.m_gen = Counter("vllm:generation_tokens", "Generated tokens", labels, registry=self.registry)
        self.m_prompt = Counter("vllm:prompt_tokens", "Prompt tokens", labels, registry=self.registry)
        self.m_queue = Histogram("vllm:request_queue_time_seconds", "Queue time", labels, registry=self.registry)
        self.m_kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (0-1)", labels, registry=self.registry)
        self.m_preemptions = Counter("vllm:num_preemptions", "Preemptions", labels, registry=self.registry)
        self._slots = asyncio.Condition()
        # vLLM exports its per-model series from the start (zeros included): an SLO on preemptions has a value
        # before the first preemption.
        model = self.behaviour.model
        for metric in (self.m_running, self.m_waiting, self.m_kv, self.m_preemptions, self.m_queue):
            metric.labels(model)

    # ---- the toy model ---------------------------------------------------------------------------------------

    def _deviates(self, context: list[int]) -> bool:
        b = self.behaviour
        if b.deviation <= 0 or (b.deviation_when and tokenize(b.deviation_when)[0] not in context):
            return False
        return _h("dev", b.seed, tuple(context[-3:]), len(context)) / 2**64 < b.deviation

    def ranking(self, context: list[int]) -> list[int]:
        """This engine's top-1 and runner-ups after `context`: the reference's, or with the first two swapped."""
        ranked = reference_ranking(context)
        if self._deviates(context):
            ranked[0], ranked[1] = ranked[1], ranked[0]
        return ranked

    def next_token(self, context: list[int]) -> int:
        return self.ranking(context)[0]

    def logprob(self, context: list[int], token: int) -> tuple[float, int, int]:
        """(raw log-prob of token, its rank, this engine's top-1) after context."""
        ranked = self.ranking(context)
        if token in ranked:
            rank = ranked.index(token) + 1
            return math.log(TOP1_P if rank == 1 else RUNNER_UP_P), rank, ranked[0]
        return math.log(REST_P), RUNNER_UPS + 2, ranked[0]

    def top_k(self, context: list[int], k: int) -> list[tuple[int, float]]:
        ranked = self.ranking(context)[:k]
        return [(t, math.log(TOP1_P if i == 0 else RUNNER_UP_P)) for i, t in enumerate(ranked)]

    def sample(self, context: list[int], temperature: float, rng: random.Random) -> int:
        """A draw from the distribution sharpened by `temperature` (the rest stays one bucket, then uniform)."""
        ranked = self.ranking(context)
        weights = [p ** (1 / temperature) for p in (TOP1_P, *([RUNNER_UP_P] * RUNNER_UPS))]
        rest = (VOCAB_SIZE - len(ranked)) * REST_P ** (1 / temperature)
        pick = rng.random() * (sum(weights) + rest)
        for token, weight in zip(ranked, weights, strict=True):
            if pick < weight:
                return token
            pick -= weight
        while True:
            token = rng.randrange(VOCAB_SIZE)
            if token not in ranked:
                return token

    def generate(self, prompt: list[int], max_tokens: int, temperature: float, seed: int | None) -> list[int]:
        rng = random.Random(seed)
        context, out = list(prompt), []
        for _ in range(max_tokens):
            token = self.next_token(context) if temperature == 0 else self.sample(context, temperature, rng)
            out.append(token)
            context.append(token)
        return out

    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's shape: null for the first prompt token, then the prompt token and the top k, by token id."""
        entries: list[dict[str, dict[str, Any]] | None] = [None]
        for j in range(1, len(ids)):
            value, rank, _ = self.logprob(ids[:j], ids[j])
            entry = {str(ids[j]): {"logprob": value, "rank": rank, "decoded_token": token_text(ids[j])}}
            for top_rank, (token, top_value) in enumerate(self.top_k(ids[:j], k), start=1):
                entry.setdefault(str(token), {"logprob": top_value, "rank": top_rank,
                                              "decoded_token": token_text(token)})
            entries.append(entry)
        return entries

    # ---- HTTP ------------------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle_generate)
        app.router.add_post("/v1/chat/completions", self.handle_generate)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_post("/standin/behaviour", self.handle_behaviour)
        app.router.add_get("/standin/stats", self.handle_stats)
        return app

    async def handle_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.behaviour.model, "object": "model", "owned_by": "vllm", "max_model_len": 4096}]})

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def handle_behaviour(self, request: web.Request) -> web.Response:
        update = await request.json()
        self.behaviour = Behaviour(**{**asdict(self.behaviour), **update})
        return web.json_response(asdict(self.behaviour))

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.stats))

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        path = request.path
        st = self.stats
        st.requests[path] = st.requests.get(path, 0) + 1
        st.prompt_logprob_requests += body.get("prompt_logprobs") is not None
        st.token_id_requests += bool(body.get("return_token_ids"))
        st.streamed += bool(body.get("stream"))
        st.sampled += float(body.get("temperature", 1.0) or 0.0) > 0
        if SLICE_HEADER in request.headers and isinstance(body.get("prompt"), str):
            key = f"{request.headers[SLICE_HEADER]}|{body['prompt']}"
            st.slices[key] = st.slices.get(key, 0) + 1
        self._error_credit += self.behaviour.error_rate
        if self._error_credit >= 1.0:
            self._error_credit -= 1.0
            return web.json_response({"error": {"message": "injected stand-in error", "type": "InternalServerError",
                                                "code": 500}}, status=500)
        if body.get("stream") and body.get("prompt_logprobs") is not None:
            return web.json_response({"error": {"message": "`prompt_logprobs` are not available when `stream=True`.",
                                                "type": "BadRequestError", "code": 400}}, status=400)
        await self._admit()
        try:
            return await self._generate(request, body, chat=path.endswith("chat/completions"))
        finally:
            async with self._slots:
                st.in_flight -= 1
                self._gauges()
                self._slots.notify()

    async def _admit(self) -> None:
        """Wait for a place in the batch budget (max_num_seqs), as vLLM's scheduler keeps a request waiting."""
        began = time.perf_counter()
        model, st = self.behaviour.model, self.stats
        async with self._slots:
            st.waiting += 1
            self._gauges()
            try:
                await self._slots.wait_for(lambda: not self.behaviour.max_num_seqs
                                           or st.in_flight < self.behaviour.max_num_seqs)
            finally:
                st.waiting -= 1
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            self._gauges()
        waited = time.perf_counter() - began
        self.m_queue.labels(model).observe(waited)
        if waited > self.behaviour.preempt_after_s:
            self.m_preemptions.labels(model).inc()

    def _gauges(self) -> None:
        model, budget = self.behaviour.model, self.behaviour.max_num_seqs
        self.m_running.labels(model).set(self.stats.in_flight)
        self.m_waiting.labels(model).set(self.stats.waiting)
        self.m_kv.labels(model).set(min(1.0, self.stats.in_flight / budget) if budget else 0.0)

    async def _generate(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        b = self.behaviour
        started = time.perf_counter()
        if chat:
            prompt_text = "".join(f" <|{m.get('role')}|> {m.get('content', '')}" for m in body.get("messages", []))
            prompt_ids = tokenize(prompt_text + " <|assistant|>")
        else:
            prompt = body.get("prompt", "")
            prompt_ids = list(prompt) if isinstance(prompt, list) else tokenize(str(prompt))
            prompt_text = prompt if isinstance(prompt, str) else "".join(token_text(t) for t in prompt_ids)
        max_tokens = int(body.get("max_tokens") or (body.get("max_completion_tokens") or 16))
        # vLLM's default temperature is 1.0 (no generation config here); top_k 1 is greedy too.
        temperature = 0.0 if body.get("top_k") == 1 else float(body.get("temperature", 1.0))
        out = self.generate(prompt_ids, max_tokens, temperature, body.get("seed"))
        ask = _Ask.of(body, chat)
        prompt_lp = self.prompt_logprobs(prompt_ids, int(body["prompt_logprobs"])) \
            if body.get("prompt_logprobs") is not None else None
        echo = bool(body.get("echo")) and not chat
        self.m_prompt.labels(b.model).inc(len(prompt_ids))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out),
                 "total_tokens": len(prompt_ids) + len(out)}
        if b.prefill_latency_s:
            await asyncio.sleep(b.prefill_latency_s)
        if body.get("stream"):
            response = await self._stream(request, body, chat, rid, prompt_ids, out, ask, usage, started)
        else:
            if b.token_latency_s:
                await asyncio.sleep(b.token_latency_s * len(out))
            response = self._whole(chat, rid, prompt_ids, prompt_text, out, ask, prompt_lp, echo, usage)
        elapsed = time.perf_counter() - started
        self.m_e2e.labels(b.model).observe(elapsed)
        self.m_gen.labels(b.model).inc(len(out))
        self.m_success.labels(b.model, "length").inc()
        return response

    def _logprobs_for(self, context: list[int], tokens: list[int], chat: bool, ask: _Ask, offset: int = 0) -> Any:
        """vLLM's logprobs objects: completions take the top k plus the emitted token (k + 1 entries), chat the
        first k of the emitted token and the top k."""
        ctx = list(context)
        name = ask.name
        if chat:
            content = []
            for t in tokens:
                value = self.logprob(ctx, t)[0]
                listed = [(t, value), *((u, v) for u, v in self.top_k(ctx, ask.top_k) if u != t)][:ask.top_k]
                tops = [{"token": name(u), "logprob": v, "bytes": None} for u, v in listed]
                content.append({"token": name(t), "logprob": value, "bytes": None, "top_logprobs": tops})
                ctx.append(t)
            return {"content": content}
        result: dict[str, list[Any]] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for t in tokens:
            value = self.logprob(ctx, t)[0]
            result["tokens"].append(name(t))
            result["token_logprobs"].append(value)
            result["text_offset"].append(offset)
            result["top_logprobs"].append({name(t): value, **{name(u): v for u, v in self.top_k(ctx, ask.top_k)}})
            offset += len(token_text(t))
            ctx.append(t)
        return result

    def _whole(self, chat: bool, rid: str, prompt_ids: list[int], prompt_text: str, out: list[int], ask: _Ask,
               prompt_lp: Any, echo: bool, usage: dict[str, int]) -> web.Response:
        text = "".join(token_text(t) for t in out)
        model, created = self.behaviour.model, int(time.time())
        want_ids = ask.token_ids
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": self._logprobs_for(prompt_ids, out, True, ask) if ask.logprobs
                                      else None,
                                      "finish_reason": "length", "stop_reason": None,
                                      "token_ids": out if want_ids else None}
            payload = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                       "choices": [choice], "usage": usage, "prompt_logprobs": prompt_lp,
                       "prompt_token_ids": prompt_ids if want_ids else None}
            return web.json_response(payload)
        logprobs = None
        if ask.logprobs:
            logprobs = self._logprobs_for(prompt_ids, out, False, ask)
            if echo:  # echo with logprobs: the prompt's tokens first, the first one without a log-prob
                head = self._logprobs_for([], prompt_ids, False, ask)
                head["token_logprobs"][0] = None
                logprobs = {k: head[k] + logprobs[k] for k in logprobs}
        choice = {"index": 0, "text": (prompt_text if echo else "") + text, "logprobs": logprobs,
                  "finish_reason": "length", "stop_reason": None, "prompt_logprobs": prompt_lp,
                  "prompt_token_ids": prompt_ids if want_ids else None, "token_ids": out if want_ids else None}
        return web.json_response({"id": rid, "object": "text_completion", "created": created, "model": model,
                                  "choices": [choice], "usage": usage})

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool, rid: str, prompt_ids: list[int],
                      out: list[int], ask: _Ask, usage: dict[str, int], started: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        model, created = self.behaviour.model, int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        if chat:  # vLLM opens a chat stream with the role
            first = {"prompt_token_ids": prompt_ids} if ask.token_ids else {}
            await response.write(event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], **first))
        context = list(prompt_ids)
        last = time.perf_counter()
        offset = 0  # text offsets run on across chunks, as vLLM's do (initial_text_offset)
        for i, token in enumerate(out):
            if self.behaviour.token_latency_s:
                await asyncio.sleep(self.behaviour.token_latency_s)
            now = time.perf_counter()
            if i == 0:
                self.m_ttft.labels(model).observe(now - started)
            else:
                self.m_itl.labels(model).observe(now - last)
            last = now
            finish = "length" if i == len(out) - 1 else None
            lp = self._logprobs_for(context, [token], chat, ask, offset) if ask.logprobs else None
            offset += len(token_text(token))
            choice: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": token_text(token)}
            else:
                choice["text"] = token_text(token)
                if ask.token_ids and i == 0:
                    choice["prompt_token_ids"] = prompt_ids
            if ask.token_ids:
                choice["token_ids"] = [token]
            context.append(token)
            await response.write(event([choice]))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await response.write(event([], usage=usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass(frozen=True)
class _Ask:
    """What a request asked to get back besides the text."""

    token_ids: bool
    logprobs: bool
    top_k: int
    as_ids: bool  # return_tokens_as_token_ids: tokens as `token_id:<id>`

    @classmethod
    def of(cls, body: dict[str, Any], chat: bool) -> _Ask:
        want = body.get("logprobs")
        return cls(token_ids=bool(body.get("return_token_ids")),
                   logprobs=bool(want) if chat else want is not None,
                   top_k=int(body.get("top_logprobs") or 0) if chat else int(want or 0),
                   as_ids=bool(body.get("return_tokens_as_token_ids")))

    def name(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else token_text(token)


async def start_standin(engine: EngineStandin, port: int = 0) -> tuple[web.AppRunner, int]:
    """Start on 127.0.0.1 (port 0: any free port); returns the runner (call .cleanup()) and the port."""
    runner = web.AppRunner(engine.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1])


@contextlib.contextmanager
def standin_process(model: str = "standin", **behaviour: float) -> Iterator[str]:
    """A stand-in in a process of its own (`--token-latency` etc. from `behaviour`), for clients that run in other
    processes, as GuideLLM's do; yields its base URL and stops it afterwards."""
    args = [sys.executable, "-m", "quantrol_dev.standin", "--port", "0", "--model", model]
    for key, value in behaviour.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        if ready[:1] != ["READY"]:
            raise RuntimeError(f"the engine stand-in did not start: {ready}")
        yield f"http://127.0.0.1:{ready[1]}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _main(args: argparse.Namespace) -> None:
    engine = EngineStandin(Behaviour(model=args.model, token_latency_s=args.token_latency,
                                     prefill_latency_s=args.prefill_latency, deviation=args.deviation,
                                     max_num_seqs=args.max_num_seqs))
    runner, port = await start_standin(engine, args.port)
    print(f"READY {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="OpenAI-compatible engine stand-in for tests (not vLLM)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="standin")
    parser.add_argument("--token-latency", type=float, default=0.0)
    parser.add_argument("--prefill-latency", type=float, default=0.0)
    parser.add_argument("--deviation", type=float, default=0.0)
    parser.add_argument("--max-num-seqs", type=int, default=0)
    try:
        asyncio.run(_main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
