"""The one load generator (quantrol_worker.fleet: GuideLLM with the fleet's request mix) against real HTTP.

The engines are stand-ins (quantrol_dev.standin: no model runs) because what is checked is what the fleet sends —
the mix, the slice header, the spread over endpoints, the bounds — which each stand-in counts as it arrives
(`/standin/stats`); GuideLLM itself is real, run in the serve environment as the demo and the benches run it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from quantrol_dev.demo.cluster import load_deployment, load_prompts_config_map
from quantrol_dev.demo.story import FLEET_PROMPTS, DemoSettings
from quantrol_dev.fleet import FleetProcess
from quantrol_dev.standin import standin_process
from quantrol_worker.cli import build_parser
from quantrol_worker.fleet import Mix, Prompt, endpoint, read_prompts, shape

pytestmark = pytest.mark.skipif(not os.environ.get("QUANTROL_SERVE_PYTHON"),
                                reason="QUANTROL_SERVE_PYTHON is unset: GuideLLM lives in the serve environment")

PROMPTS = [Prompt("The licence grants", "prose"), Prompt("def parse(self, text):", "code"), Prompt("no slice named")]


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/standin/stats", timeout=5) as rsp:
        return dict(json.load(rsp))


def test_the_mix_is_decided_per_request_and_every_endpoint_sees_all_of_it() -> None:
    mix = Mix()
    shapes = [shape(n, mix) for n in range(8)]
    assert sum(t > 0 for t, _ in shapes) == 4 and sum(not s for _, s in shapes) == 2
    # Sampled and unstreamed requests are not tied to one endpoint: each endpoint gets whole periods of the mix.
    for e in range(2):
        mine = [shapes[n] for n in range(8) if endpoint(n, mix, 2) == e]
        assert len(mine) == 4 and sum(t > 0 for t, _ in mine) == 2 and sum(not s for _, s in mine) == 1
    assert all(shape(n, Mix(sampled_every=0, unstreamed_every=0)) == (0.0, True) for n in range(8))


def test_an_open_loop_fleet_sends_the_mix_with_slice_headers_over_both_endpoints_and_stops_on_sigterm() -> None:
    with standin_process("m", token_latency=0.005) as one, standin_process("m", token_latency=0.005) as two:
        fleet = FleetProcess([one, two], "m", PROMPTS, seconds=300, max_tokens=6, rate=10).start()
        time.sleep(8)
        began = time.monotonic()
        ok, failed = fleet.stop()
        stopped_after = time.monotonic() - began
        engines = [stats(one), stats(two)]
    assert fleet.proc is not None and fleet.proc.returncode == 0, fleet.log()[-2000:]
    assert stopped_after < 30, f"SIGTERM took {stopped_after:.0f} s to end a 300 s run"
    assert "quantrol-load ok=" in fleet.log() and ok >= 40 and failed <= 3, (ok, failed)
    total = sum(e["requests"]["/v1/completions"] for e in engines)
    assert total >= ok
    for e in engines:
        n = e["requests"]["/v1/completions"]
        assert n >= total // 4, engines  # both endpoints carry load
        # GuideLLM's one worker process keeps the mix exact over whole periods (4 requests): ± one period.
        assert abs(e["sampled"] - n / 2) <= 4 and abs(n - e["streamed"] - n / 4) <= 4, e
        # Each request named the slice of its own prompt; the prompt without a slice went without the header.
        assert set(e["slices"]) == {"prose|The licence grants", "code|def parse(self, text):"}, e["slices"]
        assert sum(e["slices"].values()) < n


def test_a_closed_loop_fleet_keeps_its_clients_in_flight_and_ends_at_its_bound() -> None:
    """Two clients, each with one request in flight, against a slow engine: never more than two at once (an open
    loop would pile up), and two most of the time; `--seconds` ends the run on its own."""
    with standin_process("m", token_latency=0.1) as url:
        began = time.monotonic()
        fleet = FleetProcess([url], "m", PROMPTS, seconds=6, max_tokens=4, clients=2).start()
        assert fleet.proc is not None
        fleet.proc.wait(60)
        took = time.monotonic() - began
        engine = stats(url)
    ok, _ = fleet.counts()
    assert fleet.proc.returncode == 0 and took < 45, (took, fleet.log()[-2000:])
    assert engine["max_in_flight"] == 2, engine
    assert ok >= 6 and engine["requests"]["/v1/completions"] >= ok


def test_the_cluster_demos_fleet_pod_runs_a_command_the_worker_cli_takes(tmp_path: Path) -> None:
    """`quantrol demo --cluster` runs the fleet as a pod on the serving image: its command must parse, and its
    prompts (a ConfigMap mounted at /prompts) must read back with their slices."""
    deployment = load_deployment("ghcr.io/quantrol/serve:test", DemoSettings(output=tmp_path))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][0] == "quantrol-worker"
    args = build_parser().parse_args(container["command"][1:])
    assert args.command == "fleet" and args.rate > 0 and args.seconds > 0
    data = load_prompts_config_map()["data"]["prompts.jsonl"]
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert args.prompts.parent.as_posix() in mounted
    (tmp_path / "prompts.jsonl").write_text(data)
    assert read_prompts(tmp_path / "prompts.jsonl") == list(FLEET_PROMPTS)
