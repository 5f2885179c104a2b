"""Model artifacts in an OCI registry: publish a folder, and bring one back by digest with every byte verified.

The layout (what `push` writes and every reader expects): one layer per file, titled by
`org.opencontainers.image.title`, with the media types of `quantrol_worker.contracts`, and a small config blob.

Every download path (the serving pod's `fetch`, calibration's base-model pull and `python -m
quantrol_worker.calibrate pull`) goes through one verifier, because the manifest comes from a registry a tenant may
control:
- the manifest is fetched by digest and its bytes hashed against that digest (a tag can move, a digest cannot);
- each layer's title must be a plain file name that is not one of ours: empty, `.`, `..`, anything with `/`,
  `\\` or NUL, and the names this module and `fetch` write into the destination (`RESERVED_TITLES`) are refused,
  not sanitised, before a byte is downloaded;
- each file is downloaded into the staging folder inside the destination, its sha256 and size checked against
  the manifest, and only then renamed into place (same file system, so atomic): the destination only ever holds
  verified files, also after a failure halfway.

Errors carry an `ArtifactReason` (the values of `fetch`'s termination message); callers map them to their own
vocabulary. Torch-free and stdlib-only at import time (the worker's CLI imports `fetch` to build its parser);
oras is imported when a registry is contacted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger("quantrol.oci")

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE_ANNOTATION = "org.opencontainers.image.title"
RECORD_FILE = ".quantrol-fetch.json"  # `fetch` writes what it fetched here, for whoever debugs the pod later
STAGING_DIR = ".partial"  # downloads land here until verified
RESERVED_TITLES = frozenset({RECORD_FILE, STAGING_DIR})

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REF = re.compile(
    r"^(?P<host>[^/]+)/(?P<repo>[a-z0-9._\-/]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]*))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


class ArtifactReason(StrEnum):
    """Why an artifact was refused (CamelCase, like condition reasons; `fetch` writes them as they are)."""

    DIGEST_MISMATCH = "DigestMismatch"  # bytes differ from the digest or size that pins them
    INVALID_REFERENCE = "InvalidReference"  # the reference or the manifest it names cannot be used as is
    ARTIFACT_UNAVAILABLE = "ArtifactUnavailable"  # the registry or the source could not deliver


class ArtifactError(Exception):
    def __init__(self, reason: ArtifactReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class OciRef:
    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, reference: str) -> OciRef:
        m = _REF.match(reference.removeprefix("oci://"))
        if not m:
            raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"not an OCI reference: {reference!r}")
        return cls(m["host"], m["repo"], m["tag"], m["digest"])

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def pinned(self, digest: str) -> str:
        return f"{self.name}@{digest}"


@dataclass(frozen=True)
class Layer:
    """One file of an artifact, as its manifest pins it (`digest` is empty only for an unverified local copy)."""

    title: str
    digest: str
    size: int | None


# --- the verifier ---


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_title(title: str, digest: str) -> None:
    """A title becomes a file name in the destination: anything that could land elsewhere (an absolute path
    contains `/`), or on one of our own files, is refused rather than sanitised (a sanitised name would no longer
    be what the manifest says)."""
    if not title or title in (".", "..") or any(c in title for c in "/\\\0"):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE,
                            f"layer {digest} has an unsafe or missing title {title!r}: it must be a plain file name")
    if title in RESERVED_TITLES:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE,
                            f"layer {digest} is titled {title!r}, a name reserved for quantrol-worker's own files "
                            f"in the destination ({', '.join(sorted(RESERVED_TITLES))})")


def _layer(raw: Any) -> Layer:
    if not isinstance(raw, dict):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"a manifest layer is not an object: {raw!r:.80}")
    digest = str(raw.get("digest", ""))
    if not _DIGEST.match(digest):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"layer digest {digest!r:.80} is not a sha256 digest")
    annotations = raw.get("annotations")
    title = str((annotations if isinstance(annotations, dict) else {}).get(TITLE_ANNOTATION) or "")
    check_title(title, digest)
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"layer {title!r} has an invalid size {size!r:.40}")
    return Layer(title, digest, size)


def layers_of(manifest: Any) -> list[Layer]:
    """The manifest's file layers, every title checked (`check_title`) before anything is downloaded."""
    raw_layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(raw_layers, list):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, "the manifest has no list of layers")
    layers = [_layer(raw) for raw in raw_layers]
    if not layers:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, "the manifest lists no files")
    return layers


def check_file(path: Path, layer: Layer) -> None:
    actual = sha256_file(path)
    size = path.stat().st_size
    if actual != layer.digest or (layer.size is not None and size != layer.size):
        raise ArtifactError(
            ArtifactReason.DIGEST_MISMATCH,
            f"{layer.title}: got {actual} ({size} bytes), the manifest pins {layer.digest} ({layer.size} bytes)",
        )


def is_verified(path: Path, layer: Layer) -> bool:
    if not path.is_file() or (layer.size is not None and path.stat().st_size != layer.size):
        return False
    return sha256_file(path) == layer.digest


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A fresh staging folder inside `dest` (same file system: the final rename is atomic), always removed after."""
    staging = dest / STAGING_DIR
    _remove(staging)  # leftovers of an interrupted run were never verified
    staging.mkdir()
    try:
        yield staging
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def install_verified(layers: list[Layer], dest: Path, obtain: Callable[[Layer, Path], None]) -> None:
    """Put every layer's file into `dest`: `obtain(layer, path)` writes its bytes to a staging path, which is
    verified and then renamed into place. Files already in `dest` with the right digest are kept (an init
    container restart does not download a model twice)."""
    dest.mkdir(parents=True, exist_ok=True)
    with _staging(dest) as staging:
        for i, layer in enumerate(layers, 1):
            final = dest / layer.title
            if is_verified(final, layer):
                log.info("[%d/%d] %s already present and verified", i, len(layers), layer.title)
                continue
            log.info("[%d/%d] fetching %s (%s, %s bytes)", i, len(layers), layer.title, layer.digest, layer.size)
            tmp = staging / layer.title
            obtain(layer, tmp)
            check_file(tmp, layer)
            os.replace(tmp, final)


# --- the registry ---


def _client(host: str, insecure: bool) -> Any:
    import oras.client

    return oras.client.OrasClient(hostname=host, insecure=insecure)


def fetch_manifest(ref: OciRef, *, insecure: bool) -> dict[str, Any]:
    """The manifest `ref` pins by digest, its bytes checked against that digest. A tag-only reference is refused:
    a tag can move under a running rollout, a digest cannot."""
    if ref.digest is None:
        raise ArtifactError(
            ArtifactReason.INVALID_REFERENCE,
            f"{ref.name}: refusing a tag-only reference; pin the artifact by digest (oci://REPO@sha256:...)",
        )
    client = _client(ref.host, insecure)
    url = f"{client.prefix}://{ref.host}/v2/{ref.repository}/manifests/{ref.digest}"
    try:
        response = client.do_request(url, "GET", headers={"Accept": MANIFEST_MEDIA_TYPE})
    except Exception as exc:  # oras/requests raise bare ValueError / ConnectionError
        raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"{ref.pinned(ref.digest)}: {exc}") from exc
    if response.status_code != 200:
        raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE,
                            f"{ref.pinned(ref.digest)}: HTTP {response.status_code}")
    actual = "sha256:" + hashlib.sha256(response.content).hexdigest()
    if actual != ref.digest:
        raise ArtifactError(ArtifactReason.DIGEST_MISMATCH, f"manifest digest {actual} != {ref.digest}")
    try:
        manifest = json.loads(response.content)
    except ValueError as exc:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"{ref.pinned(ref.digest)} is not JSON") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"{ref.pinned(ref.digest)} is not a manifest")
    return manifest


def pull(
    reference: str, dest: Path, *, insecure: bool, titles: frozenset[str] | None = None,
    max_layer_bytes: int | None = None,
) -> tuple[str, list[Layer]]:
    """Bring `oci://REPO@sha256:…` into `dest`, verified; returns the pinned reference and the layers brought.
    `titles`: only the files of these names (a reader of the report or the evaluation prompts needs no weights);
    a name the artifact does not hold is simply not brought, the caller decides what its absence means.
    `max_layer_bytes`: a layer the manifest sizes above it (or does not size) is refused before a byte is fetched."""
    ref = OciRef.parse(reference)
    manifest = fetch_manifest(ref, insecure=insecure)
    assert ref.digest is not None  # fetch_manifest refuses tag-only references
    layers = [layer for layer in layers_of(manifest) if titles is None or layer.title in titles]
    for layer in layers:
        if max_layer_bytes is not None and (layer.size is None or layer.size > max_layer_bytes):
            raise ArtifactError(ArtifactReason.INVALID_REFERENCE,
                                f"layer {layer.title!r} is {layer.size} bytes, over the {max_layer_bytes}-byte limit")
    client = _client(ref.host, insecure)

    def download(layer: Layer, path: Path) -> None:
        try:
            client.download_blob(ref.name, layer.digest, str(path))
        except Exception as exc:  # oras/requests raise bare HTTPError / ConnectionError
            raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE,
                                f"blob {layer.title} ({layer.digest}): {exc}") from exc

    install_verified(layers, dest, download)
    return ref.pinned(ref.digest), layers


def media_type_of(path: Path) -> str:
    # Imported here, not at the top: pydantic would make every `quantrol-worker` parse pay for a push-only need.
    from quantrol_worker.contracts import (
        EVALUATION_PROMPTS_FILE,
        EVALUATION_PROMPTS_MEDIA_TYPE,
        FILE_MEDIA_TYPE,
        JSON_FILE_MEDIA_TYPE,
        REPORT_FILE,
        REPORT_MEDIA_TYPE,
        SAFETENSORS_MEDIA_TYPE,
    )

    if path.name == REPORT_FILE:
        return REPORT_MEDIA_TYPE
    if path.name == EVALUATION_PROMPTS_FILE:
        return EVALUATION_PROMPTS_MEDIA_TYPE
    if path.suffix == ".safetensors":
        return SAFETENSORS_MEDIA_TYPE
    if path.suffix == ".json":
        return JSON_FILE_MEDIA_TYPE
    return FILE_MEDIA_TYPE


def push(directory: Path, repository: str, *, insecure: bool, tag: str | None, annotations: dict[str, str]) -> str:
    """Push every file of `directory` as one layer each; returns `repo@sha256:…` of the manifest."""
    from quantrol_worker.contracts import ARTIFACT_TYPE, CONFIG_MEDIA_TYPE

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
            raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"push to {target} failed: {exc}") from exc
    digest = response.headers.get("Docker-Content-Digest")
    if not digest:
        manifest = client.do_request(
            f"{client.prefix}://{ref.host}/v2/{ref.repository}/manifests/{ref.tag or 'latest'}",
            "GET",
            headers={"Accept": MANIFEST_MEDIA_TYPE},
        )
        digest = "sha256:" + hashlib.sha256(manifest.content).hexdigest()
    return ref.pinned(digest)
