"""Resolve the base model and calibration data URIs to local files, and digest them (sha256 over a sorted manifest
of a directory's files).

Every scheme the QuantizedModel admits is read here (the operator turns pvc:// into a mounted path first):
base model hf:// (the mounted cache, offline), oci:// (by digest, verified), file://; calibration data file://
and oci:// (a digest-pinned artifact holding one .jsonl file, verified like a model)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from quantrol_worker import oci
from quantrol_worker.calibrate import WorkerError
from quantrol_worker.contracts import CalibrationReason, RegistryAccess, Stage
from quantrol_worker.oci import OciRef, sha256_file


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
            f"{uri}: hf:// needs HF_HUB_OFFLINE=1 and a mounted cache (spec.baseModel.huggingFaceCache; the worker "
            "never downloads from a hub)",
            Stage.LOAD,
        )
    repo, _, revision = uri.removeprefix("hf://").partition("@")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=repo, revision=revision or None, local_files_only=True)
    except Exception as exc:
        cache = os.environ.get("HF_HUB_CACHE") or "the default cache"
        raise WorkerError(
            CalibrationReason.BASE_MODEL_UNAVAILABLE, f"{uri}: not in the mounted cache {cache} ({exc})", Stage.LOAD
        ) from exc
    return Path(path)


def pull(reference: str, outdir: Path, registries: RegistryAccess, *, stage: Stage = Stage.LOAD,
         unavailable: CalibrationReason = CalibrationReason.BASE_MODEL_UNAVAILABLE) -> Path:
    """`REPO@sha256:…` into `outdir`, every file verified (`quantrol_worker.oci`); returns `outdir`."""
    try:
        host = OciRef.parse(reference).host
        credentials = Path(registries.credentials_file) if registries.credentials_file else None
        oci.pull(reference, outdir, insecure=oci.plain_http(host, registries.plain_http), credentials=credentials)
    except oci.ArtifactError as exc:
        raise WorkerError.from_artifact(exc, stage, unavailable=unavailable) from exc
    return outdir


def resolve_data(uri: str, work_dir: Path, registries: RegistryAccess) -> str:
    """The calibration data as a local `file://` JSONL: as it is, or pulled from a digest-pinned OCI artifact that
    holds exactly one `.jsonl` file (a dataset published like a model, and verified like one)."""
    if not uri.startswith("oci://"):
        return uri
    folder = pull(uri, work_dir / "calibration-data", registries, stage=Stage.DATA,
                  unavailable=CalibrationReason.CALIBRATION_DATA_INVALID)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".jsonl")
    if len(files) != 1:
        raise WorkerError(CalibrationReason.CALIBRATION_DATA_INVALID,
                          f"{uri}: a calibration data artifact holds exactly one .jsonl file, this one holds "
                          f"{files or 'none'}",
                          Stage.DATA)
    return f"file://{folder / files[0]}"


def resolve_model(uri: str, work_dir: Path, registries: RegistryAccess | None = None) -> Path:
    """A local directory holding the base model (config.json, weights, tokenizer)."""
    if uri.startswith("oci://"):
        path = pull(uri, work_dir / "base-model", registries or RegistryAccess())
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
