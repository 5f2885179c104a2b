"""ENGINE STAND-IN, for tests and benchmarks: a small OpenAI-compatible server that imitates vLLM's OpenAI server.

It is NOT vLLM and no model runs here. It exists so the router can be tested and benchmarked over real HTTP in
milliseconds; the real-engine tier (vLLM CPU, see ARCHITECTURE.md) checks the same paths against the real thing.

What it imitates (shapes from vllm/entrypoints/openai/{completion,chat_completion}/protocol.py):
- POST /v1/completions and /v1/chat/completions, non-streamed and streamed (SSE `data: {...}` chunks, then
  `data: [DONE]`), `logprobs` (completions: CompletionLogProbs; chat: `logprobs: true` + `top_logprobs`), `echo`,
  `prompt_logprobs` (per prompt token: null first, then `{token_id: {logprob, rank, decoded_token}}`; refused with
  stream, as vLLM does), `return_token_ids` (`token_ids`, `prompt_token_ids`), `stream_options.include_usage`,
  prompts as text or token ids; GET /v1/models, /health, /metrics (a few `vllm:*` series).
- A deterministic toy language model: the greedy next token is a hash of the last three tokens and the position,
  so both arms agree token for token unless told otherwise. `deviation` (0..1) makes this engine pick another
  token at that share of positions (a quality drop the router must see); its log-probabilities follow its own
  choices, so teacher forcing on the other arm's tokens shows the drop too.
- Behaviour knobs (per-token latency, prefill latency, error rate, deviation) are set at construction or at run
  time with POST /standin/behaviour, so one process can play a healthy arm, then a slow or broken one.

Run standalone (the benchmark does): `python -m quantrol_dev.standin --port 8001 [--token-latency 0.01]`;
it prints `READY <port>` on stdout once listening. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

VOCAB_SIZE = 512
_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "zu", "he", "fo", "gi", "ba", "wu"]
# Pronounceable toy words, so a diff sample is readable by a human.
VOCAB = [_SYLLABLES[i % 16] + _SYLLABLES[(i // 16) % 16] + ("n" if i >= 256 else "") for i in range(VOCAB_SIZE)]
_WORD_IDS = {word: i for i, word in enumerate(VOCAB)}
GOOD_LOGPROB = -0.05  # the engine's own greedy choice
OTHER_LOGPROB = -4.0  # any other token


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def tokenize(text: str) -> list[int]:
    """Whitespace words; vocabulary words keep their id, others get a stable id above the vocabulary."""
    return [_WORD_IDS.get(w, VOCAB_SIZE + _h("w", w) % 1_000_000) for w in text.split()]


def token_text(token: int) -> str:
    return " " + (VOCAB[token] if 0 <= token < VOCAB_SIZE else f"<{token}>")


def reference_next(context: list[int]) -> int:
    return _h("next", tuple(context[-3:]), len(context)) % VOCAB_SIZE


@dataclass
class Behaviour:
    model: str = "standin"
    token_latency_s: float = 0.0
    prefill_latency_s: float = 0.0
    error_rate: float = 0.0  # share of generation requests answered 500 (deterministic spacing)
    deviation: float = 0.0  # share of positions where this engine's greedy token differs from the reference
    seed: int = 1


@dataclass
class Stats:
    requests: dict[str, int] = field(default_factory=dict)
    prompt_logprob_requests: int = 0
    token_id_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


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

    # ---- the toy model ---------------------------------------------------------------------------------------

    def next_token(self, context: list[int]) -> int:
        ref = reference_next(context)
        b = self.behaviour
        if b.deviation > 0 and _h("dev", b.seed, tuple(context[-3:]), len(context)) / 2**64 < b.deviation:
            return (ref + 1 + _h("alt", b.seed, len(context)) % (VOCAB_SIZE - 1)) % VOCAB_SIZE
        return ref

    def logprob(self, context: list[int], token: int) -> tuple[float, int, int]:
        """(log-prob of token, its rank, this engine's greedy token) after context."""
        best = self.next_token(context)
        return (GOOD_LOGPROB, 1, best) if token == best else (OTHER_LOGPROB, 2, best)

    def generate(self, prompt: list[int], max_tokens: int, greedy: bool, seed: int | None) -> list[int]:
        rng = random.Random(seed)
        context, out = list(prompt), []
        for _ in range(max_tokens):
            token = self.next_token(context) if greedy else rng.randrange(VOCAB_SIZE)
            out.append(token)
            context.append(token)
        return out

    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict[str, dict[str, Any]] | None]:
        entries: list[dict[str, dict[str, Any]] | None] = [None]
        for j in range(1, len(ids)):
            value, rank, best = self.logprob(ids[:j], ids[j])
            entry = {str(ids[j]): {"logprob": value, "rank": rank, "decoded_token": token_text(ids[j])}}
            if k > 0 and best != ids[j]:
                entry[str(best)] = {"logprob": GOOD_LOGPROB, "rank": 1, "decoded_token": token_text(best)}
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
        self._error_credit += self.behaviour.error_rate
        if self._error_credit >= 1.0:
            self._error_credit -= 1.0
            return web.json_response({"error": {"message": "injected stand-in error", "type": "InternalServerError",
                                                "code": 500}}, status=500)
        if body.get("stream") and body.get("prompt_logprobs") is not None:
            return web.json_response({"error": {"message": "`prompt_logprobs` are not available when `stream=True`.",
                                                "type": "BadRequestError", "code": 400}}, status=400)
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        self.m_running.labels(self.behaviour.model).inc()
        try:
            return await self._generate(request, body, chat=path.endswith("chat/completions"))
        finally:
            st.in_flight -= 1
            self.m_running.labels(self.behaviour.model).dec()

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
        temperature = body.get("temperature")
        greedy = temperature == 0 or body.get("top_k") == 1
        out = self.generate(prompt_ids, max_tokens, greedy, body.get("seed"))
        want_ids = bool(body.get("return_token_ids"))
        want_lp = body.get("logprobs")
        top_k = int(body.get("top_logprobs") or 0) if chat else int(want_lp or 0)
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
            response = await self._stream(request, body, chat, rid, prompt_ids, out, want_ids, want_lp, top_k,
                                          usage, started)
        else:
            if b.token_latency_s:
                await asyncio.sleep(b.token_latency_s * len(out))
            response = self._whole(body, chat, rid, prompt_ids, prompt_text, out, want_ids, want_lp, top_k,
                                   prompt_lp, echo, usage)
        elapsed = time.perf_counter() - started
        self.m_e2e.labels(b.model).observe(elapsed)
        self.m_gen.labels(b.model).inc(len(out))
        self.m_success.labels(b.model, "length").inc()
        return response

    def _logprobs_for(self, context: list[int], tokens: list[int], chat: bool, top_k: int) -> Any:
        ctx = list(context)
        if chat:
            content = []
            for t in tokens:
                value, _, best = self.logprob(ctx, t)
                tops = [{"token": token_text(best), "logprob": GOOD_LOGPROB, "bytes": None}] if top_k else []
                content.append({"token": token_text(t), "logprob": value, "bytes": None, "top_logprobs": tops})
                ctx.append(t)
            return {"content": content}
        result: dict[str, list[Any]] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        offset = 0
        for t in tokens:
            value, _, best = self.logprob(ctx, t)
            result["tokens"].append(token_text(t))
            result["token_logprobs"].append(value)
            result["text_offset"].append(offset)
            result["top_logprobs"].append({token_text(best): GOOD_LOGPROB, token_text(t): value} if top_k else None)
            offset += len(token_text(t))
            ctx.append(t)
        return result

    def _whole(self, body: dict[str, Any], chat: bool, rid: str, prompt_ids: list[int], prompt_text: str,
               out: list[int], want_ids: bool, want_lp: Any, top_k: int, prompt_lp: Any, echo: bool,
               usage: dict[str, int]) -> web.Response:
        text = "".join(token_text(t) for t in out)
        model, created = self.behaviour.model, int(time.time())
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": self._logprobs_for(prompt_ids, out, True, top_k) if want_lp else None,
                                      "finish_reason": "length", "stop_reason": None,
                                      "token_ids": out if want_ids else None}
            payload = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                       "choices": [choice], "usage": usage, "prompt_logprobs": prompt_lp,
                       "prompt_token_ids": prompt_ids if want_ids else None}
            return web.json_response(payload)
        logprobs = None
        if want_lp is not None:
            logprobs = self._logprobs_for(prompt_ids, out, False, top_k)
            if echo:  # echo with logprobs: the prompt's tokens first, the first one without a log-prob
                head = self._logprobs_for([], prompt_ids, False, top_k)
                head["token_logprobs"][0] = None
                logprobs = {k: head[k] + logprobs[k] for k in logprobs}
        choice = {"index": 0, "text": (prompt_text if echo else "") + text, "logprobs": logprobs,
                  "finish_reason": "length", "stop_reason": None, "prompt_logprobs": prompt_lp,
                  "prompt_token_ids": prompt_ids if want_ids else None, "token_ids": out if want_ids else None}
        return web.json_response({"id": rid, "object": "text_completion", "created": created, "model": model,
                                  "choices": [choice], "usage": usage})

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool, rid: str, prompt_ids: list[int],
                      out: list[int], want_ids: bool, want_lp: Any, top_k: int, usage: dict[str, int],
                      started: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        model, created = self.behaviour.model, int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        if chat:  # vLLM opens a chat stream with the role
            first = {"prompt_token_ids": prompt_ids} if want_ids else {}
            await response.write(event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], **first))
        context = list(prompt_ids)
        last = time.perf_counter()
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
            lp = self._logprobs_for(context, [token], chat, top_k) if want_lp else None
            choice: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": token_text(token)}
            else:
                choice["text"] = token_text(token)
                if want_ids and i == 0:
                    choice["prompt_token_ids"] = prompt_ids
            if want_ids:
                choice["token_ids"] = [token]
            context.append(token)
            await response.write(event([choice]))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await response.write(event([], usage=usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


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


async def _main(args: argparse.Namespace) -> None:
    engine = EngineStandin(Behaviour(model=args.model, token_latency_s=args.token_latency,
                                     prefill_latency_s=args.prefill_latency, deviation=args.deviation))
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
    try:
        asyncio.run(_main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
