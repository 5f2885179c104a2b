"""`quantrol-worker fetch`: pull by digest, verify every byte, refuse on any mismatch.

oci:// tests push with `quantrol_worker.oci.push` (the layout calibration publishes and fetch must read) to a real
registry (Debian's docker-registry on 127.0.0.1, the `oci_registry` fixture) and corrupt blobs in its storage
directory, which the registry then serves as they are. file:// tests need nothing. Hostile manifests, and the
same refusals seen from calibration's pull, are in test_oci.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from quantrol_worker.fetch import fetch
from quantrol_worker.oci import RECORD_FILE, ArtifactError, ArtifactReason

REPO = Path(__file__).resolve().parents[1]


def _model_dir(root: Path) -> Path:
    src = root / "artifact"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (src / "model.safetensors").write_bytes(os.urandom(4096))
    (src / "quantrol-report.json").write_text(json.dumps({"scheme": "W8A8"}))
    return src


def _manifest(src: Path) -> dict[str, Any]:
    layers = []
    for p in sorted(src.iterdir()):
        data = p.read_bytes()
        layers.append({"mediaType": "application/octet-stream", "size": len(data),
                       "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                       "annotations": {"org.opencontainers.image.title": p.name}})
    return {"schemaVersion": 2, "layers": layers}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "worker"), "NO_PROXY": "127.0.0.1,localhost"}
    return subprocess.run([sys.executable, "-m", "quantrol_worker.cli", "fetch", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


# --- file:// ---


def test_file_ref_with_manifest_is_verified_and_pinned(tmp_path: Path) -> None:
    src = _model_dir(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_manifest(src)))
    digest = "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    dest, term = tmp_path / "dest", tmp_path / "term"
    proc = cli("--ref", f"file://{src}@{digest}", "--dest", str(dest), "--manifest", str(manifest),
               "--termination-log", str(term))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted([*(p.name for p in src.iterdir()), RECORD_FILE])
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert json.loads(term.read_text())["reason"] == "Succeeded"


def test_file_ref_refuses_a_tampered_file(tmp_path: Path) -> None:
    src = _model_dir(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_manifest(src)))
    (src / "model.safetensors").write_bytes(os.urandom(4096))  # same size, different bytes
    term = tmp_path / "term"
    proc = cli("--ref", f"file://{src}", "--dest", str(tmp_path / "dest"), "--manifest", str(manifest),
               "--termination-log", str(term))
    assert proc.returncode != 0
    message = json.loads(term.read_text())
    assert message["reason"] == "DigestMismatch" and "model.safetensors" in message["message"]
    assert not (tmp_path / "dest" / "model.safetensors").exists()  # unverified bytes are not left for vLLM
    assert "refusing to start: DigestMismatch" in proc.stderr


def test_file_ref_refuses_a_manifest_that_does_not_match_the_pin(tmp_path: Path) -> None:
    src = _model_dir(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_manifest(src)))
    with pytest.raises(ArtifactError) as err:
        fetch(f"file://{src}@sha256:{'0' * 64}", tmp_path / "dest", manifest=manifest)
    assert err.value.reason is ArtifactReason.DIGEST_MISMATCH


def test_file_ref_symlinks_after_checking_the_source(tmp_path: Path) -> None:
    src = _model_dir(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_manifest(src)))
    fetch(f"file://{src}", tmp_path / "dest", manifest=manifest, symlink=True)
    assert (tmp_path / "dest" / "config.json").resolve() == (src / "config.json").resolve()


def test_unsafe_layer_titles_are_refused(tmp_path: Path) -> None:
    src = _model_dir(tmp_path)
    body = _manifest(src)
    body["layers"][0]["annotations"]["org.opencontainers.image.title"] = "../escape"
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(body))
    with pytest.raises(ArtifactError) as err:
        fetch(f"file://{src}", tmp_path / "dest", manifest=manifest)
    assert err.value.reason is ArtifactReason.INVALID_REFERENCE


def test_file_ref_without_manifest_copies_and_says_unverified(tmp_path: Path) -> None:
    src = _model_dir(tmp_path)
    proc = cli("--ref", f"file://{src}", "--dest", str(tmp_path / "dest"), "--termination-log", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    assert "UNVERIFIED local artifact" in proc.stderr


# --- oci:// against a real registry ---


@pytest.fixture
def pushed(oci_registry: Any, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, Path]:
    from quantrol_worker.oci import push

    src = _model_dir(tmp_path)
    repo = f"{oci_registry.address}/fetch/{request.node.name.replace('_', '-')[:40]}"
    ref = push(src, repo, insecure=True, tag="v1", annotations={"org.opencontainers.image.title": "tiny"})
    return ref, src


@pytest.mark.stack
def test_oci_pull_by_digest_verifies_every_file(pushed: tuple[str, Path], tmp_path: Path) -> None:
    ref, src = pushed
    dest, term = tmp_path / "dest", tmp_path / "term"
    proc = cli("--ref", f"oci://{ref}", "--dest", str(dest), "--insecure", "--termination-log", str(term))
    assert proc.returncode == 0, proc.stderr
    for p in src.iterdir():
        assert (dest / p.name).read_bytes() == p.read_bytes()
    record = json.loads((dest / RECORD_FILE).read_text())
    assert record["ref"] == ref and len(record["files"]) == 3
    assert not (dest / ".partial").exists()
    # An init-container restart keeps what is already there and verified.
    again = cli("--ref", f"oci://{ref}", "--dest", str(dest), "--insecure", "--termination-log", str(term))
    assert again.returncode == 0 and again.stderr.count("already present and verified") == 3


@pytest.mark.stack
def test_oci_tag_only_reference_is_refused(pushed: tuple[str, Path], tmp_path: Path) -> None:
    ref, _ = pushed
    term = tmp_path / "term"
    tagged = ref.split("@")[0] + ":v1"
    proc = cli("--ref", f"oci://{tagged}", "--dest", str(tmp_path / "dest"), "--insecure",
               "--termination-log", str(term))
    assert proc.returncode != 0
    message = json.loads(term.read_text())
    assert message["reason"] == "InvalidReference" and "tag-only" in message["message"]


@pytest.mark.stack
def test_oci_corrupted_blob_is_refused(pushed: tuple[str, Path], tmp_path: Path, oci_registry: Any) -> None:
    ref, src = pushed
    data = (src / "model.safetensors").read_bytes()
    hexdigest = hashlib.sha256(data).hexdigest()
    blob = Path(oci_registry.storage_dir) / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    assert blob.is_file(), f"registry layout changed: {blob}"
    blob.write_bytes(os.urandom(len(data)))
    term = tmp_path / "term"
    proc = cli("--ref", f"oci://{ref}", "--dest", str(tmp_path / "dest"), "--insecure",
               "--termination-log", str(term))
    assert proc.returncode != 0
    message = json.loads(term.read_text())
    assert message["reason"] == "DigestMismatch" and "model.safetensors" in message["message"]
    assert not (tmp_path / "dest" / "model.safetensors").exists()


@pytest.mark.stack
def test_oci_unknown_digest_is_unavailable(pushed: tuple[str, Path], tmp_path: Path) -> None:
    ref, _ = pushed
    missing = ref.split("@")[0] + "@sha256:" + "1" * 64
    with pytest.raises(ArtifactError) as err:
        fetch(f"oci://{missing}", tmp_path / "dest", insecure=True)
    assert err.value.reason is ArtifactReason.ARTIFACT_UNAVAILABLE


@pytest.mark.stack
def test_oversized_artifact_refused_before_any_download(pushed: tuple[str, Path],
                                                         tmp_path: Path) -> None:
    """--max-bytes is the model volume's size (the pod's sizeLimit or claim): the manifest's sizes decide at once."""
    ref, src = pushed
    size = sum(p.stat().st_size for p in src.iterdir())
    dest, term = tmp_path / "dest", tmp_path / "term"
    proc = cli("--ref", f"oci://{ref}", "--dest", str(dest), "--insecure", "--termination-log", str(term),
               "--max-bytes", str(size - 1))
    assert proc.returncode != 0
    message = json.loads(term.read_text())
    assert message["reason"] == "InsufficientStorage" and f"take {size} bytes" in message["message"]
    assert not dest.exists() or not [p for p in dest.rglob("*") if p.is_file()]  # not a byte downloaded
    fits = cli("--ref", f"oci://{ref}", "--dest", str(dest), "--insecure", "--termination-log", str(term),
               "--max-bytes", str(size))
    assert fits.returncode == 0, fits.stderr


# --- the launcher's delivery into a stock engine image ---


def test_install_launcher_delivers_a_package_another_python_runs(tmp_path: Path) -> None:
    """The `launcher` init step copies the package; the engine container's python runs it from there alone (here:
    with this repository off the path, as in a stock vLLM image that never installed Quantrol)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "worker")}
    dest = tmp_path / "opt-quantrol"
    copied = subprocess.run([sys.executable, "-m", "quantrol_worker.cli", "install-launcher", "--dest", str(dest)],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert copied.returncode == 0, copied.stderr
    assert (dest / "quantrol_worker" / "serve" / "launcher.py").is_file()
    assert not list(dest.rglob("__pycache__")) and not list(dest.glob(".*partial"))
    isolated = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(dest)}
    probe = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path[:0] = [sys.argv[1]]; "
                            "import quantrol_worker.serve.main as m; print(m.__file__)", str(dest)],
                           capture_output=True, text=True, env=isolated, timeout=60, check=False)
    assert probe.returncode == 0 and probe.stdout.startswith(str(dest)), probe.stderr
    helped = subprocess.run([sys.executable, "-m", "quantrol_worker", "serve", "--help"], capture_output=True,
                            text=True, env=isolated, cwd=tmp_path, timeout=60, check=False)
    assert helped.returncode == 0 and "--status-port" in helped.stdout, helped.stderr
