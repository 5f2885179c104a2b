"""The serving router: pure parts without a server, then the real aiohttp router over HTTP on 127.0.0.1 in front
of two ENGINE STAND-INS (quantrol_dev/standin.py, not vLLM; the real-engine tier is separate)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from quantrol_dev.standin import Behaviour, EngineStandin, start_standin
from quantrol_worker.router import compare, protocol
from quantrol_worker.router.admission import ArmGate, Rejected, admission_decision, retry_after_seconds
from quantrol_worker.router.app import AdminToken, Router
from quantrol_worker.router.config import AdmissionLimits, apply_decision, parse_config
from quantrol_worker.router.split import choose_arm, should_mirror, sticky_point

TOKEN = "s3cret-admin-token"

# ---- pure: split and sticky ----------------------------------------------------------------------------------

weights_st = st.fixed_dictionaries({"stable": st.integers(0, 100), "candidate": st.integers(0, 100)}).filter(
    lambda w: sum(w.values()) > 0
)


@given(weights_st, st.floats(0, 1, exclude_max=True))
def test_choose_arm_never_picks_a_zero_weight_arm(weights: dict[str, int], point: float) -> None:
    assert weights[choose_arm(weights, point)] > 0  # type: ignore[arg-type]


@given(st.text(min_size=1, max_size=64), weights_st)
def test_sticky_key_always_lands_on_the_same_arm(key: str, weights: dict[str, int]) -> None:
    point = sticky_point(key)
    assert 0 <= point < 1
    assert choose_arm(weights, point) == choose_arm(weights, sticky_point(key))  # type: ignore[arg-type]


@given(st.text(min_size=1, max_size=64), st.integers(0, 100), st.integers(0, 100))
def test_raising_the_candidate_weight_never_moves_a_key_back_to_stable(key: str, low: int, high: int) -> None:
    low, high = min(low, high), max(low, high)
    point = sticky_point(key)
    before = choose_arm({"candidate": low, "stable": 100 - low}, point)
    after = choose_arm({"candidate": high, "stable": 100 - high}, point)
    assert not (before == "candidate" and after == "stable")


def test_split_ratio_over_uniform_points_matches_the_weights() -> None:
    n = 10_000
    picks = [choose_arm({"stable": 70, "candidate": 30}, (i + 0.5) / n) for i in range(n)]
    assert abs(picks.count("candidate") / n - 0.30) < 0.001


def test_sticky_points_spread_uniformly() -> None:
    points = [sticky_point(f"conversation-{i}") for i in range(4000)]
    assert abs(sum(p < 0.25 for p in points) / 4000 - 0.25) < 0.03


def test_only_stable_traffic_is_mirrored() -> None:
    assert should_mirror("stable", 0.5, 0.2) and not should_mirror("stable", 0.5, 0.7)
    assert not should_mirror("candidate", 1.0, 0.0)


# ---- pure: admission ----------------------------------------------------------------------------------------

LIMITS = AdmissionLimits(max_in_flight=2, max_queue=2, max_queue_wait_s=0.5)


@pytest.mark.parametrize(
    ("in_flight", "waiting", "may_wait", "expected"),
    [
        (0, 0, True, "admit"),
        (1, 0, False, "admit"),
        (2, 0, True, "queue"),
        (1, 1, True, "queue"),  # a free slot but someone is ahead: FIFO, no overtaking
        (2, 2, True, "reject"),  # queue full
        (2, 0, False, "reject"),  # mirror/probe traffic never waits
    ],
)
def test_admission_decision_table(in_flight: int, waiting: int, may_wait: bool, expected: str) -> None:
    assert admission_decision(in_flight, waiting, LIMITS, may_wait) == expected


@given(st.integers(0, 10_000), st.integers(1, 1000), st.floats(0, 1e6) | st.sampled_from([math.nan, math.inf]))
def test_retry_after_is_a_whole_second_between_1_and_60(waiting: int, slots: int, service: float) -> None:
    limits = AdmissionLimits(max_in_flight=slots)
    assert 1 <= retry_after_seconds(waiting, limits, service) <= 60


async def test_gate_hands_slots_over_in_fifo_order_and_times_out() -> None:
    gate = ArmGate(AdmissionLimits(max_in_flight=1, max_queue=2, max_queue_wait_s=0.3))
    await gate.acquire(may_wait=True)
    order: list[int] = []

    async def waiter(i: int) -> None:
        await gate.acquire(may_wait=True)
        order.append(i)
        gate.release(0.01)

    tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(Rejected) as rejected:
        await gate.acquire(may_wait=True)  # queue of 2 is full
    assert rejected.value.reason == "queue_full"
    gate.release(0.01)
    await asyncio.gather(*tasks)
    assert order == [0, 1] and gate.in_flight == 0
    await gate.acquire(may_wait=True)
    with pytest.raises(Rejected) as timed_out:
        await gate.acquire(may_wait=True)
    assert timed_out.value.reason == "queue_timeout" and gate.waiting == 0


# ---- pure: comparison, redaction, protocol ------------------------------------------------------------------


def _top(*pairs: tuple[int, float], floor: float | None = None) -> compare.TopLogprobs:
    listed = {t: math.log(p) for t, p in pairs}
    return compare.TopLogprobs(listed, min(listed.values()) if floor is None else floor)


def test_identical_distributions_have_no_kl_and_full_agreement() -> None:
    s = [_top((1, 0.85), (2, 0.05), (3, 0.05)), _top((7, 0.6), (8, 0.3))]
    result = compare.teacher_forced(s, s)
    assert result is not None and result.mean_kl == pytest.approx(0.0, abs=1e-12)
    assert result.agreement == 1.0 and result.first_disagreement is None


def test_kl_is_that_of_the_coarsened_distributions() -> None:
    # Stable {1: .8, 2: .1, rest .1}; candidate {1: .5, 2: .3, rest .2}: the KL of the three-bucket distributions.
    stable, candidate = _top((1, 0.8), (2, 0.1)), _top((1, 0.5), (2, 0.3))
    expected = 0.8 * math.log(0.8 / 0.5) + 0.1 * math.log(0.1 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert compare.position_kl(stable, candidate) == pytest.approx(expected)


def test_a_token_the_candidate_did_not_list_counts_at_its_floor_and_top1_disagrees() -> None:
    stable = _top((1, 0.9), (2, 0.05))
    candidate = _top((2, 0.9), (3, 0.05))  # 1 unlisted: at most as likely as 0.05
    kl = compare.position_kl(stable, candidate)
    assert kl == pytest.approx(0.9 * math.log(0.9 / 0.05) + 0.05 * math.log(0.05 / 0.9)
                               + 0.05 * math.log(0.05 / max(1e-9, 1 - 0.05 - 0.9)), rel=1e-6)
    result = compare.teacher_forced([stable, stable], [stable, candidate])
    assert result is not None and result.agreement == 0.5 and result.first_disagreement == 1


def test_a_ruled_out_token_is_bounded_and_kl_never_negative() -> None:
    stable = _top((1, 0.99))
    candidate = compare.TopLogprobs({1: -9999.0, 2: -0.0001}, -9999.0)
    expected = 0.99 * (math.log(0.99) + 20) + 0.01 * math.log(0.01 / (1 - math.exp(-20)))  # -9999 counts as -20
    assert compare.position_kl(stable, candidate) == pytest.approx(expected)
    assert compare.teacher_forced([], []) is None and compare.teacher_forced([stable], []) is None


@given(st.lists(st.floats(0.001, 1.0), min_size=1, max_size=6), st.lists(st.floats(0.001, 1.0), min_size=1,
                                                                          max_size=6))
def test_kl_is_non_negative_and_zero_only_for_the_same_distribution(a: list[float], b: list[float]) -> None:
    def dist(weights: list[float]) -> compare.TopLogprobs:
        total = sum(weights) * 1.25  # a quarter of the mass left for the unlisted rest
        return _top(*((i, w / total) for i, w in enumerate(weights)))

    assert compare.position_kl(dist(a), dist(b)) >= 0
    assert compare.position_kl(dist(a), dist(a)) == pytest.approx(0.0, abs=1e-9)


def test_acceptance_is_the_mean_kl_within_the_limit() -> None:
    result = compare.Comparison(positions=4, kl_sum=0.2, top1_matches=4, first_disagreement=None)
    assert compare.accepted(result, 0.05) and not compare.accepted(result, 0.049)


def test_redaction_happens_before_the_cut() -> None:
    patterns = compare.compile_patterns(parse_config(_config_text(1)).diffs.redact_patterns)
    text = "mail me at jane.doe@example.com, api_key=abc123 card 4111 1111 1111 1111"
    redacted = compare.redact(text, patterns, 10_000)
    assert "jane" not in redacted and "abc123" not in redacted and "4111" not in redacted
    assert redacted.count(compare.REDACTED) == 3
    assert compare.redact("x" * 50, [], 16) == "x" * 16 + "…"


def test_slice_label_bounds_user_supplied_values() -> None:
    assert protocol.slice_label("code", ["code"], 10, [256]) == "code"
    assert protocol.slice_label("anything-else", ["code"], 10, [256]) == "other"
    assert protocol.slice_label(None, [], 100, [256, 1024]) == "len_le_256"
    assert protocol.slice_label(None, [], 5000, [256, 1024]) == "len_gt_1024"


@given(st.lists(st.integers(1, 40), min_size=1, max_size=20))
def test_sse_parser_is_independent_of_network_chunking(cuts: list[int]) -> None:
    stream = b"".join(b'data: {"i": %d}\n\n' % i for i in range(5)) + b"data: [DONE]\n\n"
    parser, payloads, position = protocol.SSEParser(), [], 0
    for cut in cuts:
        payloads += parser.feed(stream[position : position + cut])
        position += cut
    payloads += parser.feed(stream[position:])
    assert payloads == [b'{"i": %d}' % i for i in range(5)] + [b"[DONE]"]


def test_sse_parser_keeps_only_data_lines_of_any_event_shape() -> None:
    stream = (b": keep-alive comment\n\nevent: completion\ndata: {\"a\": 1}\nid: 7\n\ndata:{\"b\": 2}\n\n"
              b"retry: 10\n\ndata: [DONE]\n\n")
    parser = protocol.SSEParser()
    assert parser.feed(stream[:30]) + parser.feed(stream[30:]) == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]


def test_loads_is_json_loads_for_utf8_bytes() -> None:
    assert protocol.loads('{"text": "é", "n": [1, 2.5, null]}'.encode()) == {"text": "é", "n": [1, 2.5, None]}
    for bad in (b'{"a": 1} trailing', b"\xff\xfe", b"{"):
        with pytest.raises(ValueError):
            protocol.loads(bad)


def test_decoding_is_greedy_only_with_an_explicit_zero_temperature() -> None:
    assert protocol.decoding({"temperature": 0}) == protocol.decoding({"top_k": 1}) == "greedy"
    assert protocol.decoding({}) == protocol.decoding({"temperature": 0, "n": 2}) == "sampled"


def test_scored_positions_read_the_engine_shape_with_the_topk_floor() -> None:
    engine = EngineStandin()
    ids = [3, 4, 5, 6]
    entries = engine.prompt_logprobs(ids, 2)
    positions = protocol.scored_positions({"choices": [{"prompt_logprobs": entries}]}, 2, 2, 2)
    assert positions is not None and len(positions) == 2
    for j, position in zip((2, 3), positions, strict=True):
        ranked = engine.ranking(ids[:j])
        assert position.top1() == ranked[0] and set(ranked[:2]) <= set(position.logprobs)
        assert position.floor == pytest.approx(math.log(0.03))  # the 2nd ranked, not the prompt's rest-mass token
    assert protocol.scored_positions({"choices": [{"prompt_logprobs": None}]}, 2, 2, 2) is None


@pytest.mark.parametrize("chat", [False, True])
def test_generation_logprobs_by_token_id_are_read_and_text_keys_refused(chat: bool) -> None:
    engine = EngineStandin()
    body, added = protocol.comparison_body({"prompt": "a b c", "temperature": 0.8}, chat, 3)
    assert added == {protocol.ADDED_TOKEN_IDS, protocol.ADDED_LOGPROBS} and body["return_tokens_as_token_ids"]
    from quantrol_dev.standin import _Ask
    ask = _Ask.of(body, chat)
    out = engine.generate([1, 2, 3], 4, 0.8, seed=7)
    logprobs = engine._logprobs_for([1, 2, 3], out, chat, ask)
    positions = (protocol.chat_positions if chat else protocol.completion_positions)(logprobs)
    assert positions is not None and [p.top1() for p in positions] == [
        engine.ranking([1, 2, 3, *out[:i]])[0] for i in range(4)]
    as_text = engine._logprobs_for([1, 2, 3], out, chat, _Ask(True, True, 3, as_ids=False))
    assert (protocol.chat_positions if chat else protocol.completion_positions)(as_text) is None
    # A client that asked for log-probabilities itself keeps its own request.
    own = {"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2}
    assert protocol.comparison_body({**own, "return_token_ids": True}, chat, 3) == ({**own, "return_token_ids": True},
                                                                                   frozenset())


def test_the_added_fields_are_stripped_as_vllm_would_have_written_them() -> None:
    whole = {"choices": [{"text": "x", "logprobs": {"tokens": []}, "token_ids": [1], "prompt_token_ids": [2]}]}
    protocol.strip_added(whole, frozenset({protocol.ADDED_LOGPROBS, protocol.ADDED_TOKEN_IDS}), streamed=False)
    assert whole == {"choices": [{"text": "x", "logprobs": None, "token_ids": None, "prompt_token_ids": None}]}
    chunk = {"choices": [{"text": "x", "logprobs": {"tokens": []}, "token_ids": [1]}]}
    protocol.strip_added(chunk, frozenset({protocol.ADDED_LOGPROBS}), streamed=True)
    assert chunk == {"choices": [{"text": "x", "logprobs": None, "token_ids": [1]}]}


# ---- pure: config -----------------------------------------------------------------------------------------------


def _config_text(version: int, stable: str = "http://127.0.0.1:1", candidate: str = "http://127.0.0.1:2",
                 **extra: Any) -> str:
    doc: dict[str, Any] = {
        "version": version,
        "arms": {"stable": {"url": stable, "weight": 100}, "candidate": {"url": candidate, "weight": 0}},
    }
    for key, value in extra.items():
        if key == "weights":
            for arm, weight in value.items():
                doc["arms"][arm]["weight"] = weight
        elif key == "admission":
            for arm, limits in value.items():
                doc["arms"][arm]["admission"] = limits
        else:
            doc[key] = value
    return json.dumps(doc)


def test_config_rejects_typos_and_inconsistent_documents() -> None:
    with pytest.raises(ValueError, match="mirror_fractoin"):
        parse_config(_config_text(1, mirror_fractoin=0.1))
    with pytest.raises(ValueError, match=r"needs arms\.candidate"):
        parse_config(json.dumps({"version": 1, "arms": {"stable": {"url": "http://a", "weight": 1}},
                                 "mirror_fraction": 0.5}))
    with pytest.raises(ValueError, match="positive weight"):
        parse_config(_config_text(1, weights={"stable": 0}))


def test_apply_decision_makes_file_and_admin_paths_commute() -> None:
    v1, v2 = parse_config(_config_text(1)), parse_config(_config_text(2, weights={"candidate": 10}))
    assert apply_decision(None, v1) == "apply"
    assert apply_decision(v1, v2) == "apply"
    assert apply_decision(v2, v1) == "stale"  # the ConfigMap lagging behind an admin push
    assert apply_decision(v2, parse_config(_config_text(2, weights={"candidate": 10}))) == "unchanged"
    assert apply_decision(v2, parse_config(_config_text(2, weights={"candidate": 50}))) == "conflict"


# ---- over HTTP: fixtures ---------------------------------------------------------------------------------------


@dataclass
class Stack:
    stable: EngineStandin
    candidate: EngineStandin
    stable_url: str
    candidate_url: str


@dataclass
class RunningRouter:
    router: Router
    url: str
    config_path: Path


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    stable, candidate = EngineStandin(Behaviour(model="m")), EngineStandin(Behaviour(model="m"))
    (r1, p1), (r2, p2) = await start_standin(stable), await start_standin(candidate)
    try:
        yield Stack(stable, candidate, f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}")
    finally:
        await r1.cleanup()
        await r2.cleanup()


RouterFactory = Callable[..., Awaitable[RunningRouter]]


@pytest.fixture
async def start_router(stack: Stack, tmp_path: Path) -> AsyncIterator[RouterFactory]:
    runners: list[web.AppRunner] = []

    async def start(version: int = 1, **extra: Any) -> RunningRouter:
        path = tmp_path / f"router-{len(runners)}.json"
        path.write_text(_config_text(version, stack.stable_url, stack.candidate_url, **extra))
        router = Router(parse_config(path.read_text()), config_path=path, admin_token=AdminToken(None, TOKEN),
                        reload_interval_s=0.05, seed=7)
        runner = web.AppRunner(router.make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return RunningRouter(router, f"http://127.0.0.1:{port}", path)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def completion(prompt: str = "hello world", max_tokens: int = 8, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}


def chat(content: str = "hello", max_tokens: int = 8, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


async def read_sse(response: aiohttp.ClientResponse) -> list[Any]:
    parser, events = protocol.SSEParser(), []
    async for chunk in response.content.iter_any():
        for data in parser.feed(chunk):
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if k not in ("id", "created")}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ---- over HTTP: split, sticky, passthrough -------------------------------------------------------------------


async def test_split_follows_the_weights(stack: Stack, start_router: RouterFactory,
                                         http: aiohttp.ClientSession) -> None:
    running = await start_router(weights={"stable": 70, "candidate": 30})
    n = 400
    sem = asyncio.Semaphore(32)

    async def one() -> None:
        async with sem, http.post(running.url + "/v1/completions", json=completion(max_tokens=2)) as r:
            assert r.status == 200

    await asyncio.gather(*(one() for _ in range(n)))
    share = stack.candidate.stats.requests["/v1/completions"] / n
    assert abs(share - 0.30) < 0.08, share  # ±3.5 standard deviations of a binomial(400, 0.3)


async def test_sticky_header_keeps_a_conversation_on_one_arm(stack: Stack, start_router: RouterFactory,
                                                             http: aiohttp.ClientSession) -> None:
    running = await start_router(weights={"stable": 50, "candidate": 50}, sticky_header="X-Session")
    arms_by_key: dict[str, set[int]] = {}
    for key in ("alice", "bob", "carol", "dave"):
        for _ in range(10):
            before = stack.candidate.stats.requests.get("/v1/chat/completions", 0)
            async with http.post(running.url + "/v1/chat/completions", json=chat(max_tokens=1),
                                 headers={"X-Session": key}) as r:
                assert r.status == 200
            arms_by_key.setdefault(key, set()).add(stack.candidate.stats.requests.get("/v1/chat/completions", 0)
                                                   - before)
    assert all(len(arms) == 1 for arms in arms_by_key.values()), arms_by_key


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [True, False])
async def test_answers_pass_through_unchanged(stack: Stack, start_router: RouterFactory,
                                             http: aiohttp.ClientSession, path: str, stream: bool) -> None:
    running = await start_router()
    body = completion(max_tokens=6, stream=stream, logprobs=1) if path == "/v1/completions" \
        else chat(max_tokens=6, stream=stream)
    results = []
    for base in (stack.stable_url, running.url):
        async with http.post(base + path, json=body) as r:
            assert r.status == 200
            if stream:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                results.append(await read_sse(r))
            else:
                results.append(await r.json())
    assert strip_volatile(results[0]) == strip_volatile(results[1])
    if stream:
        assert results[1][-1] == "[DONE]"


async def test_models_and_health_pass_through_and_healthz_is_the_router(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    running = await start_router()
    async with http.get(running.url + "/v1/models") as r:
        assert r.status == 200 and (await r.json())["data"][0]["id"] == "m"
    async with http.get(running.url + "/health") as r:
        assert r.status == 200
    async with http.get(running.url + "/healthz") as r:
        assert (await r.json()) == {"status": "ok", "config_version": 1}


async def test_upstream_errors_reach_the_client_and_the_metrics(stack: Stack, start_router: RouterFactory,
                                                                http: aiohttp.ClientSession) -> None:
    stack.candidate.behaviour.error_rate = 1.0
    running = await start_router(weights={"stable": 0, "candidate": 100})
    async with http.post(running.url + "/v1/completions", json=completion()) as r:
        assert r.status == 500
        assert "injected" in (await r.json())["error"]["message"]
    samples = await scrape(http, running.url)
    assert total(samples, "quantrol_router_errors_total", arm="candidate", traffic="live", kind="upstream_5xx") == 1


async def test_unreachable_arm_is_a_502_not_a_hang(stack: Stack, start_router: RouterFactory,
                                                   http: aiohttp.ClientSession) -> None:
    running = await start_router()
    running.router.offer(parse_config(_config_text(2, "http://127.0.0.1:9", stack.candidate_url)), "test")
    async with http.post(running.url + "/v1/completions", json=completion()) as r:
        assert r.status == 502
    samples = await scrape(http, running.url)
    assert total(samples, "quantrol_router_errors_total", arm="stable", kind="upstream_connect") == 1


async def test_a_cookie_set_by_an_arm_never_rides_along_on_other_requests(
        start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    # The router's upstream session is shared by every client: a cookie jar there would hand one client's cookie
    # (say an ingress affinity cookie in front of an arm) to everybody. Addressed by name, as a Service is: a cookie
    # jar ignores cookies from bare IP addresses.
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"choices": [{"index": 0, "text": " hi"}], "usage": {"completion_tokens": 1}})
        response.set_cookie("affinity", "client-one")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # one socket; "localhost" below reaches it (after ::1, if first)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        running = await start_router()
        running.router.offer(parse_config(_config_text(2, f"http://localhost:{port}")), "test")
        for headers in ({}, {}, {"Cookie": "own=yes"}):
            async with http.post(running.url + "/v1/completions", json=completion(), headers=headers) as r:
                assert r.status == 200
        assert seen == [None, None, "own=yes"]  # the client's own Cookie header passes through as it came
    finally:
        await runner.cleanup()


# ---- over HTTP: shadow ---------------------------------------------------------------------------------------


async def test_shadow_mirrors_a_fraction_and_compares_identical_answers(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    running = await start_router(mirror_fraction=0.5, compare={"max_concurrent_mirrors": 1000})
    n = 200
    for i in range(n):
        body = completion(f"prompt number {i}", max_tokens=4, stream=bool(i % 2))
        async with http.post(running.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            payload = await (read_sse(r) if i % 2 else r.json())
        async with http.post(stack.stable_url + "/v1/completions", json=body) as r:
            direct = await (read_sse(r) if i % 2 else r.json())
        # The client's answer is exactly the stable arm's, although the router asked it for token ids too.
        assert strip_volatile(payload) == strip_volatile(direct)

    async def settled() -> bool:
        return running.router.mirrors_in_flight == 0

    await eventually(settled)
    mirrored = stack.candidate.stats.requests["/v1/completions"] - stack.candidate.stats.prompt_logprob_requests
    assert abs(mirrored / n - 0.5) < 0.15, mirrored
    samples = await scrape(http, running.url)
    assert total(samples, "quantrol_router_mirrored_total", outcome="sent") == mirrored
    assert total(samples, "quantrol_router_compared_total", result="accepted", traffic="mirror") == mirrored
    positions = total(samples, "quantrol_router_compare_positions_total")
    assert positions == 4 * mirrored and total(samples, "quantrol_router_compare_top1_matches_total") == positions
    assert total(samples, "quantrol_router_compare_kl_nats_total") == pytest.approx(0.0, abs=1e-9)
    # The comparison's cost: one candidate prefill per compared request, of prompt + stable's answer.
    assert stack.candidate.stats.prompt_logprob_requests == mirrored
    assert total(samples, "quantrol_router_score_prefill_tokens_total") > 4 * mirrored
    # Mirror and probe traffic is never counted as live: the candidate has no live requests at all.
    assert total(samples, "quantrol_router_requests_total", arm="candidate", traffic="live") == 0
    assert total(samples, "quantrol_router_requests_total", arm="stable", traffic="live") == n
    assert total(samples, "quantrol_router_requests_total", arm="candidate", traffic="mirror") == mirrored
    assert total(samples, "quantrol_router_requests_total", arm="candidate", traffic="score") == mirrored
    assert total(samples, "quantrol_router_requests_total", arm="stable", traffic="score") == 0


async def test_a_slow_candidate_does_not_slow_the_client(stack: Stack, start_router: RouterFactory,
                                                         http: aiohttp.ClientSession) -> None:
    stack.candidate.behaviour.token_latency_s = 0.25  # 8 tokens: 2 s per mirrored answer
    running = await start_router(mirror_fraction=1.0)
    for stream in (False, True):
        started = time.perf_counter()
        async with http.post(running.url + "/v1/completions", json=completion(stream=stream)) as r:
            assert r.status == 200
            await r.read()
        assert time.perf_counter() - started < 0.5
    assert running.router.mirrors_in_flight == 2  # still running in the background


async def test_mirrors_beyond_the_bound_are_dropped_not_queued(stack: Stack, start_router: RouterFactory,
                                                               http: aiohttp.ClientSession) -> None:
    stack.candidate.behaviour.token_latency_s = 0.25
    running = await start_router(mirror_fraction=1.0, compare={"max_concurrent_mirrors": 2})
    for _ in range(5):
        async with http.post(running.url + "/v1/completions", json=completion()) as r:
            assert r.status == 200
    samples = await scrape(http, running.url)
    assert total(samples, "quantrol_router_mirrored_total", outcome="dropped_busy") == 3
    assert running.router.mirrors_in_flight == 2


async def test_mirrors_the_candidate_has_no_slot_for_are_shed_not_counted_as_its_errors(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    """A burst of live traffic fills the candidate's slots: the mirrors that find none are dropped (never queued
    ahead of live traffic) and counted as shed, not as candidate errors, which in Shadow would read as a broken
    candidate (and sit in no request count)."""
    stack.candidate.behaviour.token_latency_s = 0.1
    running = await start_router(mirror_fraction=1.0, compare={"max_concurrent_mirrors": 1000},
                                 admission={"candidate": {"max_in_flight": 1, "max_queue": 4}})
    async def one() -> int:
        async with http.post(running.url + "/v1/completions", json=completion()) as r:
            await r.read()
            return r.status

    assert await asyncio.gather(*(one() for _ in range(6))) == [200] * 6
    samples = await scrape(http, running.url)
    dropped = total(samples, "quantrol_router_mirrored_total", outcome="dropped_admission")
    assert dropped >= 4 and total(samples, "quantrol_router_shed_total", arm="candidate", traffic="mirror") == dropped
    assert total(samples, "quantrol_router_errors_total", arm="candidate") == 0


async def test_a_candidate_that_answers_differently_shows_in_agreement_quality_and_diffs(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    stack.candidate.behaviour.deviation = 0.5
    running = await start_router(mirror_fraction=1.0, diffs={"enabled": True, "capacity": 3})
    for i in range(8):
        body = chat(f"write to jane.doe@example.com about topic {i}", max_tokens=16, stream=i % 2 == 0)
        async with http.post(running.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.read()

    async def settled() -> bool:
        return running.router.mirrors_in_flight == 0

    await eventually(settled)
    samples = await scrape(http, running.url)
    positions = total(samples, "quantrol_router_compare_positions_total")
    assert positions == 8 * 16
    assert total(samples, "quantrol_router_compare_top1_matches_total") / positions < 0.75
    assert total(samples, "quantrol_router_compare_kl_nats_total") / positions > 0.5  # whole nats per swapped token
    assert total(samples, "quantrol_router_compared_total", result="rejected") == 8

    async with http.get(running.url + "/quantrol/diffs") as r:
        assert r.status == 401
    async with http.get(running.url + "/quantrol/diffs", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        samples_json = (await r.json())["samples"]
    assert 1 <= len(samples_json) <= 3  # bounded
    sample = samples_json[-1]
    assert "jane.doe" not in sample["prompt"] and compare.REDACTED in sample["prompt"]
    assert sample["stable"] != sample["candidate"] and sample["first_disagreement"] is not None
    assert sample["mean_kl"] > 0.1 and sample["traffic"] == "mirror"


@pytest.mark.parametrize("stream", [False, True])
async def test_sampled_requests_are_compared_teacher_forced(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession, stream: bool) -> None:
    """The control: the candidate is the same toy model, and the traffic is sampled at temperature 0.8 — the
    answers differ from run to run, the comparison of distributions on the stable arm's tokens does not."""
    running = await start_router(mirror_fraction=1.0)
    for i in range(6):
        async with http.post(running.url + "/v1/completions",
                             json=completion(f"sampled {i}", temperature=0.8, stream=stream)) as r:
            assert r.status == 200
            await r.read()

    async def counted() -> bool:
        samples = await scrape(http, running.url)
        return total(samples, "quantrol_router_compared_total", result="accepted", decoding="sampled") == 6

    await eventually(counted)
    samples = await scrape(http, running.url)
    positions = total(samples, "quantrol_router_compare_positions_total")
    assert total(samples, "quantrol_router_compare_top1_matches_total") == positions == 6 * 8
    assert total(samples, "quantrol_router_compare_kl_nats_total") == pytest.approx(0.0, abs=1e-9)
    # The same traffic against a damaged candidate: clearly visible although every answer was sampled.
    stack.candidate.behaviour.deviation = 0.3
    for i in range(6):
        async with http.post(running.url + "/v1/completions",
                             json=completion(f"sampled {i}", temperature=0.8, stream=stream)) as r:
            await r.read()

    async def damaged() -> bool:
        samples = await scrape(http, running.url)
        return total(samples, "quantrol_router_compare_positions_total") == 12 * 8

    await eventually(damaged)
    samples = await scrape(http, running.url)
    assert total(samples, "quantrol_router_compare_kl_nats_total") / (6 * 8) > 0.3
    assert total(samples, "quantrol_router_compared_total", result="rejected") >= 4


async def test_probes_from_a_configmap_judge_each_slice_without_any_live_traffic(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """The candidate is damaged on one slice's prompts only; no client sends anything. Probes replay each slice's
    prompts greedily at the configured rate, and the comparison shows the damage in that slice alone."""
    probes_dir = tmp_path / "probes"
    probes_dir.mkdir()
    (probes_dir / "prose").write_text(json.dumps([f"the licence grants permission {i}" for i in range(3)]))
    (probes_dir / "code").write_text(json.dumps([f"def parse self text {i}" for i in range(3)]))
    (probes_dir / "..data").mkdir()  # how a mounted ConfigMap looks: not a key
    stack.candidate.behaviour.deviation, stack.candidate.behaviour.deviation_when = 0.5, "parse"
    running = await start_router(probes={"directory": str(probes_dir), "rate_per_second": 10, "max_tokens": 8})

    async def both_slices() -> bool:
        s = await scrape(http, running.url)
        return all(total(s, "quantrol_router_compare_positions_total", slice=n, traffic="probe") >= 40
                   for n in ("prose", "code"))

    await eventually(both_slices, within_s=15)
    s = await scrape(http, running.url)
    kl = {n: total(s, "quantrol_router_compare_kl_nats_total", slice=n, traffic="probe")
          / total(s, "quantrol_router_compare_positions_total", slice=n, traffic="probe") for n in ("prose", "code")}
    assert kl["prose"] == pytest.approx(0.0, abs=1e-9) and kl["code"] > 0.3, kl
    assert total(s, "quantrol_router_probe_prompts", slice="code") == 3
    # Never live: the stable arm answered probes, the candidate scored them; nobody's latency SLO saw any of it.
    assert total(s, "quantrol_router_requests_total", traffic="live") == 0
    assert total(s, "quantrol_router_requests_total", arm="stable", traffic="probe") >= 10
    assert total(s, "quantrol_router_requests_total", arm="candidate", traffic="score") >= 10


@pytest.mark.stack
async def test_probes_read_the_candidate_artifacts_evaluation_prompts_by_digest(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession, tmp_path: Path,
        oci_registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantrol_worker import oci
    from quantrol_worker.contracts import EVALUATION_PROMPTS_FILE, EvaluationPrompt, EvaluationPrompts, SlicePrompts

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "config.json").write_text("{}")
    prompts = EvaluationPrompts(slices=[SlicePrompts(slice="code", prompts=[
        EvaluationPrompt(text="def f", token_ids=[5, 6, 7 + i]) for i in range(4)])])
    (artifact / EVALUATION_PROMPTS_FILE).write_text(prompts.model_dump_json(by_alias=True))
    ref = "oci://" + oci.push(artifact, f"{oci_registry.address}/models/probed", insecure=True, tag=None,
                              annotations={})
    running = await start_router(probes={"artifact": ref, "insecure": True, "rate_per_second": 10, "max_tokens": 4})

    async def probed() -> bool:
        s = await scrape(http, running.url)
        return total(s, "quantrol_router_compared_total", slice="code", traffic="probe", result="accepted") >= 4

    await eventually(probed, within_s=15)
    s = await scrape(http, running.url)
    assert total(s, "quantrol_router_probe_prompts", slice="code") == 4
    assert stack.stable.stats.requests["/v1/completions"] >= 4  # token-id prompts: no tokenizer, no chat template
    # The artifact is the tenant's: a file larger than the limit is refused on its manifest's word, before a byte
    # of it is downloaded.
    from quantrol_worker.router import probes as probe_prompts

    monkeypatch.setattr(probe_prompts, "EVALUATION_PROMPTS_MAX_BYTES", 100)
    with pytest.raises(ValueError, match="over the 100-byte limit"):
        probe_prompts.from_artifact(ref, insecure=True)


async def test_diffs_are_off_by_default(stack: Stack, start_router: RouterFactory,
                                        http: aiohttp.ClientSession) -> None:
    running = await start_router()
    async with http.get(running.url + "/quantrol/diffs", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 404


# ---- over HTTP: admission ------------------------------------------------------------------------------------


async def test_admission_answers_429_with_retry_after_beyond_the_bounds(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    stack.stable.behaviour.token_latency_s = 0.05  # 8 tokens: 0.4 s per request
    running = await start_router(admission={"stable": {"max_in_flight": 2, "max_queue": 2, "max_queue_wait_s": 1.0}})

    async def one() -> tuple[int, str | None]:
        async with http.post(running.url + "/v1/completions", json=completion()) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After")

    results = await asyncio.gather(*(one() for _ in range(8)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 4 + [429] * 4  # 2 in flight + 2 queued; the rest refused at once
    assert all(int(after) >= 1 for status, after in results if status == 429 and after is not None)
    assert stack.stable.stats.max_in_flight == 2

    # A queue wait beyond max_queue_wait_s is refused too, rather than waiting on.
    running.router.offer(parse_config(_config_text(
        2, stack.stable_url, stack.candidate_url,
        admission={"stable": {"max_in_flight": 1, "max_queue": 5, "max_queue_wait_s": 0.1}})), "test")
    results = await asyncio.gather(*(one() for _ in range(3)))
    assert sorted(s for s, _ in results) == [200, 429, 429]
    samples = await scrape(http, running.url)
    assert total(samples, "quantrol_router_errors_total", kind="admission_queue_full") == 4
    assert total(samples, "quantrol_router_errors_total", kind="admission_queue_timeout") == 2
    assert total(samples, "quantrol_router_queue_wait_seconds_count", arm="stable", traffic="live") == 5


# ---- over HTTP: configuration --------------------------------------------------------------------------------


async def _start_slow_stream(http: aiohttp.ClientSession, url: str) -> asyncio.Task[list[Any]]:
    async def run() -> list[Any]:
        async with http.post(url + "/v1/completions", json=completion(max_tokens=20, stream=True)) as r:
            assert r.status == 200
            return await read_sse(r)

    task = asyncio.create_task(run())
    await asyncio.sleep(0.15)  # the stream is flowing
    return task


async def test_file_reload_moves_traffic_without_dropping_a_stream(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    stack.stable.behaviour.token_latency_s = 0.04
    running = await start_router()
    stream = await _start_slow_stream(http, running.url)
    running.config_path.write_text(_config_text(2, stack.stable_url, stack.candidate_url,
                                                weights={"stable": 0, "candidate": 100}))

    async def applied() -> bool:
        return running.router.config.version == 2

    await eventually(applied)
    assert not stream.done()
    async with http.post(running.url + "/v1/completions", json=completion(max_tokens=1)) as r:
        assert r.status == 200
    assert stack.candidate.stats.requests["/v1/completions"] == 1
    events = await stream
    assert events[-1] == "[DONE]" and len([e for e in events if e != "[DONE]"]) == 20
    # An older file (the ConfigMap lagging an admin push) is not applied; SIGHUP forces a re-read.
    running.config_path.write_text(_config_text(1, stack.stable_url, stack.candidate_url))
    running.router._on_sighup()
    assert running.router.config.version == 2
    samples = await scrape(http, running.url)
    assert total(samples, "quantrol_router_config_version") == 2
    assert total(samples, "quantrol_router_weight", arm="candidate") == 100
    assert total(samples, "quantrol_router_config_updates_total", source="file", result="stale") >= 1


async def test_a_broken_config_file_keeps_the_applied_config(stack: Stack, start_router: RouterFactory,
                                                             http: aiohttp.ClientSession) -> None:
    running = await start_router()
    running.config_path.write_text("version: 2\narms: {stable: {url: not-a-url}}")
    running.router.reload_file(force=True)
    assert running.router.config.version == 1
    async with http.post(running.url + "/v1/completions", json=completion(max_tokens=1)) as r:
        assert r.status == 200


async def test_admin_endpoint_applies_in_milliseconds_and_checks_the_token(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    stack.stable.behaviour.token_latency_s = 0.04
    running = await start_router()
    new = _config_text(5, stack.stable_url, stack.candidate_url, weights={"stable": 0, "candidate": 100})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        async with http.post(running.url + "/quantrol/config", data=new, headers=headers) as r:
            assert r.status == 401
    assert running.router.config.version == 1

    stream = await _start_slow_stream(http, running.url)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    started = time.perf_counter()
    async with http.post(running.url + "/quantrol/config", data=new, headers=auth) as r:
        assert r.status == 200 and (await r.json()) == {"result": "apply", "applied_version": 5}
    assert time.perf_counter() - started < 0.05
    async with http.post(running.url + "/v1/completions", json=completion(max_tokens=1)) as r:
        assert r.status == 200
    assert stack.candidate.stats.requests["/v1/completions"] == 1
    events = await stream
    assert events[-1] == "[DONE]" and len(events) == 21

    async with http.get(running.url + "/quantrol/config", headers=auth) as r:
        assert (await r.json())["version"] == 5
    async with http.get(running.url + "/quantrol/config") as r:
        assert r.status == 401
    stale = _config_text(4, stack.stable_url, stack.candidate_url)
    async with http.post(running.url + "/quantrol/config", data=stale, headers=auth) as r:
        assert r.status == 409 and (await r.json())["result"] == "stale"
    async with http.post(running.url + "/quantrol/config", data="{not json", headers=auth) as r:
        assert r.status == 400
    assert total(await scrape(http, running.url), "quantrol_router_config_version") == 5


async def test_without_a_configured_token_the_admin_endpoint_is_closed(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    running = await start_router()
    running.router.admin_token = AdminToken(None, None)
    async with http.post(running.url + "/quantrol/config", data=_config_text(2),
                         headers={"Authorization": "Bearer "}) as r:
        assert r.status == 403


async def test_admin_token_file_is_reread_when_rotated(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    token = AdminToken(path)
    assert token.current() == "first"
    path.write_text("second")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert token.current() == "second"


# ---- over HTTP: metrics ------------------------------------------------------------------------------------------


async def test_latency_token_and_goodput_metrics_carry_arm_traffic_and_slice(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    stack.stable.behaviour.token_latency_s = 0.01
    running = await start_router(slices={"allowed": ["code"]})
    async with http.post(running.url + "/v1/completions", json=completion(max_tokens=5, stream=True),
                         headers={"X-Quantrol-Slice": "code"}) as r:
        await r.read()
    async with http.post(running.url + "/v1/completions", json=completion(max_tokens=5),
                         headers={"X-Quantrol-Slice": "unbounded-user-value"}) as r:
        await r.read()
    async with http.post(running.url + "/v1/completions", json=completion("short", max_tokens=3)) as r:
        await r.read()
    s = await scrape(http, running.url)
    live_code = {"arm": "stable", "traffic": "live", "slice": "code"}
    assert total(s, "quantrol_router_time_to_first_token_seconds_count", **live_code) == 1
    assert total(s, "quantrol_router_inter_token_latency_seconds_count", **live_code) == 4
    assert total(s, "quantrol_router_request_duration_seconds_count", **live_code) == 1
    assert total(s, "quantrol_router_time_per_output_token_seconds_count", **live_code) == 1
    assert total(s, "quantrol_router_output_tokens_total", **live_code) == 5
    assert total(s, "quantrol_router_deadline_output_tokens_total", deadline="interactive", **live_code) == 5
    assert total(s, "quantrol_router_output_tokens_total", slice="other") == 5
    assert total(s, "quantrol_router_output_tokens_total", slice="len_le_256") == 3
    assert total(s, "quantrol_router_requests_total", arm="stable", traffic="live", code="200") == 3
    assert total(s, "quantrol_router_in_flight", arm="stable", traffic="live") == 0
    assert total(s, "quantrol_router_weight", arm="stable") == 100
    assert ("quantrol_router_queued", frozenset({("arm", "stable")})) in s
    # A non-streamed client got one whole answer, streamed from the engine: its latencies are measured all the same.
    assert total(s, "quantrol_router_time_to_first_token_seconds_count", slice="len_le_256") == 1
    assert total(s, "quantrol_router_inter_token_latency_seconds_count", slice="len_le_256") == 2
    assert stack.stable.stats.requests["/v1/completions"] == 3 and stack.stable.stats.streamed == 3
    # Series appear when something is recorded in them, not before: no TTFT for a request the router could not
    # stream (prompt log-probabilities are refused with stream), and none in a slice before it had one.
    async with http.post(running.url + "/v1/completions", json=completion("whole", max_tokens=3, prompt_logprobs=1),
                         headers={"X-Quantrol-Slice": "code"}) as r:
        assert r.status == 200 and (await r.json())["choices"][0]["prompt_logprobs"]
    s = await scrape(http, running.url)
    assert total(s, "quantrol_router_time_to_first_token_seconds_count", **live_code) == 1
    assert not [key for key in s if key[0].startswith("quantrol_router_time_to_first_token_seconds")
                and ("slice", "len_le_1024") in key[1]]
