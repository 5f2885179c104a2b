"""The calibration Job of one QuantizedModel generation, and the ConfigMap holding the worker's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantrol_operator.api.quantizedmodel import QuantizedModelSpec
from quantrol_operator.children import (
    MANAGED_BY,
    child_name,
    label_value,
    owner_reference,
    quantities,
    restricted,
)
from quantrol_worker.contracts import (
    TERMINATION_MESSAGE_PATH,
    ArtifactConfig,
    CalibrationConfig,
    DataConfig,
    EvaluationConfig,
    QuantizationConfig,
    SliceConfig,
)

CONFIG_DIR = "/etc/quantrol/config"
CONFIG_FILE = "config.json"
DATA_DIR = "/etc/quantrol/data"
MODELS_DIR = "/models"
WORK_DIR = "/var/quantrol/work"
CONTAINER = "calibrate"
LABEL_QM = "quantrol.io/quantizedmodel"
LABEL_GENERATION = "quantrol.io/generation"


class UnsupportedSource(ValueError):
    """A URI the calibration worker cannot read yet; reported in status, never retried."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def job_name(qm_name: str, generation: int) -> str:
    return child_name(qm_name, f"calib-g{generation}")


@dataclass(frozen=True)
class ModelMount:
    """How a model URI reaches the pod: as it is, or as a path on a mounted PVC."""

    uri: str
    volume: dict[str, Any] | None = None
    mount: dict[str, Any] | None = None


def resolve_model_uri(uri: str) -> ModelMount:
    if uri.startswith(("hf://", "oci://", "file://")):
        return ModelMount(uri)
    if uri.startswith("pvc://"):
        claim, _, path = uri.removeprefix("pvc://").partition("/")
        volume = {"name": "base-model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount = {"name": "base-model", "mountPath": f"{MODELS_DIR}/{claim}", "readOnly": True}
        return ModelMount(f"file://{MODELS_DIR}/{claim}/{path}", volume, mount)
    raise UnsupportedSource(
        "spec.baseModel.uri", f"{uri.split('://')[0]}:// is not readable by the calibration worker yet; "
        "use hf://, oci://repo@sha256:…, pvc://claim/path or file://"
    )


def worker_config(name: str, namespace: str, generation: int, spec: QuantizedModelSpec) -> CalibrationConfig:
    """The worker's input, translated from the spec (the worker never reads the custom resource)."""
    base = resolve_model_uri(spec.base_model.uri)
    data = spec.calibration
    if data.config_map_ref is not None:
        data_uri = f"file://{DATA_DIR}/{data.config_map_ref.key}"
    elif data.uri is not None and data.uri.startswith("file://"):
        data_uri = data.uri
    else:
        raise UnsupportedSource(
            "spec.calibration.uri", "calibration data must come from a ConfigMap (configMapRef) or a file:// path"
        )
    q = spec.quantization
    return CalibrationConfig(
        name=f"{namespace}/{name}",
        generation=generation,
        base_model=base.uri,
        quantization=QuantizationConfig(
            scheme=q.scheme,
            method=q.method,
            group_size=q.group_size,
            ignore=list(q.ignore),
            kv_cache_scheme=q.kv_cache_scheme,
            target=q.target,
            tensor_parallel_size=q.tensor_parallel_size,
        ),
        calibration=DataConfig(
            uri=data_uri,
            max_sequence_length=data.max_sequence_length,
            seed=data.seed,
            slices=[
                SliceConfig(
                    name=s.name,
                    samples=s.samples,
                    eval_samples=s.eval_samples,
                    quality_gate=s.quality_gate,
                )
                for s in data.slices
            ],
        ),
        quality_gate=spec.quality_gate,
        evaluation=EvaluationConfig(prompts=data.evaluation_prompts),
        artifact=ArtifactConfig(
            repository=spec.artifact.repository, insecure=spec.artifact.insecure, tag=f"{name}-g{generation}"[:128]
        ),
        work_dir=WORK_DIR,
        termination_message_path=TERMINATION_MESSAGE_PATH,
    )


def _labels(name: str, generation: int) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_QM: label_value(name), LABEL_GENERATION: str(generation)}


def config_map(owner: dict[str, Any], config: CalibrationConfig) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": job_name(meta["name"], meta["generation"]),
            "namespace": meta["namespace"],
            "labels": _labels(meta["name"], meta["generation"]),
            "ownerReferences": [owner_reference(owner)],
        },
        "data": {CONFIG_FILE: config.to_json()},
    }


def job(owner: dict[str, Any], spec: QuantizedModelSpec, image: str) -> dict[str, Any]:
    meta = owner["metadata"]
    name = job_name(meta["name"], meta["generation"])
    base = resolve_model_uri(spec.base_model.uri)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": name}},
        {"name": "work", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "work", "mountPath": WORK_DIR},
    ]
    if spec.calibration.config_map_ref is not None:
        volumes.append({"name": "data", "configMap": {"name": spec.calibration.config_map_ref.name}})
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
    if base.volume is not None and base.mount is not None:
        volumes.append(base.volume)
        mounts.append(base.mount)

    job_spec = spec.job
    resources = quantities(job_spec.resources.to_wire()) if job_spec.resources else {}
    if job_spec.gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(job_spec.gpus)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": job_spec.image or image,
        "command": ["quantrol-worker", "calibrate", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        # A crash before the worker writes its result still leaves the log's tail as the message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
    }
    if job_spec.node_selector:
        pod_spec["nodeSelector"] = dict(job_spec.node_selector)
    if job_spec.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in job_spec.tolerations]
    if job_spec.service_account_name:
        pod_spec["serviceAccountName"] = job_spec.service_account_name
    labels = _labels(meta["name"], meta["generation"])
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "backoffLimit": job_spec.backoff_limit,
            "activeDeadlineSeconds": job_spec.active_deadline_seconds,
            "template": {"metadata": {"labels": labels}, "spec": restricted(pod_spec)},
        },
    }
