"""The router's aiohttp server: thin glue around the pure parts (split, admission, protocol, compare).

Request path: read body → choose arm (weights, optional sticky key) → admission (slot or bounded queue, else 429)
→ forward to the arm, streaming bytes through as they arrive → metrics. For a mirrored stable request, the stable
arm is also asked for token ids and its top-k log-probabilities (stripped from the client's answer), and a
background task sends the same body to the candidate (never waited on by the client, bounded in number, no queue
place), then has the candidate score the stable arm's answer teacher-forced and compares the two distributions
(compare.py), sampled or greedy alike.

Config changes replace one reference (`self.config`); each request reads it once at arrival and keeps that
snapshot, so a reload never drops or re-routes a request in flight, and the one shared client session (not one
per arm) means a changed upstream URL does not close connections under running streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from quantrol_worker.addresses import Addresses, ClusterAddresses, from_environment
from quantrol_worker.router import compare, probes, protocol
from quantrol_worker.router.admission import ArmGate, Rejected
from quantrol_worker.router.config import (
    ARMS,
    MAX_VERSION_STEP,
    ApplyDecision,
    ArmName,
    ProbeConfig,
    RouterConfig,
    apply_decision,
    arm_outside,
    load_config,
    parse_config,
)
from quantrol_worker.router.metrics import RouterMetrics
from quantrol_worker.router.split import choose_arm, should_mirror, sticky_point

log = logging.getLogger("quantrol.router")

# Hop-by-hop and length headers are the proxy's own business (RFC 9110 §7.6.1); everything else passes through.
_HOP_HEADERS = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
              "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Accept-Encoding")
)
ADMIN_TOKEN_ENV = "QUANTROL_ROUTER_ADMIN_TOKEN"
MAX_PROBES_IN_FLIGHT = 2  # probes never crowd the arms: at most this many at once, whatever the rate
PROBE_LOAD_TIMEOUT_S = 120.0  # reading the prompts (an artifact pull of one file)
PROBE_RETRY_S = 30.0  # after a failed read
MAX_ADMIN_BODY = 1 << 20  # a router config is a few KiB; generation bodies are bounded by the config (handle_generate)


class _RateLimitedLog:
    """One line per (arm, kind) per interval, with the count of what was suppressed: an arm that fails every
    request must not bury the one line an operator needs under thousands of identical ones."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warning(self, arm: str, kind: str, message: str, *args: object) -> None:
        key = (arm, kind)
        now = time.monotonic()
        last, suppressed = self._last.get(key, (0.0, 0))
        if now - last < self.interval_s:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        suffix = f" ({suppressed} similar suppressed in the last {self.interval_s:.0f}s)" if suppressed else ""
        log.warning(message + suffix, *args)


class AdminToken:
    """The admin bearer token, from a file (a mounted Secret, re-read when it changes) or the environment."""

    def __init__(self, path: Path | None, value: str | None = None) -> None:
        self.path = path
        self._value = value.strip() if value else None
        self._mtime: float | None = None

    def current(self) -> str | None:
        if self.path is not None:
            try:
                mtime = self.path.stat().st_mtime
                if mtime != self._mtime:
                    self._value = self.path.read_text(encoding="utf-8").strip() or None
                    self._mtime = mtime
            except OSError as exc:
                log.error("admin token file %s unreadable (%s): admin endpoints refuse every request", self.path, exc)
                return None
        return self._value

    def check(self, request: web.Request) -> web.Response | None:
        """None when authorised; else the 401/403 response to send."""
        token = self.current()
        if not token:
            return _json(403, {"error": "admin token not configured (--admin-token-file or " + ADMIN_TOKEN_ENV + ")"})
        header = request.headers.get("Authorization", "")
        offered = header[7:].strip() if header.lower().startswith("bearer ") else ""
        # Constant-time: the comparison must not leak how many leading characters were right.
        if not hmac.compare_digest(offered.encode(), token.encode()):
            return _json(401, {"error": "missing or wrong bearer token"}, headers={"WWW-Authenticate": "Bearer"})
        return None


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json", headers=headers)


@dataclass
class _Timing:
    """Per-request latency bookkeeping, from arrival at the router."""

    arrived: float
    first_token: float | None = None
    last_token: float | None = None
    gaps: list[tuple[float, int]] = field(default_factory=list)

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.gaps.append(((now - self.last_token) / count, count))
        self.last_token = now


@dataclass
class _Result:
    """What one upstream exchange produced (for metrics, mirroring and the probe)."""

    status: int
    output: protocol.Output
    complete: bool  # the whole answer arrived (no error, no interruption)
    body: dict[str, Any] | None = None  # the parsed non-streamed body


class Router:
    def __init__(
        self,
        config: RouterConfig,
        *,
        config_path: Path | None = None,
        admin_token: AdminToken | None = None,
        metrics: RouterMetrics | None = None,
        reload_interval_s: float = 1.0,
        seed: int | None = None,
        addresses: Addresses | None = None,
        namespace: str | None = None,
    ) -> None:
        self.config = config
        self.namespace = namespace  # the policy's: pushed arm URLs must be its Services (None: not checked)
        self.addresses = addresses or ClusterAddresses()
        self.config_path = config_path
        self.admin_token = admin_token or AdminToken(None, None)
        self.metrics = metrics or RouterMetrics()
        self.reload_interval_s = reload_interval_s
        self.gates: dict[ArmName, ArmGate] = {
            arm: ArmGate(config.arms[arm].admission if arm in config.arms else config.arms["stable"].admission)
            for arm in ARMS
        }
        self.diffs = compare.DiffStore(config.diffs.capacity)
        self.patterns = compare.compile_patterns(config.diffs.redact_patterns)
        self.random = random.Random(seed)
        self.session: aiohttp.ClientSession | None = None
        self.mirrors_in_flight = 0
        self.probes_in_flight = 0
        self.probe_prompts: probes.ProbePrompts | None = None
        self._probe_source: tuple[str | None, bool, str | None, str | None] | None = None
        self._probe_retry_at = 0.0
        self._served_model: dict[str, str | None] = {}  # stable arm URL → the model name it serves
        self._background: set[asyncio.Task[None]] = set()
        self._errors = _RateLimitedLog()
        self._file_state: tuple[float, int] | None = None
        for arm, gate in self.gates.items():
            # Read at scrape time: the queue length is a state, not something to update on every change.
            self.metrics.queued.labels(arm).set_function(_waiting_of(gate))
        self._publish_config()

    # ---- configuration -------------------------------------------------------------------------------------

    def offer(self, config: RouterConfig, source: str) -> ApplyDecision:
        # The file is the operator's ConfigMap; a push comes from whoever holds the token: bounded (see config.py).
        decision = apply_decision(self.config, config, MAX_VERSION_STEP if source == "admin" else None)
        self.metrics.config_updates.labels(source, decision).inc()
        if decision == "apply":
            old = self.config
            self.config = config
            for arm in ARMS:
                if arm in config.arms:
                    self.gates[arm].set_limits(config.arms[arm].admission)
            self.patterns = compare.compile_patterns(config.diffs.redact_patterns)
            self.diffs.resize(config.diffs.capacity)
            if not config.diffs.enabled or "candidate" not in config.arms:
                # Turning diffs off, or the candidate leaving (a rollback), forgets the user data already held.
                self.diffs.clear()
            self._publish_config()
            log.info(
                "config v%d applied from %s (was v%d): weights %s, mirror %.3f",
                config.version, source, old.version, config.weights(), config.mirror_fraction,
            )
        elif decision == "conflict":
            log.warning(
                "config v%d from %s differs from the applied v%d with the same version; keeping the applied one "
                "(two writers disagree: bump the version to change it)", config.version, source, self.config.version,
            )
        elif decision == "jump":
            log.warning("config v%d from %s is more than %d versions past the applied v%d: refused (not the "
                        "operator's sequence; a later push would otherwise look stale)", config.version, source,
                        MAX_VERSION_STEP, self.config.version)
        elif decision == "stale":
            log.info("config v%d from %s is older than the applied v%d; ignored", config.version, source,
                     self.config.version)
        return decision

    def _publish_config(self) -> None:
        for arm, weight in self.config.weights().items():
            self.metrics.weight.labels(arm).set(weight)
        self.metrics.mirror_fraction.set(self.config.mirror_fraction)
        self.metrics.config_version.set(self.config.version)

    def reload_file(self, force: bool = False) -> None:
        """Re-read the config file when its mtime or size changed (or when forced, on SIGHUP)."""
        if self.config_path is None:
            return
        try:
            stat = self.config_path.stat()
            state = (stat.st_mtime, stat.st_size)
            if state == self._file_state and not force:
                return
            self._file_state = state
            config = load_config(self.config_path)
        except (OSError, ValueError) as exc:
            self.metrics.config_updates.labels("file", "invalid").inc()
            log.error("config file %s not applied, still serving v%d: %s", self.config_path, self.config.version, exc)
            return
        self.offer(config, "file")

    async def _watch_file(self) -> None:
        # Polling, not inotify: a ConfigMap volume updates by swapping a symlink, which inotify watches on the
        # file itself miss; a stat per second is nothing.
        while True:
            await asyncio.sleep(self.reload_interval_s)
            self.reload_file()

    # ---- app -----------------------------------------------------------------------------------------------

    def make_app(self, admin: bool = True) -> web.Application:
        """The inference app (and, unless `admin` is False, the admin API in it: tests and a single-port router).
        Request bodies are read by handle_generate itself, after admission and within the config's bound."""
        app = web.Application(client_max_size=MAX_ADMIN_BODY)
        app.router.add_post(protocol.COMPLETIONS, self.handle_generate)
        app.router.add_post(protocol.CHAT, self.handle_generate)
        app.router.add_get("/v1/models", self.handle_passthrough)
        app.router.add_get("/health", self.handle_passthrough)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/metrics", self.handle_metrics)
        if admin:
            self._add_admin_routes(app)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def make_admin_app(self) -> web.Application:
        """The admin API alone, for its own port: the policy's Service exposes only the inference port, and the
        chart's NetworkPolicy lets only the operator reach this one."""
        app = web.Application(client_max_size=MAX_ADMIN_BODY)
        app.router.add_get("/healthz", self.handle_healthz)
        self._add_admin_routes(app)
        return app

    def _add_admin_routes(self, app: web.Application) -> None:
        app.router.add_get("/quantrol/config", self.handle_get_config)
        app.router.add_post("/quantrol/config", self.handle_post_config)
        app.router.add_get("/quantrol/diffs", self.handle_diffs)

    async def _on_startup(self, app: web.Application) -> None:
        # No connection limit: admission bounds concurrency per arm; a pool limit here would add a second,
        # invisible queue. Generous keep-alive so the per-request cost is a pooled connection.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=30)
        # No cookie jar: a proxy's session is shared by every client, so a cookie one upstream answer set must
        # never ride along on other clients' requests (their own Cookie headers pass through untouched).
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             cookie_jar=aiohttp.DummyCookieJar())
        self._spawn(self._probe_loop())
        if self.config_path is not None:
            self.reload_file()
            self._spawn(self._watch_file())
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: re-reading %s", self.config_path)
        self.reload_file(force=True)

    async def _on_shutdown(self, app: web.Application) -> None:
        for task in list(self._background):
            task.cancel()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    def _spawn(self, coro: Any) -> None:
        # Keep a reference: the event loop holds only weak ones, and a collected task would vanish mid-mirror.
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- small endpoints -----------------------------------------------------------------------------------

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok", "config_version": self.config.version})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_passthrough(self, request: web.Request) -> web.Response:
        """/v1/models and /health answer from the stable arm: it is what serves when anything is in doubt."""
        assert self.session is not None
        url = self.addresses.url(self.config.arms["stable"].url) + request.path_qs
        try:
            async with self.session.get(url, headers=_forward_headers(request.headers),
                                        timeout=aiohttp.ClientTimeout(total=10)) as upstream:
                body = await upstream.read()
                return web.Response(status=upstream.status, body=body,
                                    headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")})
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._errors.warning("stable", "passthrough", "GET %s on the stable arm failed: %r", url, exc)
            return web.Response(status=503, body=protocol.error_body(f"stable arm unreachable: {exc!r}",
                                                                     "upstream_connect", 503),
                                content_type="application/json")

    async def handle_get_config(self, request: web.Request) -> web.Response:
        denied = self.admin_token.check(request)
        if denied is not None:
            return denied
        return _json(200, {"version": self.config.version, "config": self.config.model_dump(mode="json")})

    async def handle_post_config(self, request: web.Request) -> web.Response:
        denied = self.admin_token.check(request)
        if denied is not None:
            return denied
        try:
            config = parse_config(await request.text())
        except ValueError as exc:
            self.metrics.config_updates.labels("admin", "invalid").inc()
            log.error("admin config push rejected as invalid, still serving v%d: %s", self.config.version, exc)
            return _json(400, {"error": str(exc), "applied_version": self.config.version})
        foreign = arm_outside(config, self.namespace) if self.namespace else None
        if foreign is not None:
            self.metrics.config_updates.labels("admin", "refused").inc()
            log.warning("admin config push refused: arm %s is not a Service of namespace %s (%s); still serving v%d",
                        foreign, self.namespace, config.arms[foreign].url, self.config.version)
            return _json(403, {"error": f"arms.{foreign}.url must be a Service of namespace {self.namespace}",
                               "applied_version": self.config.version})
        decision = self.offer(config, "admin")
        status = 200 if decision in ("apply", "unchanged") else 409
        return _json(status, {"result": decision, "applied_version": self.config.version})

    async def handle_diffs(self, request: web.Request) -> web.Response:
        if not self.config.diffs.enabled:
            return _json(404, {"error": "diffs are disabled (config diffs.enabled: false)"})
        denied = self.admin_token.check(request)
        if denied is not None:
            return denied
        oldest = compare.now() - self.config.diffs.retention_s  # samples are not kept past their retention
        kept = [s for s in self.diffs.items() if s.at >= oldest]
        if len(kept) != len(self.diffs.items()):
            self.diffs.clear()
            for sample in kept:
                self.diffs.add(sample)
        return _json(200, {"samples": [s.to_json() for s in kept]})

    # ---- the generation path -------------------------------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        """Admission before the body: the arm is chosen from the headers, a slot (or a bounded queue place) is taken,
        and only then is the body read, within the config's max_body_bytes; a client over either bound costs the
        router its headers, never a body held in memory."""
        arrived = time.perf_counter()
        config = self.config  # one snapshot for the whole request: reloads never change a request mid-way
        limit = config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
        sticky = request.headers.get(config.sticky_header) if config.sticky_header else None
        arm = choose_arm(config.weights(), sticky_point(sticky) if sticky else self.random.random())
        if arm not in config.arms:
            arm = "stable"
        gate = self.gates[arm]
        try:
            waited = await gate.acquire(may_wait=True)
        except Rejected as rejected:
            return self._rejected(arm, rejected, protocol.slice_label(
                request.headers.get(config.slices.header), config.slices.allowed, 0, config.slices.length_buckets))
        held = time.perf_counter()
        try:
            return await self._admitted(request, config, arm, waited, arrived)
        finally:
            gate.release(time.perf_counter() - held)

    async def _admitted(self, request: web.Request, config: RouterConfig, arm: ArmName, waited: float,
                        arrived: float) -> web.StreamResponse:
        raw = await _read_bounded(request, config.max_body_bytes)
        if raw is None:
            return _too_large(config.max_body_bytes)
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
        except ValueError as exc:
            return web.Response(status=400, body=protocol.error_body(f"invalid JSON body: {exc}",
                                                                     "invalid_request_error", 400),
                                content_type="application/json")
        path = request.path
        slice_ = protocol.slice_label(
            request.headers.get(config.slices.header), config.slices.allowed,
            protocol.prompt_chars(path, body), config.slices.length_buckets,
        )
        live_done: asyncio.Future[_Result | None] | None = None
        asked, strip = body, frozenset[str]()
        if should_mirror(arm, config.mirror_fraction, self.random.random()):
            if self.mirrors_in_flight < config.compare.max_concurrent_mirrors:
                live_done = asyncio.get_running_loop().create_future()
                # Ask stable for token ids and top-k log-probabilities too (generation is unchanged), and strip
                # them from what the client gets: comparison needs them, the client must get exactly its answer.
                asked, strip = protocol.comparison_body(body, path == protocol.CHAT, config.compare.top_logprobs)
                self.mirrors_in_flight += 1
                self._spawn(self._shadow(config, path, body, slice_, live_done))
            else:
                self.metrics.mirrored.labels("dropped_busy").inc()
        # A non-streamed client is served from a streamed upstream answer, assembled: so its time to first token
        # and inter-token latency exist like everybody's, and the latency SLOs judge every client.
        assemble = protocol.assemblable(body)
        if strip or assemble:
            raw = json.dumps(protocol.as_stream(asked) if assemble else asked).encode()

        result: _Result | None = None
        try:
            sink = _ClientSink(request, strip, protocol.Assembler(path == protocol.CHAT) if assemble else None)
            response, result = await self._live(request, config, arm, path, raw, slice_, arrived, sink, waited)
            return response
        finally:
            if live_done is not None and not live_done.done():
                live_done.set_result(result)

    def _rejected(self, arm: ArmName, rejected: Rejected, slice_: str) -> web.Response:
        gate = self.gates[arm]
        self.metrics.errors.labels(arm, "live", slice_, "admission_" + rejected.reason).inc()
        self.metrics.requests.labels(arm, "live", slice_, "429").inc()
        self._errors.warning(arm, rejected.reason, "arm %s over its admission bound (%s): answering 429, "
                             "in flight %d, queued %d", arm, rejected.reason, gate.in_flight, gate.waiting)
        return web.Response(
            status=429, headers={"Retry-After": str(rejected.retry_after)}, content_type="application/json",
            body=protocol.error_body(f"arm {arm} is at its admission bound ({rejected.reason}); retry later",
                                     "rate_limit_exceeded", 429),
        )

    async def _live(
        self, request: web.Request, config: RouterConfig, arm: ArmName, path: str, payload: bytes, slice_: str,
        arrived: float, sink: _ClientSink, waited: float,
    ) -> tuple[web.StreamResponse, _Result | None]:
        """The admitted live request (its slot is held by handle_generate): forward, stream back, record."""
        series = self.metrics.series(arm, "live", slice_)
        series.queue_wait.observe(waited)
        series.in_flight.inc()
        try:
            result = await self._exchange(config, arm, "live", path, payload, slice_, arrived, sink,
                                          _forward_headers(request.headers))
        finally:
            series.in_flight.dec()
        return sink.response(result), result

    async def _exchange(
        self, config: RouterConfig, arm: ArmName, traffic: str, path: str, payload: bytes, slice_: str,
        arrived: float, sink: _ClientSink | None, headers: dict[str, str],
    ) -> _Result:
        """One request to one arm, streamed through `sink` (the client) when there is one; records the metrics."""
        assert self.session is not None
        url = self.addresses.url(config.arms[arm].url) + path
        chat = path == protocol.CHAT
        output = protocol.Output()
        timing = _Timing(arrived)
        status, complete, kind, parsed = 0, False, None, None
        headers["Content-Type"] = "application/json"
        try:
            async with self.session.post(url, data=payload, headers=headers,
                                         timeout=_upstream_timeout(config.upstream_timeout_s)) as upstream:
                status = upstream.status
                content_type = upstream.headers.get("Content-Type", "application/json")
                if status != 200:
                    kind = "upstream_5xx" if status >= 500 else "upstream_4xx"
                    data = await upstream.read()
                    if sink is not None:
                        sink.set_body(status, data, content_type)
                    self._errors.warning(arm, kind, "arm %s answered %d to %s %s: %s", arm, status, traffic, path,
                                         data[:300])
                elif content_type.startswith("text/event-stream"):
                    complete = await self._relay_stream(upstream, sink, output, timing, chat)
                    kind = None if complete else "stream_interrupted"
                else:
                    data = await upstream.read()
                    parsed = protocol.loads(data)
                    output.feed(parsed, chat)
                    if sink is not None:
                        if sink.strip:
                            protocol.strip_added(parsed, sink.strip, streamed=False)
                            data = json.dumps(parsed).encode()
                        sink.set_body(status, data, content_type)
                    complete = True
        except TimeoutError:
            kind, status = "upstream_timeout", status or 504
        except _ClientGone:
            kind = "client_cancelled"
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            kind = "upstream_connect" if status == 0 else "stream_interrupted"
            status = status or 502
            self._errors.warning(arm, kind, "arm %s (%s) failed for %s %s: %r", arm, url, traffic, path, exc)
        if kind is not None and sink is not None and not sink.started and sink.body is None:
            sink.set_body(status, protocol.error_body(f"arm {arm} failed: {kind}", kind, status), "application/json")
        self._record(arm, traffic, slice_, status, kind, output, timing, config)
        return _Result(status=status, output=output, complete=complete, body=parsed)

    async def _relay_stream(
        self, upstream: aiohttp.ClientResponse, sink: _ClientSink | None, output: protocol.Output,
        timing: _Timing, chat: bool,
    ) -> bool:
        parser = protocol.SSEParser()
        done = False
        assembler = sink.assembler if sink is not None else None
        relay = sink if sink is not None and assembler is None else None  # a streamed client: bytes pass through
        if relay is not None:
            await relay.start(upstream.status, upstream.headers.get("Content-Type", "text/event-stream"))
        async for chunk in upstream.content.iter_any():
            if relay is not None and not relay.strip:
                await relay.write(chunk)  # bytes first, bookkeeping after: the client never waits for metrics
            rewritten: list[bytes] = []
            for data in parser.feed(chunk):
                if data == b"[DONE]":
                    done = True
                    rewritten.append(b"data: [DONE]\n\n")
                    continue
                obj = protocol.loads(data)
                timing.tokens(output.feed(obj, chat))
                if assembler is not None:
                    assembler.feed(obj)
                elif relay is not None and relay.strip:
                    protocol.strip_added(obj, relay.strip, streamed=True)
                    rewritten.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
            if relay is not None and relay.strip and rewritten:
                await relay.write(b"".join(rewritten))
        if relay is not None:
            await relay.finish()
        elif sink is not None and assembler is not None and done:
            answer = assembler.body()
            protocol.strip_added(answer, sink.strip, streamed=False)
            sink.set_body(upstream.status, json.dumps(answer).encode(), "application/json")
        return done

    def _record(
        self, arm: ArmName, traffic: str, slice_: str, status: int, kind: str | None, output: protocol.Output,
        timing: _Timing, config: RouterConfig,
    ) -> None:
        series = self.metrics.series(arm, traffic, slice_)
        end = time.perf_counter()
        duration = end - timing.arrived
        series.requests(str(status if kind != "client_cancelled" else 499)).inc()
        series.duration.observe(duration)
        if kind is not None:
            self.metrics.errors.labels(arm, traffic, slice_, kind).inc()
        tokens = output.output_tokens
        if tokens:
            series.output_tokens.inc(tokens)
        series.request_output_tokens.observe(tokens)
        if timing.first_token is not None:
            series.ttft.observe(timing.first_token - timing.arrived)
            itl = series.itl
            for gap, count in timing.gaps:
                for _ in range(min(count, 64)):
                    itl.observe(gap)
        # A non-streamed answer reaches the client all at once: its first token arrives with the body.
        ttft = (timing.first_token if timing.first_token is not None else end) - timing.arrived
        last = timing.last_token if timing.last_token is not None else end
        tpot = (last - (timing.first_token or last)) / (tokens - 1) if tokens > 1 else 0.0
        if tokens > 1 and timing.first_token is not None:
            series.tpot.observe(tpot)
        if kind is None and tokens:
            for deadline in config.goodput_deadlines:
                if ttft <= deadline.ttft_s and tpot <= deadline.tpot_s:
                    series.deadline_tokens(deadline.name).inc(tokens)

    # ---- shadow ----------------------------------------------------------------------------------------------

    async def _shadow(
        self, config: RouterConfig, path: str, body: dict[str, Any], slice_: str,
        live_done: asyncio.Future[_Result | None],
    ) -> None:
        """Mirror to the candidate (its latency and errors are what Shadow judges), then compare with the live
        stable answer. Never raises: a shadow failure must not be anybody's problem but the metrics'."""
        try:
            candidate = await asyncio.wait_for(
                self._background_call(config, "candidate", "mirror", path, body, slice_),
                timeout=config.compare.timeout_s,
            )
            stable = await asyncio.wait_for(live_done, timeout=config.compare.timeout_s)
            await asyncio.wait_for(self._compare(config, path, body, slice_, "mirror", stable, candidate),
                                   timeout=config.compare.timeout_s)
        except TimeoutError:
            self.metrics.compared.labels(slice_, "mirror", protocol.decoding(body), "skipped_timeout").inc()
        except Exception:
            log.exception("shadow comparison failed (the client was not affected)")
            self.metrics.compared.labels(slice_, "mirror", protocol.decoding(body), "skipped_error").inc()
        finally:
            self.mirrors_in_flight -= 1

    async def _background_call(
        self, config: RouterConfig, arm: ArmName, traffic: str, path: str, body: dict[str, Any], slice_: str,
    ) -> _Result | None:
        """A mirror, scoring or probe request: takes a free slot or is dropped (never queues ahead of live
        traffic)."""
        gate = self.gates[arm]
        try:
            await gate.acquire(may_wait=False)
        except Rejected:
            # Shed, not failed: the arm's engines were busy with live traffic, and this request was optional. It is
            # not an answer of the arm's (nor in its requests), so it stays out of the arm's error rate; a burst of
            # live traffic must not read as a candidate's errors in Shadow.
            if traffic == "mirror":
                self.metrics.mirrored.labels("dropped_admission").inc()
            self.metrics.shed.labels(arm, traffic).inc()
            return None
        if traffic == "mirror":
            self.metrics.mirrored.labels("sent").inc()
        held = time.perf_counter()
        in_flight = self.metrics.series(arm, traffic, slice_).in_flight
        in_flight.inc()
        upstream = protocol.as_stream(body) if protocol.assemblable(body) else body
        try:
            return await self._exchange(config, arm, traffic, path, json.dumps(upstream).encode(), slice_, held, None,
                                        {})
        finally:
            in_flight.dec()
            gate.release(time.perf_counter() - held)

    async def _compare(
        self, config: RouterConfig, path: str, body: dict[str, Any], slice_: str, traffic: str,
        stable: _Result | None, candidate: _Result | None,
    ) -> None:
        """Teacher-forced comparison of one stable answer (compare.py), counted per slice and source (`traffic`:
        mirror or probe); `candidate` is the candidate's own answer to the same request, for the diff sample."""
        m = self.metrics
        counted = functools.partial(m.compared.labels, slice_, traffic, protocol.decoding(body))
        if stable is None or not stable.complete:
            counted("skipped_incomplete").inc()
            return
        positions = stable.output.comparable()
        if positions is None or stable.output.prompt_token_ids is None:
            counted("skipped_no_logprobs").inc()
            return
        scored = await self._score(config, body.get("model"), stable.output, slice_)
        result = compare.teacher_forced(positions, scored) if scored is not None else None
        if result is None:
            counted("skipped_score_unavailable").inc()
            return
        ok = compare.accepted(result, config.compare.request_kl_limit(slice_))
        counted("accepted" if ok else "rejected").inc()
        m.compare_positions.labels(slice_, traffic).inc(result.positions)
        m.compare_kl.labels(slice_, traffic).inc(result.kl_sum)
        m.compare_top1.labels(slice_, traffic).inc(result.top1_matches)
        m.request_kl.labels(slice_, traffic).observe(result.mean_kl)
        if not ok and config.diffs.enabled:
            cut = config.diffs.max_chars
            self.diffs.add(compare.DiffSample(
                at=compare.now(), endpoint=path, slice=slice_, traffic=traffic,
                prompt=compare.redact(compare.prompt_text(body), self.patterns, cut),
                stable=compare.redact(stable.output.joined, self.patterns, cut),
                candidate=compare.redact(candidate.output.joined if candidate else "", self.patterns, cut),
                mean_kl=result.mean_kl, agreement=result.agreement, first_disagreement=result.first_disagreement,
            ))

    async def _score(self, config: RouterConfig, model: Any, stable: protocol.Output,
                     slice_: str) -> list[compare.TopLogprobs] | None:
        """The candidate's distribution at each of the stable arm's generated positions: one prefill of prompt +
        stable's tokens with prompt log-probabilities (`traffic="score"`: its cost shows in the request series)."""
        assert stable.prompt_token_ids is not None
        k = config.compare.top_logprobs
        body = protocol.score_body(model, stable.prompt_token_ids, stable.token_ids, k)
        result = await self._background_call(config, "candidate", "score", protocol.COMPLETIONS, body, slice_)
        if result is None or result.body is None:
            return None
        self.metrics.score_prefill_tokens.labels(slice_).inc(len(body["prompt"]))
        return protocol.scored_positions(result.body, len(stable.prompt_token_ids), len(stable.token_ids), k)


    # ---- quality probes ------------------------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        """Probes at the configured rate while a candidate is configured and a prompt source is given; a probe that
        would exceed MAX_PROBES_IN_FLIGHT is skipped, so probes never queue up behind a slow arm."""
        while True:
            config = self.config
            settings = config.probes
            if settings.rate_per_second <= 0 or "candidate" not in config.arms or not (
                    settings.artifact or settings.directory):
                await asyncio.sleep(1.0)
                continue
            prompts = await self._prompts(settings)
            item = prompts.next() if prompts is not None else None
            if item is None:
                await asyncio.sleep(1.0)
                continue
            if self.probes_in_flight < MAX_PROBES_IN_FLIGHT:
                self.probes_in_flight += 1
                self._spawn(self._probe(config, item))
            await asyncio.sleep(1.0 / settings.rate_per_second)

    async def _prompts(self, settings: ProbeConfig) -> probes.ProbePrompts | None:
        """The prompts of the configured source, read once per source (a new candidate digest is a new source)."""
        source = (settings.artifact, settings.insecure, settings.registry_config, settings.directory)
        if source == self._probe_source:
            return self.probe_prompts
        if time.monotonic() < self._probe_retry_at:
            return None
        try:
            login = Path(settings.registry_config) if settings.registry_config else None
            read = (functools.partial(probes.from_artifact, settings.artifact, settings.insecure, login)
                    if settings.artifact else functools.partial(probes.from_directory, Path(settings.directory or "")))
            loaded = await asyncio.wait_for(asyncio.to_thread(read), timeout=PROBE_LOAD_TIMEOUT_S)
        except Exception as exc:  # the registry, the artifact or the ConfigMap: say which, retry later
            self._probe_retry_at = time.monotonic() + PROBE_RETRY_S
            self._errors.warning("candidate", "probe_prompts", "probe prompts from %s not read (retry in %.0fs): %r",
                                 settings.artifact or settings.directory, PROBE_RETRY_S, exc)
            return None
        self._probe_source, self.probe_prompts = source, loaded
        self.metrics.probe_prompts.clear()
        for name, count in loaded.counts().items():
            self.metrics.probe_prompts.labels(name).set(count)
        log.info("probe prompts from %s: %s", settings.artifact or settings.directory, loaded.counts() or "none")
        return loaded

    async def _probe(self, config: RouterConfig, item: probes.ProbePrompt) -> None:
        """One probe: the stable arm answers the prompt greedily (with its top-k), the candidate scores that answer
        teacher-forced; counted like a mirrored comparison, as `traffic="probe"`. Never raises."""
        body: dict[str, Any] = {"prompt": item.prompt, "max_tokens": config.probes.max_tokens, "temperature": 0}
        try:
            model = await self._model_of(config)
            if model is not None:
                body["model"] = model
            asked, _ = protocol.comparison_body(body, False, config.compare.top_logprobs)
            stable = await asyncio.wait_for(
                self._background_call(config, "stable", "probe", protocol.COMPLETIONS, asked, item.slice),
                timeout=config.compare.timeout_s)
            await asyncio.wait_for(self._compare(config, protocol.COMPLETIONS, body, item.slice, "probe", stable,
                                                 None), timeout=config.compare.timeout_s)
        except TimeoutError:
            self.metrics.compared.labels(item.slice, "probe", "greedy", "skipped_timeout").inc()
        except Exception:
            log.exception("quality probe failed (no client was affected)")
            self.metrics.compared.labels(item.slice, "probe", "greedy", "skipped_error").inc()
        finally:
            self.probes_in_flight -= 1

    async def _model_of(self, config: RouterConfig) -> str | None:
        """The model name the stable arm serves (its /v1/models), asked once per arm URL: probes name it as a
        client would. None when the arm does not say (vLLM then takes its only model)."""
        url = config.arms["stable"].url
        if self._served_model.get(url) is None:
            assert self.session is not None
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
                async with self.session.get(self.addresses.url(url) + "/v1/models",
                                            timeout=aiohttp.ClientTimeout(total=5)) as answer:
                    self._served_model[url] = str((await answer.json(content_type=None))["data"][0]["id"])[:256]
        return self._served_model.get(url)


class _ClientGone(Exception):
    """The client disconnected mid-stream."""


class _ClientSink:
    """Where a live answer goes: a streamed response (started on the first upstream byte) or a whole body."""

    def __init__(self, request: web.Request, strip: frozenset[str], assembler: protocol.Assembler | None) -> None:
        self.request = request
        self.strip = strip  # fields the router added to the request, to take out of the answer
        self.assembler = assembler  # a non-streamed client served from a streamed upstream answer
        self.stream: web.StreamResponse | None = None
        self.body: tuple[int, bytes, str] | None = None

    @property
    def started(self) -> bool:
        return self.stream is not None

    async def start(self, status: int, content_type: str) -> None:
        self.stream = web.StreamResponse(status=status, headers={"Content-Type": content_type,
                                                                 "Cache-Control": "no-cache"})
        await self.stream.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.stream is not None
        try:
            await self.stream.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            raise _ClientGone() from exc

    async def finish(self) -> None:
        assert self.stream is not None
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            await self.stream.write_eof()

    def set_body(self, status: int, data: bytes, content_type: str) -> None:
        self.body = (status, data, content_type)

    def response(self, result: _Result) -> web.StreamResponse:
        if self.stream is not None:
            return self.stream
        status, data, content_type = self.body or (502, protocol.error_body("no answer", "upstream", 502),
                                                   "application/json")
        return web.Response(status=status, body=data, headers={"Content-Type": content_type})


async def _read_bounded(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is larger than `limit` (chunked bodies have no Content-Length to check)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 << 10):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> web.Response:
    return web.Response(status=413, content_type="application/json", body=protocol.error_body(
        f"request body larger than {limit} bytes", "invalid_request_error", 413))


def _forward_headers(headers: Any) -> dict[str, str]:
    return {
        k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS and not k.lower().startswith("x-quantrol")
    }


@functools.lru_cache(maxsize=8)
def _upstream_timeout(total_s: float) -> aiohttp.ClientTimeout:
    # One (immutable) timeout object per configured value rather than one per request.
    return aiohttp.ClientTimeout(total=total_s, sock_connect=5)


def _waiting_of(gate: ArmGate) -> Callable[[], float]:
    return lambda: float(gate.waiting)


# ---- process entry point -------------------------------------------------------------------------------------


async def serve(
    config_path: Path, host: str, port: int, admin_token_file: Path | None, reload_interval_s: float,
    shutdown_grace_s: float = 30.0, admin_port: int | None = None, namespace: str | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; then stop accepting and give in-flight requests `shutdown_grace_s` to finish."""
    config = load_config(config_path)
    token = AdminToken(admin_token_file, os.environ.get(ADMIN_TOKEN_ENV))
    if token.current() is None:
        log.warning("no admin token configured: POST /quantrol/config and /quantrol/diffs refuse every request")
    router = Router(config, config_path=config_path, admin_token=token, reload_interval_s=reload_interval_s,
                    addresses=from_environment(), namespace=namespace)
    runner = web.AppRunner(router.make_app(admin=admin_port is None), access_log=None,
                           shutdown_timeout=shutdown_grace_s)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    admin_runner = None
    if admin_port is not None:  # the admin API on its own port, which the policy's Service does not expose
        admin_runner = web.AppRunner(router.make_admin_app(), access_log=None)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, host, admin_port).start()
        log.info("router admin API on %s:%d", host, admin_port)
    log.info("router listening on %s:%d with config v%d from %s: weights %s, mirror %.3f", host, port,
             config.version, config_path, config.weights(), config.mirror_fraction)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("router stopping: draining in-flight requests for up to %.0fs", shutdown_grace_s)
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()
