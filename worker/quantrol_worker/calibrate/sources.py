"""Resolve the base model URI to a local directory, and digest it (sha256 over a sorted manifest of its files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from quantrol_worker import oci
from quantrol_worker.calibrate import WorkerError
from quantrol_worker.contracts import CalibrationReason, Stage
from quantrol_worker.oci import sha256_file


def directory_digest(root: Path, names: tuple[str, ...] | None = None) -> str:
    """sha256 over lines `<sha256 of file>  <relative path>`, sorted by path; `names` keeps only those files."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if names is not None and rel not in names:
            continue
        if rel.startswith(".") or "/." in rel:
            continue
        lines.append(f"{sha256_file(path).removeprefix('sha256:')}  {rel}\n")
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def _hf_snapshot(uri: str) -> Path:
    """hf://org/name@revision from the local cache only: HF_HUB_OFFLINE must be set; a download is never tried."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
        raise WorkerError(
            CalibrationReason.BASE_MODEL_UNAVAILABLE,
            f"{uri}: hf:// needs HF_HUB_OFFLINE=1 and a mounted cache (the worker never downloads from a hub)",
            Stage.LOAD,
        )
    repo, _, revision = uri.removeprefix("hf://").partition("@")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=repo, revision=revision or None, local_files_only=True)
    except Exception as exc:
        raise WorkerError(
            CalibrationReason.BASE_MODEL_UNAVAILABLE, f"{uri}: not in the local cache ({exc})", Stage.LOAD
        ) from exc
    return Path(path)


def pull(reference: str, outdir: Path, *, insecure: bool) -> Path:
    """`REPO@sha256:…` into `outdir`, every file verified (`quantrol_worker.oci`); returns `outdir`."""
    try:
        oci.pull(reference, outdir, insecure=insecure)
    except oci.ArtifactError as exc:
        raise WorkerError.from_artifact(exc, Stage.LOAD, unavailable=CalibrationReason.BASE_MODEL_UNAVAILABLE) from exc
    return outdir


def resolve_model(uri: str, work_dir: Path, *, insecure: bool = False) -> Path:
    """A local directory holding the base model (config.json, weights, tokenizer)."""
    if uri.startswith("oci://"):
        path = pull(uri, work_dir / "base-model", insecure=insecure)
    elif uri.startswith("hf://"):
        path = _hf_snapshot(uri)
    elif uri.startswith("file://") or "://" not in uri:
        path = Path(uri.removeprefix("file://"))
    else:
        scheme = uri.split("://", 1)[0]
        raise WorkerError(
            CalibrationReason.BASE_MODEL_UNAVAILABLE, f"{uri}: {scheme}:// is not supported by this worker", Stage.LOAD
        )
    if not (path / "config.json").is_file():
        raise WorkerError(CalibrationReason.BASE_MODEL_UNAVAILABLE, f"{uri}: no config.json in {path}", Stage.LOAD)
    return path
