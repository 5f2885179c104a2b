"""Smoke tests proving that the local stack's Prometheus and OCI registry are real servers.

Each test talks to the server only over its network API, with the client libraries the operator and the
worker use (prometheus-api-client, oras), and every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from oras.client import OrasClient
from prometheus_api_client import PrometheusConnect
from prometheus_client import CollectorRegistry, Counter, start_http_server

from quantrol_dev.localstack.procs import LOOPBACK, free_port, port_is_open, wait_until
from quantrol_dev.localstack.prometheus import PrometheusServer, TargetGroup
from quantrol_dev.localstack.registry import RegistryServer

pytestmark = pytest.mark.stack

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # never route 127.0.0.1 through a proxy from the environment
    return session


def _instant_value(client: PrometheusConnect, query: str) -> float | None:
    result = client.custom_query(query)
    if not result:
        return None
    return float(result[0]["value"][1])


def test_prometheus_scrapes_a_live_exporter(prometheus: PrometheusServer) -> None:
    registry = CollectorRegistry()
    counter = Counter("quantrol_smoke_requests", "Requests counted by the smoke test.", registry=registry)
    port = free_port()
    exporter, thread = start_http_server(port, addr=LOOPBACK, registry=registry)
    address = f"{LOOPBACK}:{port}"
    client = PrometheusConnect(url=prometheus.url, disable_ssl=True)
    query = f'quantrol_smoke_requests_total{{instance="{address}", role="smoke"}}'
    try:
        counter.inc(3)
        # Added at runtime through file_sd, as serving pods will be: applied on Prometheus's 5 s tick.
        prometheus.set_file_sd_targets([TargetGroup([address], {"role": "smoke"})])
        wait_until(lambda: _instant_value(client, query) == 3.0, timeout=30, interval=0.25, what="first scrape")
        # A second value proves the scrapes are live, not one cached sample.
        counter.inc(2)
        wait_until(lambda: _instant_value(client, query) == 5.0, timeout=10, interval=0.25, what="next scrape")
    finally:
        prometheus.set_file_sd_targets([])
        exporter.shutdown()
        exporter.server_close()
        thread.join(timeout=5)


def _openmetrics(name: str, samples: list[tuple[float, float]], labels: str) -> str:
    lines = [f"# TYPE {name} gauge"]
    lines += [f"{name}{{{labels}}} {value} {ts}" for ts, value in samples]
    return "\n".join(lines) + "\n# EOF\n"


def _raw_samples(client: PrometheusConnect, selector: str, at: float) -> list[tuple[float, float]]:
    # A range-vector selector returns the stored samples with their own timestamps (no step alignment).
    result = client.custom_query(f"{selector}[3h]", params={"time": at})
    assert len(result) == 1, result
    return [(float(ts), float(value)) for ts, value in result[0]["values"]]


def test_backfilled_series_come_back_exactly(prometheus_factory: Callable[..., PrometheusServer]) -> None:
    now = time.time()
    base = float(int(now) - 3600)  # in the past, so the blocks never overlap the live head
    before_start = [(base + 0.25, 0.5), (base + 15.5, 1.25), (base + 30.0, 2.0), (base + 45.75, 40.125)]
    server = prometheus_factory(
        backfill=_openmetrics("quantrol_smoke_latency_seconds", before_start, 'model="m",phase="pre"'),
        file_sd=False,
    )
    client = PrometheusConnect(url=server.url, disable_ssl=True)
    selector = 'quantrol_smoke_latency_seconds{model="m",phase="pre"}'
    assert _raw_samples(client, selector, now) == before_start

    # Backfilling a running server: blocks are only seen after a restart (done by backfill()).
    after_start = [(base + 60.0, 7.0), (base + 75.125, 9.5)]
    port = server.port
    server.backfill(_openmetrics("quantrol_smoke_latency_seconds", after_start, 'model="m",phase="post"'))
    assert server.port == port
    post = 'quantrol_smoke_latency_seconds{model="m",phase="post"}'
    assert _raw_samples(client, post, now) == after_start
    assert _raw_samples(client, selector, now) == before_start


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_oras_push_and_pull_by_digest(oci_registry: RegistryServer, tmp_path: Path) -> None:
    payload = b"quantrol smoke artifact\n" + bytes(range(256)) * 16
    source = tmp_path / "weights.bin"
    source.write_bytes(payload)
    repo = "quantrol/smoke"
    client = OrasClient(hostname=oci_registry.address, insecure=True)

    response = client.push(
        target=f"{oci_registry.address}/{repo}:v1", files=[str(source)], disable_path_validation=True
    )
    digest = response.headers["Docker-Content-Digest"]
    assert digest.startswith("sha256:")

    http = _http()
    raw = http.get(f"{oci_registry.url}/v2/{repo}/manifests/{digest}", headers={"Accept": OCI_MANIFEST}, timeout=10)
    assert raw.status_code == 200
    assert _sha256(raw.content) == digest  # the manifest is content-addressed

    manifest = client.get_manifest(f"{oci_registry.address}/{repo}@{digest}")
    [layer] = manifest["layers"]
    assert layer["digest"] == _sha256(payload)
    assert layer["size"] == len(payload)

    pulled = client.pull(target=f"{oci_registry.address}/{repo}@{digest}", outdir=str(tmp_path / "pulled"))
    assert [Path(p).name for p in pulled] == ["weights.bin"]
    assert Path(pulled[0]).read_bytes() == payload

    blob = http.get(f"{oci_registry.url}/v2/{repo}/blobs/{layer['digest']}", timeout=10)
    assert blob.status_code == 200
    assert blob.content == payload
    assert blob.headers["Docker-Content-Digest"] == layer["digest"]


def test_registry_refuses_wrong_digests(oci_registry: RegistryServer) -> None:
    http = _http()
    repo = "quantrol/refusals"
    unknown = _sha256(b"never pushed")
    client = OrasClient(hostname=oci_registry.address, insecure=True)
    with pytest.raises(ValueError, match="Not Found"):
        client.get_manifest(f"{oci_registry.address}/{repo}@{unknown}")
    assert http.get(f"{oci_registry.url}/v2/{repo}/blobs/{unknown}", timeout=10).status_code == 404

    # An upload whose bytes do not hash to the digest it claims is rejected (DIGEST_INVALID).
    start = http.post(f"{oci_registry.url}/v2/{repo}/blobs/uploads/", timeout=10)
    assert start.status_code == 202
    location = start.headers["Location"]
    if location.startswith("/"):
        location = oci_registry.url + location
    put = http.put(
        location,
        params={"digest": _sha256(b"claimed")},
        data=b"actual bytes",
        headers={"Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert put.status_code == 400
    assert put.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert http.get(f"{oci_registry.url}/v2/{repo}/blobs/{_sha256(b'actual bytes')}", timeout=10).status_code == 404


def _processes_naming(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked
            continue
        if str(path).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_stop_closes_ports_and_leaves_no_process(
    prometheus_factory: Callable[..., PrometheusServer],
    oci_registry_factory: Callable[..., RegistryServer],
) -> None:
    prom = prometheus_factory()
    reg = oci_registry_factory()
    servers = [(prom.port, prom.process, prom.config_path), (reg.port, reg.process, reg.config_path)]
    for port, process, config in servers:
        assert process is not None and process.alive()
        assert port_is_open(port)
        assert _processes_naming(config) == [process.pid]

    prom.stop()
    reg.stop()

    for port, process, config in servers:
        assert process is not None
        assert not process.alive()
        assert not port_is_open(port)
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)  # nothing is left in the server's process group
        assert _processes_naming(config) == []
