"""`quantrol-worker fetch`: the serving pod's init step. Pull an artifact by digest, verify every byte, or refuse.

    quantrol-worker fetch --ref oci://REGISTRY/REPO@sha256:<manifest digest> --dest DIR
                          [--registry-config config.json] [--insecure]
    quantrol-worker fetch --ref file:///path/to/dir[@sha256:<manifest digest>] --dest DIR [--manifest FILE]

OCI: `quantrol_worker.oci` fetches the manifest by digest and verifies it and every file before anything lands in
DIR (see there). A tag-only reference is refused: a tag can move under a running rollout, a digest cannot. Files
already in DIR with the right digest are kept (an init container restart does not download a model twice).
--registry-config is a docker config.json (the pod mounts the ServingPolicy's credentials Secret there); a registry
that refuses the pod's credentials, or asks for some when none were given, is RegistryUnauthorized.

file:// is for local use (tests, a laptop): the files are copied (or symlinked with --symlink). With --manifest
(an OCI manifest JSON, e.g. the one the registry served) every file is checked against it by the same verifier,
and a digest in the reference pins the manifest's own bytes; without one the copy is unverified and says so loudly.

--max-bytes (the model volume's size) refuses, before any download, an artifact whose manifest says it is larger.

Any failure exits non-zero and writes a JSON termination message (reason DigestMismatch, InvalidReference,
ArtifactUnavailable, RegistryUnauthorized or InsufficientStorage: `oci.ArtifactReason`) to /dev/termination-log or
--termination-log, so the pod's status says why it never started. Torch-free; imports oras only for oci:// references.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantrol_worker import oci
from quantrol_worker.oci import RECORD_FILE, ArtifactError, ArtifactReason, Layer

log = logging.getLogger("quantrol.fetch")

TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # contracts.TERMINATION_MESSAGE_PATH (kept stdlib-only here)
TERMINATION_MESSAGE_LIMIT = 4096
_FILE_REF = re.compile(r"^file://(?P<path>/[^@]*)(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


# --- file:// ---


def _copy_from(source: Path) -> Callable[[Layer, Path], None]:
    def copy(layer: Layer, path: Path) -> None:
        src = source / layer.title
        if not src.is_file():
            raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"{src} listed in the manifest is missing")
        shutil.copyfile(src, path)

    return copy


def _link_checked(source: Path, layers: list[Layer], dest: Path) -> None:
    """Symlinked files are read in place, so the source itself is what must match the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, layer in enumerate(layers, 1):
        src, final = source / layer.title, dest / layer.title
        if not src.is_file():
            raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"{src} listed in the manifest is missing")
        if layer.digest:
            oci.check_file(src, layer)
        final.unlink(missing_ok=True)
        final.symlink_to(src)
        log.info("[%d/%d] linked %s%s", i, len(layers), layer.title, " (verified)" if layer.digest else "")


def _copy_unverified(source: Path, layers: list[Layer], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for i, layer in enumerate(layers, 1):
        final = dest / layer.title
        final.unlink(missing_ok=True)
        shutil.copyfile(source / layer.title, final)
        log.info("[%d/%d] copied %s", i, len(layers), layer.title)


def fetch_file(reference: str, dest: Path, *, manifest_path: Path | None, symlink: bool) -> tuple[str, list[Layer]]:
    m = _FILE_REF.match(reference)
    if not m:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"not a file reference: {reference!r} (file:///abs/dir)")
    source = Path(m["path"])
    if not source.is_dir():
        raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"{source} is not a directory")
    if manifest_path is not None:
        raw = manifest_path.read_bytes()
        actual = "sha256:" + hashlib.sha256(raw).hexdigest()
        if m["digest"] and actual != m["digest"]:
            raise ArtifactError(ArtifactReason.DIGEST_MISMATCH, f"manifest {manifest_path}: {actual} != {m['digest']}")
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"manifest {manifest_path} is not JSON") from exc
        layers = oci.layers_of(manifest)
    elif m["digest"]:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE,
                            f"{reference} pins a manifest digest: pass --manifest FILE")
    else:
        log.warning("UNVERIFIED local artifact %s: no --manifest given, files are copied without digest checks", source)
        layers = [Layer(p.name, "", None) for p in sorted(source.iterdir()) if p.is_file()]
    if symlink:
        _link_checked(source, layers, dest)
    elif manifest_path is not None:
        oci.install_verified(layers, dest, _copy_from(source))
    else:
        _copy_unverified(source, layers, dest)
    return reference, layers


# --- command ---


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("fetch", help="pull a model artifact by digest and verify it (init container)")
    parser.add_argument("--ref", required=True, help="oci://REGISTRY/REPO@sha256:… or file:///dir[@sha256:…]")
    parser.add_argument("--dest", type=Path, required=True, help="directory vLLM will load (--model)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP (the operator passes it for registries the install policy lists)")
    parser.add_argument("--registry-config", type=Path, default=None,
                        help="docker config.json with registry credentials (a mounted dockerconfigjson Secret)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="the size of the --dest volume: refuse before downloading an artifact that is larger")
    parser.add_argument("--manifest", type=Path, default=None, help="file:// only: OCI manifest JSON to verify against")
    parser.add_argument("--symlink", action="store_true", help="file:// only: link instead of copying")
    parser.add_argument("--termination-log", type=Path, default=Path(TERMINATION_MESSAGE_PATH))


def fetch(ref: str, dest: Path, *, insecure: bool = False, manifest: Path | None = None,
          symlink: bool = False, credentials: Path | None = None,
          max_bytes: int | None = None) -> tuple[str, list[Layer]]:
    if ref.startswith("file://"):
        return fetch_file(ref, dest, manifest_path=manifest, symlink=symlink)
    return oci.pull(ref, dest, insecure=insecure, credentials=credentials, max_bytes=max_bytes)


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
                               symlink=args.symlink, credentials=args.registry_config, max_bytes=args.max_bytes)
    except ArtifactError as exc:
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
