"""`quantrol-worker fetch`: the serving pod's init step. Pull an artifact by digest, verify every byte, or refuse.

    quantrol-worker fetch --ref oci://REGISTRY/REPO@sha256:<manifest digest> --dest DIR [--insecure]
    quantrol-worker fetch --ref file:///path/to/dir[@sha256:<manifest digest>] --dest DIR [--manifest FILE]

OCI (the layout `calibrate/oci.py` pushes: one layer per file, titled by `org.opencontainers.image.title`):
the manifest is fetched by digest and its bytes hashed against the reference; then each layer is downloaded by
its digest, hashed and size-checked before it is moved into DIR. A tag-only reference is refused: a tag can move
under a running rollout, a digest cannot. Files already in DIR with the right digest are kept (an init container
restart does not download a model twice).

file:// is for local use (tests, a laptop): the files are copied (or symlinked with --symlink). With --manifest
(an OCI manifest JSON, e.g. the one the registry served) every file is checked against it, and a digest in the
reference pins the manifest's own bytes; without one the copy is unverified and says so loudly.

Any failure exits non-zero and writes a JSON termination message (reason DigestMismatch, InvalidReference or
ArtifactUnavailable) to /dev/termination-log or --termination-log, so the pod's status says why it never started.
Torch-free; imports oras only for oci:// references.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger("quantrol.fetch")

TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # contracts.TERMINATION_MESSAGE_PATH (kept stdlib-only here)
TERMINATION_MESSAGE_LIMIT = 4096
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE_ANNOTATION = "org.opencontainers.image.title"
RECORD_FILE = ".quantrol-fetch.json"  # what was fetched, for whoever debugs the pod later
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FILE_REF = re.compile(r"^file://(?P<path>/[^@]*)(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


class FetchReason(StrEnum):
    DIGEST_MISMATCH = "DigestMismatch"
    INVALID_REFERENCE = "InvalidReference"
    ARTIFACT_UNAVAILABLE = "ArtifactUnavailable"


class FetchError(Exception):
    def __init__(self, reason: FetchReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Layer:
    title: str
    digest: str
    size: int | None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def layers_of(manifest: dict[str, Any]) -> list[Layer]:
    """The manifest's file layers; a title that could escape DEST (`../x`, `/etc/x`) is refused, not sanitised."""
    layers: list[Layer] = []
    for raw in manifest.get("layers", []):
        digest = str(raw.get("digest", ""))
        title = str((raw.get("annotations") or {}).get(TITLE_ANNOTATION) or "")
        if not _DIGEST.match(digest):
            raise FetchError(FetchReason.INVALID_REFERENCE, f"layer digest {digest!r} is not a sha256 digest")
        if not title or title in (".", "..") or "/" in title or "\\" in title or title == RECORD_FILE:
            raise FetchError(FetchReason.INVALID_REFERENCE, f"layer {digest} has an unsafe or missing title {title!r}")
        size = raw.get("size")
        layers.append(Layer(title, digest, int(size) if size is not None else None))
    if not layers:
        raise FetchError(FetchReason.INVALID_REFERENCE, "the manifest lists no files")
    return layers


def check_file(path: Path, layer: Layer) -> None:
    actual = sha256_file(path)
    size = path.stat().st_size
    if actual != layer.digest or (layer.size is not None and size != layer.size):
        raise FetchError(
            FetchReason.DIGEST_MISMATCH,
            f"{layer.title}: got {actual} ({size} bytes), the manifest pins {layer.digest} ({layer.size} bytes)",
        )


def _already_there(path: Path, layer: Layer) -> bool:
    if not path.is_file() or (layer.size is not None and path.stat().st_size != layer.size):
        return False
    return sha256_file(path) == layer.digest


# --- oci:// ---


def fetch_oci(reference: str, dest: Path, *, insecure: bool) -> tuple[str, list[Layer]]:
    from quantrol_worker.calibrate import WorkerError
    from quantrol_worker.calibrate.oci import OciRef, fetch_manifest
    from quantrol_worker.contracts import Reason

    try:
        ref = OciRef.parse(reference)
    except WorkerError as exc:
        raise FetchError(FetchReason.INVALID_REFERENCE, exc.message) from exc
    if ref.digest is None:
        raise FetchError(
            FetchReason.INVALID_REFERENCE,
            f"{reference}: refusing a tag-only reference; pin the artifact by digest (oci://REPO@sha256:...)",
        )
    try:
        manifest = fetch_manifest(ref, insecure)  # checks the manifest bytes against ref.digest
    except WorkerError as exc:
        mismatch = exc.reason is Reason.DIGEST_MISMATCH
        reason = FetchReason.DIGEST_MISMATCH if mismatch else FetchReason.ARTIFACT_UNAVAILABLE
        raise FetchError(reason, exc.message) from exc
    layers = layers_of(manifest)
    client = _oras_client(ref.host, insecure)
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / ".partial"
    partial.mkdir(exist_ok=True)
    for i, layer in enumerate(layers, 1):
        final = dest / layer.title
        if _already_there(final, layer):
            log.info("[%d/%d] %s already present and verified", i, len(layers), layer.title)
            continue
        tmp = partial / layer.title
        log.info("[%d/%d] pulling %s (%s, %s bytes)", i, len(layers), layer.title, layer.digest, layer.size)
        try:
            client.download_blob(ref.name, layer.digest, str(tmp))
        except Exception as exc:  # oras/requests raise bare HTTPError / ConnectionError
            raise FetchError(FetchReason.ARTIFACT_UNAVAILABLE, f"blob {layer.title} ({layer.digest}): {exc}") from exc
        try:
            check_file(tmp, layer)
        except FetchError:
            tmp.unlink(missing_ok=True)  # never leave unverified bytes where a retry or vLLM could pick them up
            raise
        os.replace(tmp, final)  # same directory tree: atomic, so DEST only ever holds verified files
    shutil.rmtree(partial, ignore_errors=True)
    return ref.pinned(ref.digest), layers


def _oras_client(host: str, insecure: bool) -> Any:
    import oras.client

    return oras.client.OrasClient(hostname=host, insecure=insecure)


# --- file:// ---


def fetch_file(reference: str, dest: Path, *, manifest_path: Path | None, symlink: bool) -> tuple[str, list[Layer]]:
    m = _FILE_REF.match(reference)
    if not m:
        raise FetchError(FetchReason.INVALID_REFERENCE, f"not a file reference: {reference!r} (file:///abs/dir)")
    source = Path(m["path"])
    if not source.is_dir():
        raise FetchError(FetchReason.ARTIFACT_UNAVAILABLE, f"{source} is not a directory")
    layers: list[Layer] | None = None
    if manifest_path is not None:
        raw = manifest_path.read_bytes()
        actual = "sha256:" + hashlib.sha256(raw).hexdigest()
        if m["digest"] and actual != m["digest"]:
            raise FetchError(FetchReason.DIGEST_MISMATCH, f"manifest {manifest_path}: {actual} != {m['digest']}")
        layers = layers_of(json.loads(raw))
    elif m["digest"]:
        raise FetchError(FetchReason.INVALID_REFERENCE, f"{reference} pins a manifest digest: pass --manifest FILE")
    else:
        log.warning("UNVERIFIED local artifact %s: no --manifest given, files are copied without digest checks", source)
        layers = [Layer(p.name, "", None) for p in sorted(source.iterdir()) if p.is_file()]
    dest.mkdir(parents=True, exist_ok=True)
    for i, layer in enumerate(layers, 1):
        src, final = source / layer.title, dest / layer.title
        if not src.is_file():
            raise FetchError(FetchReason.ARTIFACT_UNAVAILABLE, f"{src} listed in the manifest is missing")
        final.unlink(missing_ok=True)
        if symlink:
            if layer.digest:
                check_file(src, layer)  # symlinked files are read in place: check the source
            final.symlink_to(src)
        else:
            shutil.copyfile(src, final)
            if layer.digest:
                try:
                    check_file(final, layer)  # check the copy: it is what vLLM will read
                except FetchError:
                    final.unlink(missing_ok=True)
                    raise
        log.info("[%d/%d] %s %s%s", i, len(layers), "linked" if symlink else "copied", layer.title,
                 " (verified)" if layer.digest else "")
    return reference, layers


# --- command ---


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("fetch", help="pull a model artifact by digest and verify it (init container)")
    parser.add_argument("--ref", required=True, help="oci://REGISTRY/REPO@sha256:… or file:///dir[@sha256:…]")
    parser.add_argument("--dest", type=Path, required=True, help="directory vLLM will load (--model)")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP registry (local tests)")
    parser.add_argument("--manifest", type=Path, default=None, help="file:// only: OCI manifest JSON to verify against")
    parser.add_argument("--symlink", action="store_true", help="file:// only: link instead of copying")
    parser.add_argument("--termination-log", type=Path, default=Path(TERMINATION_MESSAGE_PATH))


def fetch(ref: str, dest: Path, *, insecure: bool = False, manifest: Path | None = None,
          symlink: bool = False) -> tuple[str, list[Layer]]:
    if ref.startswith("file://"):
        return fetch_file(ref, dest, manifest_path=manifest, symlink=symlink)
    return fetch_oci(ref, dest, insecure=insecure)


def _write_termination(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        payload = {**payload, "message": str(payload.get("message", ""))[:TERMINATION_MESSAGE_LIMIT // 2] + "…"}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:  # the log line already says why; the exit code must still be non-zero
        log.error("cannot write termination message to %s: %s", path, exc)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        pinned, layers = fetch(args.ref, args.dest, insecure=args.insecure, manifest=args.manifest,
                               symlink=args.symlink)
    except FetchError as exc:
        log.error("refusing to start: %s: %s (artifact %s)", exc.reason.value, exc.message, args.ref)
        _write_termination(args.termination_log, {"phase": "Failed", "reason": exc.reason.value,
                                                   "message": exc.message, "ref": args.ref})
        return 1
    record = {"ref": pinned, "files": [{"name": la.title, "digest": la.digest, "size": la.size} for la in layers]}
    (args.dest / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("fetched %s: %d files verified into %s", pinned, len(layers), args.dest)
    _write_termination(args.termination_log, {"phase": "Fetched", "reason": "Succeeded", "ref": pinned,
                                               "files": len(layers)})
    return 0
