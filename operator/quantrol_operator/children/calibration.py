"""The calibration Job of one QuantizedModel generation, and the ConfigMap holding the worker's config.

Every URI scheme the API admits reaches the worker as something it reads: pvc:// becomes a path on the claim,
mounted read-only; hf:// is read from the mounted Hugging Face cache, offline; oci:// (base model, calibration data)
and the push go through the registry credentials Secret, mounted where the worker's config says, and through the
install policy's plain-HTTP list; file:// is passed as it is (local use)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantrol_operator.api.common import GPU_RESOURCE
from quantrol_operator.api.quantizedmodel import QuantizedModelSpec
from quantrol_operator.children import (
    MANAGED_BY,
    child_name,
    label_value,
    owner_reference,
    placed,
    quantities,
    restricted,
)
from quantrol_operator.policy import InstallPolicy
from quantrol_worker.contracts import (
    TERMINATION_MESSAGE_PATH,
    ArtifactConfig,
    CalibrationConfig,
    DataConfig,
    EvaluationConfig,
    QuantizationConfig,
    RegistryAccess,
    SliceConfig,
)

CONFIG_DIR = "/etc/quantrol/config"
CONFIG_FILE = "config.json"
DATA_DIR = "/etc/quantrol/data"
DATA_CLAIMS_DIR = "/data"
MODELS_DIR = "/models"
HF_CACHE_DIR = "/models/hf-cache"
WORK_DIR = "/var/quantrol/work"
REGISTRY_DIR = "/etc/quantrol/registry"
REGISTRY_CONFIG = f"{REGISTRY_DIR}/config.json"  # the Secret's one file, as docker and oras name it
DOCKER_CONFIG_KEY = ".dockerconfigjson"  # the key of a kubernetes.io/dockerconfigjson Secret
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
    """How a URI reaches the pod: as it is, or as a path on a mounted PVC."""

    uri: str
    volume: dict[str, Any] | None = None
    mount: dict[str, Any] | None = None


def resolve_uri(uri: str, field: str, volume_name: str, mount_root: str) -> ModelMount:
    """pvc://claim/path as a read-only mount of the claim and a file:// path on it; the other schemes as they are
    (the API admits per field only what the worker reads)."""
    if uri.startswith(("hf://", "oci://", "file://")):
        return ModelMount(uri)
    if uri.startswith("pvc://"):
        claim, _, path = uri.removeprefix("pvc://").partition("/")
        volume = {"name": volume_name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount = {"name": volume_name, "mountPath": f"{mount_root}/{claim}", "readOnly": True}
        return ModelMount(f"file://{mount_root}/{claim}/{path}", volume, mount)
    raise UnsupportedSource(field, f"{uri.split('://')[0]}:// is not read by the calibration worker")


def resolve_model_uri(uri: str) -> ModelMount:
    return resolve_uri(uri, "spec.baseModel.uri", "base-model", MODELS_DIR)


def _data_source(spec: QuantizedModelSpec) -> ModelMount:
    data = spec.calibration
    if data.config_map_ref is not None:
        return ModelMount(f"file://{DATA_DIR}/{data.config_map_ref.key}")
    assert data.uri is not None  # the API: exactly one of uri and configMapRef
    return resolve_uri(data.uri, "spec.calibration.uri", "calibration-data", DATA_CLAIMS_DIR)


def registry_access(spec: QuantizedModelSpec, policy: InstallPolicy) -> RegistryAccess:
    secret = spec.artifact.credentials_secret_ref
    return RegistryAccess(credentials_file=REGISTRY_CONFIG if secret else None,
                          plain_http=list(policy.registries.plain_http))


def registry_credentials_volume(secret: str) -> dict[str, Any]:
    """A dockerconfigjson Secret as the one file `config.json` (what docker and oras call it)."""
    return {"name": "registry-credentials",
            "secret": {"secretName": secret, "items": [{"key": DOCKER_CONFIG_KEY, "path": "config.json"}]}}


def registry_credentials_mount() -> dict[str, Any]:
    """Where a container finds that volume's file: REGISTRY_CONFIG."""
    return {"name": "registry-credentials", "mountPath": REGISTRY_DIR, "readOnly": True}


def worker_config(name: str, namespace: str, generation: int, spec: QuantizedModelSpec,
                  policy: InstallPolicy | None = None) -> CalibrationConfig:
    """The worker's input, translated from the spec (the worker never reads the custom resource)."""
    base = resolve_model_uri(spec.base_model.uri)
    data = spec.calibration
    data_uri = _data_source(spec).uri
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
        artifact=ArtifactConfig(repository=spec.artifact.repository, tag=f"{name}-g{generation}"[:128]),
        registries=registry_access(spec, policy or InstallPolicy()),
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


def _volumes(name: str, spec: QuantizedModelSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, the worker's mounts): config, scratch, and every source the spec names."""
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
    for source in (resolve_model_uri(spec.base_model.uri), _data_source(spec)):
        if source.volume is not None and source.mount is not None:
            volumes.append(source.volume)
            mounts.append(source.mount)
    cache = spec.base_model.hugging_face_cache
    if cache is not None:
        volumes.append({"name": "hf-cache",
                        "persistentVolumeClaim": {"claimName": cache.claim_name, "readOnly": True}})
        mounts.append({"name": "hf-cache", "mountPath": HF_CACHE_DIR, "readOnly": True})
    secret = spec.artifact.credentials_secret_ref
    if secret is not None:
        volumes.append(registry_credentials_volume(secret.name))
        mounts.append(registry_credentials_mount())
    return volumes, mounts


def _env(spec: QuantizedModelSpec) -> list[dict[str, str]]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    cache = spec.base_model.hugging_face_cache
    if cache is not None:
        # The hub library reads the mounted cache and never reaches a hub (the worker refuses hf:// without this).
        hub = f"{HF_CACHE_DIR}/{cache.sub_path}".rstrip("/")
        env += [{"name": "HF_HUB_CACHE", "value": hub}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    return env


def job(owner: dict[str, Any], spec: QuantizedModelSpec, image: str) -> dict[str, Any]:
    meta = owner["metadata"]
    name = job_name(meta["name"], meta["generation"])
    volumes, mounts = _volumes(name, spec)
    job_spec = spec.job
    resources = quantities(job_spec.resources.to_wire()) if job_spec.resources else {}
    if job_spec.gpu_count:  # one place decides (admission refuses gpus and a different limit)
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(job_spec.gpu_count)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": job_spec.image or image,
        "command": ["quantrol-worker", "calibrate", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": _env(spec),
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
    placed(pod_spec, job_spec)
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
