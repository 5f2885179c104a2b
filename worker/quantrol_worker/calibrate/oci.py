"""Push and pull model artifacts with oras, verifying every digest on the way back.

A pull fetches the manifest by digest and checks its sha256 against the reference, then checks every layer's
file against the digest and size the manifest lists: a corrupted blob in the registry is refused
(`Reason.DIGEST_MISMATCH`), never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantrol_worker.calibrate import WorkerError
from quantrol_worker.contracts import (
    ARTIFACT_TYPE,
    CONFIG_MEDIA_TYPE,
    FILE_MEDIA_TYPE,
    JSON_FILE_MEDIA_TYPE,
    REPORT_FILE,
    REPORT_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    Reason,
    Stage,
)
from quantrol_worker.fetch import sha256_file  # one digest routine for publishing and for verifying

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
_REF = re.compile(
    r"^(?P<host>[^/]+)/(?P<repo>[a-z0-9._\-/]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]*))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True)
class OciRef:
    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str) -> OciRef:
        ref = ref.removeprefix("oci://")
        m = _REF.match(ref)
        if not m:
            raise WorkerError(Reason.INVALID_CONFIG, f"not an OCI reference: {ref!r}", Stage.LOAD)
        return cls(m["host"], m["repo"], m["tag"], m["digest"])

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def pinned(self, digest: str) -> str:
        return f"{self.name}@{digest}"


def media_type_of(path: Path) -> str:
    if path.name == REPORT_FILE:
        return REPORT_MEDIA_TYPE
    if path.suffix == ".safetensors":
        return SAFETENSORS_MEDIA_TYPE
    if path.suffix == ".json":
        return JSON_FILE_MEDIA_TYPE
    return FILE_MEDIA_TYPE


def _client(host: str, insecure: bool) -> Any:
    import oras.client

    return oras.client.OrasClient(hostname=host, insecure=insecure)


def push(directory: Path, repository: str, *, insecure: bool, tag: str | None, annotations: dict[str, str]) -> str:
    """Push every file of `directory` as one layer each; returns `repo@sha256:…` of the manifest."""
    ref = OciRef.parse(repository if tag is None else f"{repository}:{tag}")
    target = f"{ref.name}:{ref.tag or 'latest'}"
    files = sorted(p for p in directory.iterdir() if p.is_file())
    client = _client(ref.host, insecure)
    with tempfile.TemporaryDirectory(prefix="quantrol-oci-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"artifactType": ARTIFACT_TYPE, "files": [p.name for p in files]}, sort_keys=True))
        try:
            response = client.push(
                target=target,
                files=[f"{p}:{media_type_of(p)}" for p in files],
                manifest_config=f"{config}:{CONFIG_MEDIA_TYPE}",
                manifest_annotations=annotations,
                disable_path_validation=True,
                quiet=True,
            )
        except Exception as exc:  # oras raises bare ValueError / requests errors
            raise WorkerError(Reason.PUBLISH_FAILED, f"push to {target} failed: {exc}", Stage.PUBLISH) from exc
    digest = response.headers.get("Docker-Content-Digest")
    if not digest:
        manifest = client.do_request(
            f"{client.prefix}://{ref.host}/v2/{ref.repository}/manifests/{ref.tag or 'latest'}",
            "GET",
            headers={"Accept": MANIFEST_MEDIA_TYPE},
        )
        digest = "sha256:" + hashlib.sha256(manifest.content).hexdigest()
    return ref.pinned(digest)


def fetch_manifest(ref: OciRef, insecure: bool) -> dict[str, Any]:
    """The manifest by digest, its bytes checked against the digest."""
    if ref.digest is None:
        raise WorkerError(Reason.INVALID_CONFIG, f"{ref.name}: pull by digest only (repo@sha256:…)", Stage.LOAD)
    client = _client(ref.host, insecure)
    url = f"{client.prefix}://{ref.host}/v2/{ref.repository}/manifests/{ref.digest}"
    try:
        response = client.do_request(url, "GET", headers={"Accept": MANIFEST_MEDIA_TYPE})
    except Exception as exc:
        raise WorkerError(Reason.BASE_MODEL_UNAVAILABLE, f"{ref.name}@{ref.digest}: {exc}", Stage.LOAD) from exc
    if response.status_code != 200:
        raise WorkerError(
            Reason.BASE_MODEL_UNAVAILABLE, f"{ref.name}@{ref.digest}: HTTP {response.status_code}", Stage.LOAD
        )
    actual = "sha256:" + hashlib.sha256(response.content).hexdigest()
    if actual != ref.digest:
        raise WorkerError(Reason.DIGEST_MISMATCH, f"manifest digest {actual} != {ref.digest}", Stage.LOAD)
    manifest: dict[str, Any] = json.loads(response.content)
    return manifest


def pull(reference: str, outdir: Path, *, insecure: bool) -> Path:
    """Pull `repo@sha256:…` into `outdir`, verifying the manifest and every file; returns `outdir`."""
    ref = OciRef.parse(reference)
    manifest = fetch_manifest(ref, insecure)
    outdir.mkdir(parents=True, exist_ok=True)
    client = _client(ref.host, insecure)
    try:
        client.pull(target=ref.pinned(ref.digest or ""), outdir=str(outdir))
    except Exception as exc:
        raise WorkerError(Reason.BASE_MODEL_UNAVAILABLE, f"pull {reference} failed: {exc}", Stage.LOAD) from exc
    for layer in manifest.get("layers", []):
        title = (layer.get("annotations") or {}).get("org.opencontainers.image.title") or layer["digest"]
        path = outdir / title
        if not path.is_file():
            raise WorkerError(Reason.DIGEST_MISMATCH, f"layer {title} missing after pull", Stage.LOAD)
        actual = sha256_file(path)
        size = path.stat().st_size
        if actual != layer["digest"] or size != layer.get("size", size):
            path.unlink()
            raise WorkerError(
                Reason.DIGEST_MISMATCH,
                f"blob {title}: digest {actual} ({size} bytes) != manifest "
                f"{layer['digest']} ({layer.get('size')} bytes)",
                Stage.LOAD,
            )
    return outdir
