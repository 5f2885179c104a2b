"""One verifier for every download path: the serving pod's `fetch` and calibration's `pull` refuse the same hostile
or damaged artifacts, for the same reasons, and leave only verified files behind.

Everything runs against a real registry (Debian's docker-registry on 127.0.0.1, the `oci_registry` fixture). The
hostile manifests are written as an attacker would: blobs and a hand-written manifest PUT over plain HTTP, so no
client-side check of ours stands between the manifest and the code under test. Both paths run as the commands the
pods run (`quantrol-worker fetch`, `python -m quantrol_worker.calibrate pull`), in subprocesses; calibration's pull
imports no torch, so this environment's python runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quantrol_worker.contracts import CONFIG_MEDIA_TYPE
from quantrol_worker.oci import MANIFEST_MEDIA_TYPE, RECORD_FILE, STAGING_DIR, TITLE_ANNOTATION
from tests.test_bounded_http import serve_answers

REPO = Path(__file__).resolve().parents[1]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- writing artifacts the way an attacker would: plain HTTP, no client-side checks ---


def _http(method: str, url: str, body: bytes = b"", content_type: str = "application/octet-stream") -> Any:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    return _NO_PROXY.open(req, timeout=10)


def _put_blob(registry: Any, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with _http("POST", f"{registry.url}/v2/{repo}/blobs/uploads/") as started:
        location = started.headers["Location"]
    if location.startswith("/"):
        location = registry.url + location
    with _http("PUT", f"{location}{'&' if '?' in location else '?'}digest={digest}", data):
        pass
    return digest


def publish(registry: Any, repo: str, files: list[tuple[str, bytes]]) -> str:
    """One layer per (title, bytes), titled as given, whatever the title; returns `HOST/REPO@sha256:…`."""
    config = json.dumps({"files": [title for title, _ in files]}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": _put_blob(registry, repo, config), "size": len(config)},
        "layers": [
            {"mediaType": "application/octet-stream", "digest": _put_blob(registry, repo, data), "size": len(data),
             "annotations": {TITLE_ANNOTATION: title}}
            for title, data in files
        ],
    }
    body = json.dumps(manifest).encode()
    with _http("PUT", f"{registry.url}/v2/{repo}/manifests/v1", body, MANIFEST_MEDIA_TYPE):
        pass
    return f"{registry.address}/{repo}@sha256:{hashlib.sha256(body).hexdigest()}"


def corrupt(registry: Any, data: bytes) -> None:
    """Flip one byte of a blob in the registry's storage (same size); the registry serves it as it is."""
    hexdigest = hashlib.sha256(data).hexdigest()
    blob = Path(registry.storage_dir) / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    assert blob.is_file(), f"registry layout changed: {blob}"
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))


def model_files() -> list[tuple[str, bytes]]:
    """Unique bytes per test: the registry stores blobs by content, so a corrupted blob must be no one else's."""
    return [
        ("config.json", json.dumps({"architectures": ["LlamaForCausalLM"], "nonce": os.urandom(8).hex()}).encode()),
        ("model.safetensors", os.urandom(4096)),
        ("quantrol-report.json", json.dumps({"scheme": "W8A8", "nonce": os.urandom(8).hex()}).encode()),
    ]


# --- the two download paths, as the pods run them ---


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str | None
    message: str
    stderr: str


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "worker"), "NO_PROXY": "127.0.0.1,localhost"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def run_fetch(ref: str, dest: Path) -> Outcome:
    with tempfile.TemporaryDirectory() as scratch:  # away from dest: the tests list what lands around it
        term = Path(scratch) / "termination-log"
        proc = _run("-m", "quantrol_worker.cli", "fetch", "--ref", f"oci://{ref}", "--dest", str(dest), "--insecure",
                    "--termination-log", str(term))
        message = json.loads(term.read_text()) if term.is_file() else {}
    return Outcome(proc.returncode == 0, message.get("reason"), message.get("message", ""), proc.stderr)


def run_calibration_pull(ref: str, dest: Path) -> Outcome:
    proc = _run("-m", "quantrol_worker.calibrate", "pull", ref, "--out", str(dest), "--insecure")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    return Outcome(proc.returncode == 0 and bool(result.get("ok")), result.get("reason"), result.get("message", ""),
                   proc.stderr)


@dataclass(frozen=True)
class DownloadPath:
    run: Callable[[str, Path], Outcome]
    unusable: str  # the path's own reason for a reference or manifest that cannot be used
    mismatch: str


PATHS = {
    "fetch": DownloadPath(run_fetch, unusable="InvalidReference", mismatch="DigestMismatch"),
    # The calibration worker's vocabulary: an unusable base-model reference is its config's problem.
    "calibration-pull": DownloadPath(run_calibration_pull, unusable="InvalidConfig", mismatch="DigestMismatch"),
}


@pytest.fixture(params=sorted(PATHS))
def path(request: pytest.FixtureRequest) -> DownloadPath:
    return PATHS[request.param]


def _repo(request: pytest.FixtureRequest) -> str:
    """A repository name of its own per test case (the registry's names allow `[a-z0-9]` runs joined by `-`)."""
    name = request.node.name.lower()
    words = "".join(c if c.isascii() and c.isalnum() else " " for c in name).split()
    return "oci-tests/" + "-".join(words)[:50].strip("-") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _refused(outcome: Outcome, reason: str) -> None:
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert not outcome.ok and outcome.reason == reason, (outcome.reason, outcome.message, outcome.stderr[-2000:])


# --- the tests ---


@pytest.mark.stack
@pytest.mark.parametrize("title", [STAGING_DIR, RECORD_FILE])
def test_a_layer_titled_like_our_own_files_is_refused(
    path: DownloadPath, title: str, oci_registry: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ref = publish(oci_registry, _repo(request), [*model_files(), (title, b"not what it seems")])
    dest = tmp_path / "dest"
    outcome = path.run(ref, dest)
    _refused(outcome, path.unusable)
    assert "reserved" in outcome.message and repr(title) in outcome.message, outcome.message
    assert _listing(dest) == [], "refused before a single file was downloaded"


def test_two_layers_under_one_title_are_refused(
    path: DownloadPath, oci_registry: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each layer verifies against its own digest; which one would be the file is an accident of order."""
    ref = publish(oci_registry, _repo(request), [*model_files(), ("model.safetensors", os.urandom(4096))])
    dest = tmp_path / "dest"
    outcome = path.run(ref, dest)
    _refused(outcome, path.unusable)
    assert "'model.safetensors'" in outcome.message and "more than once" in outcome.message, outcome.message
    assert _listing(dest) == []


@pytest.mark.stack
@pytest.mark.parametrize("title", ["../x", "sub/x", "ABSOLUTE"])
def test_a_layer_title_that_escapes_the_folder_is_refused(
    path: DownloadPath, title: str, oci_registry: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    area = tmp_path / "area"
    dest = area / "dest"
    dest.mkdir(parents=True)
    if title == "ABSOLUTE":
        title = str(area / "x")
    ref = publish(oci_registry, _repo(request), [*model_files(), (title, b"#!/bin/sh\necho owned\n")])
    outcome = path.run(ref, dest)
    _refused(outcome, path.unusable)
    assert "unsafe" in outcome.message and repr(title) in outcome.message, outcome.message
    assert _listing(area) == ["dest"] and _listing(dest) == [], "nothing is written, inside the folder or out"


@pytest.mark.stack
def test_a_corrupted_blob_is_refused_and_only_verified_files_stay(
    path: DownloadPath, oci_registry: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    files = model_files()
    ref = publish(oci_registry, _repo(request), files)
    for title, data in files:
        if title != "config.json":  # the weights, and the report listed after them
            corrupt(oci_registry, data)
    dest = tmp_path / "dest"
    outcome = path.run(ref, dest)
    _refused(outcome, path.mismatch)
    assert "model.safetensors" in outcome.message, outcome.message
    published = dict(files)
    for entry in dest.iterdir():
        assert entry.name in published and entry.read_bytes() == published[entry.name], (
            f"{entry.name} is in the destination without matching the manifest"
        )


@pytest.mark.stack
def test_a_good_artifact_arrives_whole(
    path: DownloadPath, oci_registry: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    files = model_files()
    ref = publish(oci_registry, _repo(request), files)
    dest = tmp_path / "dest"
    outcome = path.run(ref, dest)
    assert outcome.ok, (outcome.reason, outcome.message, outcome.stderr[-2000:])
    for title, data in files:
        assert (dest / title).read_bytes() == data
    assert not (dest / STAGING_DIR).exists()


@pytest.mark.stack
def test_a_reader_of_named_files_brings_only_those_and_refuses_an_oversized_one(
    oci_registry: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The qualification Job reads an artifact's evaluation prompts and tokenizer, never its weights; a prompts layer
    the (tenant's) manifest sizes over the limit is refused before a byte of it is fetched."""
    from quantrol_worker import oci
    from quantrol_worker.contracts import EVALUATION_PROMPTS_FILE

    ref = publish(oci_registry, _repo(request), [*model_files(), (EVALUATION_PROMPTS_FILE, b"x" * 100)])
    _, brought = oci.pull(ref, tmp_path / "a", insecure=True, titles=frozenset({EVALUATION_PROMPTS_FILE}))
    assert [layer.title for layer in brought] == [EVALUATION_PROMPTS_FILE]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [EVALUATION_PROMPTS_FILE]
    with pytest.raises(oci.ArtifactError, match="100 bytes, over the 64-byte limit"):
        oci.pull(ref, tmp_path / "b", insecure=True, titles=frozenset({EVALUATION_PROMPTS_FILE}), max_layer_bytes=64)
    assert not (tmp_path / "b" / EVALUATION_PROMPTS_FILE).exists()


# --- a registry is the tenant's choice: one that never ends a manifest, or drips it, is cut off (issue 20, item 1) ---

PINNED = "@sha256:" + "0" * 64


@pytest.fixture
def endless_registry() -> Iterator[str]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: " + MANIFEST_MEDIA_TYPE.encode() + b"\r\n\r\n{")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn.sendall(b'"layers": [],' * 4096)

    for url in serve_answers(answer):
        yield url.removeprefix("http://").split("/", 1)[0]


@pytest.fixture
def dripping_registry() -> Iterator[str]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: " + MANIFEST_MEDIA_TYPE.encode() + b"\r\n\r\n")
        for _ in range(200):
            conn.sendall(b" ")
            time.sleep(0.3)

    for url in serve_answers(answer):
        yield url.removeprefix("http://").split("/", 1)[0]


def test_an_endless_manifest_is_refused_at_its_size_bound_on_the_pods_path(endless_registry: str,
                                                                          tmp_path: Path) -> None:
    """`quantrol-worker fetch`, as an arm's init step runs it, against a registry that streams a manifest forever:
    refused with a reason (not an out-of-memory kill), nothing left in the volume."""
    began = time.monotonic()
    outcome = run_fetch(f"{endless_registry}/models/x{PINNED}", tmp_path / "model")
    _refused(outcome, "InvalidReference")
    assert "larger than" in outcome.message and time.monotonic() - began < 60, outcome
    assert _listing(tmp_path / "model") == []


def test_a_dripping_manifest_is_cut_at_the_whole_reads_deadline(dripping_registry: str) -> None:
    """Each byte arrives well within any per-read timeout: only a bound on the whole read stops it."""
    from quantrol_worker import oci

    registry = oci.Registry(dripping_registry, insecure=True, credentials=None)
    response = registry.request(f"http://{dripping_registry}/v2/models/x/manifests/sha256:{'0' * 64}", "GET",
                                "manifest", stream=True)
    began = time.monotonic()
    with pytest.raises(oci.ArtifactError, match=r"not read within 1\.5 s"):
        oci.bounded_body(response, "manifest", seconds=1.5)
    assert time.monotonic() - began < 3
