"""The qualification Job: one run of `quantrol-worker qualify` per attempt, in the serving image, against both arms.

Its input is the worker's contract (`QualificationConfig`, in a ConfigMap of the same name); its result is the
termination message (`QualificationReport`, at most 4 KB) that the observer reads back. The deadline is derived
from the regimes' own bounds, so the Job can never outlive what the spec allows it.
"""

from __future__ import annotations

from typing import Any

from quantrol_operator.api.servingpolicy import ServingPolicySpec
from quantrol_operator.children import MANAGED_BY, child_name, label_value, owner_reference, quantities, restricted
from quantrol_operator.children.calibration import (
    REGISTRY_CONFIG,
    registry_credentials_mount,
    registry_credentials_volume,
)
from quantrol_operator.children.router import arm_url
from quantrol_operator.children.serving import LABEL_POLICY, ServingContext, short_digest
from quantrol_worker.contracts import (
    TERMINATION_MESSAGE_PATH,
    AdmissionBounds,
    ArmRole,
    LatencyLimits,
    QualificationConfig,
    QualifyArm,
    RegistryAccess,
)

CONTAINER = "qualify"
CONFIG_DIR = "/etc/quantrol/qualify"
CONFIG_FILE = "config.json"
PROBES_DIR = "/etc/quantrol/probes"
WORK_DIR = "/tmp/quantrol-qualify"
LABEL_COMPONENT = "app.kubernetes.io/component"
COMPONENT = "qualification"
START_SECONDS = 300  # image pull, imports, the tokenizer and prompts pulled from the registry
GOLDEN_SECONDS = 600  # the golden check: every evaluation prompt scored once (the tool's own timeout bounds each)


def job_name(policy: str, candidate: str, attempt: int) -> str:
    return child_name(policy, f"qualify-{short_digest(candidate)[:8]}-{attempt}")


def worker_config(policy: str, namespace: str, spec: ServingPolicySpec, stable: str, candidate: str,
                  context: ServingContext | None = None) -> QualificationConfig:
    """The worker's input, from the spec: the SLOs' absolute limits judge each regime, the admission bounds are
    the router's, the arms are their Services. The candidate artifact's evaluation prompts (if it carries them)
    drive the golden check and the load; the probe ConfigMap stands in for them where it does not."""
    q, slos, admission = spec.qualification, spec.slos, spec.serving.admission
    replicas = spec.serving.replicas
    context = context or ServingContext("", "")
    registries = RegistryAccess(  # the arms' own: the same Secret, the install's plain-HTTP list
        credentials_file=REGISTRY_CONFIG if context.credentials_secret else None,
        plain_http=list(context.policy.registries.plain_http))
    return QualificationConfig(
        model=policy,
        arms=[QualifyArm(arm=ArmRole.CANDIDATE, url=arm_url(policy, namespace, candidate), artifact=candidate,
                         replicas=replicas),
              QualifyArm(arm=ArmRole.STABLE, url=arm_url(policy, namespace, stable), artifact=stable,
                         replicas=replicas)],
        prompts_artifact=candidate,
        registries=registries,
        probe_prompts_file=f"{PROBES_DIR}/{q.probe_prompts.key}" if q.probe_prompts else None,
        output_tokens=q.output_tokens,
        regimes=q.regimes,
        limits=LatencyLimits(
            ttft_seconds=slos.ttft_p99.max if slos.ttft_p99 else None,
            itl_seconds=slos.inter_token_latency_p99.max if slos.inter_token_latency_p99 else None,
            queue_wait_seconds=slos.queue_time_p99.max if slos.queue_time_p99 else None),
        admission=AdmissionBounds(max_in_flight=admission.max_in_flight, max_queue=admission.max_queue,
                                  max_queue_wait_seconds=admission.max_queue_wait_seconds),
        golden=q.golden_tolerance,
        golden_max_seconds=GOLDEN_SECONDS,
        min_goodput_ratio=q.min_goodput_ratio,
        work_dir=WORK_DIR,
        termination_message_path=TERMINATION_MESSAGE_PATH,
    )


def deadline_seconds(config: QualificationConfig) -> int:
    """What the regimes may take on both arms, with room to start and to score the golden prompts."""
    r = config.regimes
    # The sweep runs up to twice sweepRates rates (regimes.next_rung: more, downwards, when none was sustainable).
    per_arm = r.floor_max_seconds + 2 * r.sweep_rates * r.seconds_per_rate + r.overload_seconds + r.recovery_seconds
    return int(START_SECONDS + GOLDEN_SECONDS + 2 * per_arm * 1.5)


def _meta(owner: dict[str, Any], name: str) -> dict[str, Any]:
    return {"name": name, "namespace": owner["metadata"]["namespace"],
            "labels": {**MANAGED_BY, LABEL_POLICY: label_value(owner["metadata"]["name"]),
                       LABEL_COMPONENT: COMPONENT},
            "ownerReferences": [owner_reference(owner)]}


def config_map(owner: dict[str, Any], name: str, config: QualificationConfig) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(owner, name),
            "data": {CONFIG_FILE: config.to_json()}}


def job(owner: dict[str, Any], name: str, spec: ServingPolicySpec, config: QualificationConfig,
        image: str, context: ServingContext | None = None) -> dict[str, Any]:
    """Pod Security `restricted` (children.restricted); HOME and caches on an emptyDir, since the image's own home
    may not be writable under the restricted user. `image`: the install's serving image (Quantrol's, with the
    worker and GuideLLM) unless spec.qualification.image says otherwise; never spec.serving.image, which may be a
    stock vLLM image holding neither. It goes where the arms go (node selector, tolerations, affinity) and reads
    the candidate's prompts with the arms' registry Secret."""
    context = context or ServingContext("", "")
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": name}},
                                     {"name": "work", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                    {"name": "work", "mountPath": WORK_DIR}]
    probes = spec.qualification.probe_prompts
    if probes is not None:
        volumes.append({"name": "probes", "configMap": {"name": probes.name}})
        mounts.append({"name": "probes", "mountPath": PROBES_DIR, "readOnly": True})
    if context.credentials_secret:
        volumes.append(registry_credentials_volume(context.credentials_secret))
        mounts.append(registry_credentials_mount())
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.qualification.image or image,
        "command": ["quantrol-worker", "qualify", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": WORK_DIR},
                {"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TOKENIZERS_PARALLELISM", "value": "false"}],
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.serving.resources:  # the load generator needs little; the same class as the arms keeps it on-target
        container["resources"] = {k: v for k, v in quantities(spec.serving.resources.to_wire()).items()
                                  if k == "requests"}
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], "volumes": volumes}
    if spec.serving.node_selector:
        pod_spec["nodeSelector"] = dict(spec.serving.node_selector)
    if spec.serving.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in spec.serving.tolerations]
    if spec.serving.affinity:
        pod_spec["affinity"] = dict(spec.serving.affinity)
    if spec.serving.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [s.to_wire() for s in spec.serving.image_pull_secrets]
    meta = _meta(owner, name)
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": deadline_seconds(config),
                 "template": {"metadata": {"labels": meta["labels"]}, "spec": restricted(pod_spec)}},
    }
