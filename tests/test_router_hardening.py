# ruff: noqa: F811  (the fixtures imported from tests.test_router are what the test functions take by name)
"""The router against its clients and against whoever holds its admin token (issue 20, item 4): bodies bounded and
admitted before they are read, the admin API on its own port, arms only of the policy's namespace, versions only
from the operator's sequence. Real aiohttp servers on 127.0.0.1, the engine stand-in behind them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from quantrol_worker.router.app import AdminToken, Router
from quantrol_worker.router.config import MAX_VERSION_STEP, parse_config
from tests.test_router import (  # noqa: F401  (fixtures: pytest finds them by name in this module)
    TOKEN,
    RouterFactory,
    Stack,
    _config_text,
    completion,
    http,
    stack,
    start_router,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_a_body_over_the_limit_is_refused_unread(stack: Stack, start_router: RouterFactory,
                                                       http: aiohttp.ClientSession) -> None:
    running = await start_router()
    running.router.offer(parse_config(json.dumps({**json.loads(_config_text(2, stack.stable_url,
                                                                             stack.candidate_url)),
                                                  "max_body_bytes": 64 << 10})), "test")
    big = json.dumps(completion(prompt="x" * (80 << 10))).encode()
    async with http.post(running.url + "/v1/completions", data=big,
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413  # by Content-Length, before a byte of the body is read

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read, cut at the bound
        for _ in range(10):
            yield b"x" * (16 << 10)

    async with http.post(running.url + "/v1/completions", data=chunked()) as r:
        assert r.status == 413
    assert sum(stack.stable.stats.requests.values()) == 0  # nothing reached the engine
    async with http.post(running.url + "/v1/completions", json=completion()) as r:
        assert r.status == 200  # and the router still serves


async def test_a_full_arm_answers_429_before_the_body_arrives(stack: Stack, start_router: RouterFactory,
                                                              http: aiohttp.ClientSession) -> None:
    """Admission before reading: a client that sends headers and then drips its body never holds a queue place
    or a body buffer when the arm is full; it gets its 429 at once."""
    stack.stable.behaviour.token_latency_s = 0.2  # the one slot stays busy for ~1.6 s
    running = await start_router(admission={"stable": {"max_in_flight": 1, "max_queue": 0,
                                                       "max_queue_wait_s": 1.0}})
    busy = asyncio.create_task(http.post(running.url + "/v1/completions", json=completion()).__aenter__())
    await asyncio.sleep(0.3)

    async def drip() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        await asyncio.sleep(30)  # never finishes within the test
        yield b'"}'

    began = time.monotonic()
    async with http.post(running.url + "/v1/completions", data=drip(),
                         timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 429
    assert time.monotonic() - began < 2
    (await busy).release()


async def test_the_admin_api_lives_on_its_own_port_only(stack: Stack, http: aiohttp.ClientSession,
                                                        tmp_path: Path) -> None:
    router = Router(parse_config(_config_text(1, stack.stable_url, stack.candidate_url)),
                    admin_token=AdminToken(None, TOKEN))
    runners = [web.AppRunner(router.make_app(admin=False)), web.AppRunner(router.make_admin_app())]
    ports = []
    for runner in runners:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    try:
        inference, admin = (f"http://127.0.0.1:{p}" for p in ports)
        async with http.get(inference + "/quantrol/config", headers=AUTH) as r:
            assert r.status == 404  # what the Service exposes has no admin API, token or not
        async with http.get(admin + "/quantrol/config", headers=AUTH) as r:
            assert r.status == 200
        async with http.post(admin + "/v1/completions", json=completion()) as r:
            assert r.status == 404
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_pushed_arms_must_be_services_of_the_policys_namespace(stack: Stack,
                                                                     http: aiohttp.ClientSession) -> None:
    """Whoever holds the token cannot point an arm at a host of their choosing (collecting every prompt)."""
    router = Router(parse_config(_config_text(1, stack.stable_url, stack.candidate_url)),
                    admin_token=AdminToken(None, TOKEN), namespace="team-a")
    runner = web.AppRunner(router.make_admin_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/quantrol/config"  # type: ignore[union-attr]
    try:
        for foreign in ("http://collector.example.com:8000", "http://llama-abc.team-b.svc:8000",
                        "http://llama-abc.team-a.svc.evil.example.com:8000"):
            doc = _config_text(2, "http://llama-abc.team-a.svc:8000", foreign)
            async with http.post(url, data=doc, headers=AUTH) as r:
                assert r.status == 403, foreign
        assert router.config.version == 1
        own = _config_text(2, "http://llama-abc.team-a.svc:8000", "http://llama-def.team-a.svc.cluster.local:8000")
        async with http.post(url, data=own, headers=AUTH) as r:
            assert r.status == 200 and router.config.version == 2
    finally:
        await runner.cleanup()


async def test_a_version_jump_is_refused_and_later_pushes_still_apply(stack: Stack, start_router: RouterFactory,
                                                                      http: aiohttp.ClientSession) -> None:
    """`version: 2**62` would make every later push (a rollback included) look stale: refused, logged, counted."""
    running = await start_router(version=5)
    url = running.url + "/quantrol/config"
    async with http.post(url, data=_config_text(2 ** 62, stack.stable_url, stack.candidate_url), headers=AUTH) as r:
        assert r.status == 409 and (await r.json())["result"] == "jump"
    async with http.post(url, data=_config_text(5 + MAX_VERSION_STEP + 1, stack.stable_url, stack.candidate_url),
                         headers=AUTH) as r:
        assert r.status == 409
    async with http.post(url, data=_config_text(6, stack.stable_url, stack.candidate_url), headers=AUTH) as r:
        assert r.status == 200 and running.router.config.version == 6


# ---- shadow diffs (issue 20, item 6) ------------------------------------------------------------------------------


def _sample(at: float) -> Any:
    from quantrol_worker.router import compare

    return compare.DiffSample(at=at, endpoint="/v1/completions", slice="other", prompt="p", stable="a",
                              candidate="b", agreement=0.5, first_divergence=1, quality_delta=None)


async def test_diffs_are_dropped_when_the_candidate_leaves_and_after_their_retention(
        stack: Stack, start_router: RouterFactory, http: aiohttp.ClientSession) -> None:
    from quantrol_worker.router import compare

    running = await start_router(version=1, diffs={"enabled": True, "retention_s": 60})
    running.router.diffs.add(_sample(compare.now() - 120))  # past its retention
    running.router.diffs.add(_sample(compare.now()))
    async with http.get(running.url + "/quantrol/diffs", headers=AUTH) as r:
        assert r.status == 200 and len((await r.json())["samples"]) == 1
    assert len(running.router.diffs.items()) == 1  # the old one is gone, not only hidden
    rollback = json.loads(_config_text(2, stack.stable_url, stack.candidate_url, diffs={"enabled": True}))
    rollback["arms"].pop("candidate")
    rollback["mirror_fraction"] = 0.0
    assert running.router.offer(parse_config(json.dumps(rollback)), "admin") == "apply"
    assert running.router.diffs.items() == []


def test_default_redaction_covers_what_prompts_carry() -> None:
    from quantrol_worker.contracts import DEFAULT_REDACT_PATTERNS
    from quantrol_worker.router import compare

    patterns = compare.compile_patterns(list(DEFAULT_REDACT_PATTERNS))
    secrets = {"e-mail": "mail jane.doe@example.com now", "phone": "call +1 415-555-0132 today",
               "card": "card 4111 1111 1111 1111 ok", "key": "use sk-live_0123456789abcdefghij please",
               "token": "Authorization: Bearer abc.def.ghi", "jwt": "t=eyJhbGciOiJI.eyJzdWIiOiIx.SflKxwRJSMeKKF2QT4",
               "aws": "AKIAIOSFODNN7EXAMPLE here", "ipv4": "from 10.12.0.7 at",
               "ipv6": "from fe80:0:0:0:202:b3ff:fe1e:8329"}
    for kind, text in secrets.items():
        redacted = compare.redact(text, patterns, 10_000)
        assert compare.REDACTED in redacted, kind
    assert compare.redact("the answer is 42 and 2024", patterns, 100) == "the answer is 42 and 2024"


def test_diff_bounds_have_ceilings_and_the_spec_reaches_the_router() -> None:
    import pydantic

    from quantrol_operator.api.servingpolicy import ServingPolicySpec, ShadowDiffs
    from quantrol_operator.children import router as router_children
    from quantrol_worker.router.config import DiffsConfig

    for too_much in ({"capacity": 10_000}, {"max_chars": 100_000}, {"retention_s": 30 * 86400}):
        with pytest.raises(pydantic.ValidationError):
            DiffsConfig(**too_much)
    with pytest.raises(pydantic.ValidationError):
        ShadowDiffs(max_samples=5000)
    spec = ServingPolicySpec.model_validate({
        "baseline": {"artifact": "oci://r.example.com/m@sha256:" + "a" * 64},
        "candidate": {"artifact": "oci://r.example.com/m@sha256:" + "b" * 64},
        "rollout": {"shadow": {"diffs": {"enabled": True, "maxSamples": 7, "redactPatterns": ["ticket-\\d+"]}}}})
    config = router_children.router_config("p", "ns", spec, "oci://s@sha256:" + "a" * 64, None, 100, 0, 0.0, 1)
    assert config.diffs.enabled and config.diffs.capacity == 7 and config.diffs.redact_patterns[-1] == "ticket-\\d+"
    assert not router_children.router_config("p", "ns", ServingPolicySpec.model_validate(
        {"baseline": spec.baseline.to_wire(), "candidate": spec.candidate.to_wire()}), "oci://s@sha256:" + "a" * 64,
        None, 100, 0, 0.0, 1).diffs.enabled  # off by default
