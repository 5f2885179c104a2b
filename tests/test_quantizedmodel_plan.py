"""The QuantizedModel planner and the calibration Job builder, as pure functions (no server)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantrol_operator.children import calibration
from quantrol_operator.kube import merge_patch
from quantrol_operator.planning.quantizedmodel import QmObserved, plan
from quantrol_worker.contracts import (
    CalibrationConfig,
    CalibrationReason,
    SliceHeadline,
    Stage,
    TerminationResult,
    WorkerPhase,
)

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
IMAGE = "ghcr.io/quantrol/worker:test"
DIGEST = "sha256:" + "ab" * 32


def qm(generation: int = 1, status: dict[str, Any] | None = None, **spec_edits: Any) -> dict[str, Any]:
    obj = yaml.safe_load((ROOT / "e2e/samples/quantizedmodel-llama-8b-w4a16.yaml").read_text())
    obj["metadata"].update(uid="uid-qm", generation=generation)
    for dotted, value in spec_edits.items():
        node = obj["spec"]
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    obj["status"] = status or {}
    return obj


def job_of(result_plan: Any) -> dict[str, Any]:
    return next(o for o in result_plan.apply if o["kind"] == "Job")


def with_status(job: dict[str, Any], **status: Any) -> dict[str, Any]:
    out = copy.deepcopy(job)
    out["metadata"]["uid"] = "uid-job"
    out["status"] = status
    return out


def pod(
    terminated: dict[str, Any] | None = None, waiting: str | None = None, phase: str = "Running"
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if terminated:
        state = {"terminated": terminated}
    elif waiting:
        state = {"waiting": {"reason": waiting}}
    return {
        "metadata": {"name": "p", "creationTimestamp": "2026-11-23T11:59:00Z",
                     "ownerReferences": [{"uid": "uid-job"}]},
        "status": {"phase": phase, "containerStatuses": [{"name": "calibrate", "state": state}]},
    }


def complete() -> dict[str, Any]:
    return {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}


def failed(reason: str) -> dict[str, Any]:
    return {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": reason}]}


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_a_new_model_gets_its_configmap_and_job_and_waits() -> None:
    result = plan(QmObserved(qm(), now=NOW), IMAGE)
    kinds = [o["kind"] for o in result.apply]
    assert kinds == ["ConfigMap", "Job"]
    assert result.status["phase"] == "Pending" and result.status["observedGeneration"] == 1
    assert result.status["jobName"] == "llama-3-1-8b-w4a16-calib-g1"
    assert [e.reason for e in result.events] == ["JobCreated"]


def test_job_builder_carries_what_the_spec_asks_for() -> None:
    obj = qm()
    job = job_of(plan(QmObserved(obj, now=NOW), IMAGE))
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "quantrol.io/v1alpha1", "kind": "QuantizedModel", "name": obj["metadata"]["name"],
        "uid": "uid-qm", "controller": True, "blockOwnerDeletion": True,
    }
    assert job["spec"]["activeDeadlineSeconds"] == 7200 and job["spec"]["backoffLimit"] == 0
    assert container["image"] == "ghcr.io/quantrol/worker:0.1.0"  # the spec's image wins over the default
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod_spec["tolerations"][0]["key"] == "nvidia.com/gpu" and pod_spec["restartPolicy"] == "Never"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {v["name"] for v in pod_spec["volumes"]} == {"config", "work", "calibration-data", "hf-cache",
                                                         "registry-credentials"}
    assert job["metadata"]["labels"]["quantrol.io/generation"] == "1"


def test_every_source_the_sample_names_is_mounted_where_the_worker_config_reads_it() -> None:
    """hf:// from the cache claim, offline; calibration data from its claim; the registry Secret as config.json."""
    result = plan(QmObserved(qm(), now=NOW), IMAGE)
    config = CalibrationConfig.model_validate_json(result.apply[0]["data"][calibration.CONFIG_FILE])
    pod_spec = job_of(result)["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert volumes["hf-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache", "readOnly": True}
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HUB_CACHE"] == f"{mounts['hf-cache']['mountPath']}/hub"
    assert volumes["calibration-data"]["persistentVolumeClaim"]["claimName"] == "llama-calibration"
    assert config.calibration.uri == f"file://{mounts['calibration-data']['mountPath']}/llama-8b/samples.jsonl"
    assert volumes["registry-credentials"]["secret"] == {
        "secretName": "registry-credentials", "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}
    assert config.registries.credentials_file == f"{mounts['registry-credentials']['mountPath']}/config.json"
    assert all(m.get("readOnly") for name, m in mounts.items() if name != "work")
    assert config.registries.plain_http == []  # the default install policy: every registry over TLS


def test_an_oci_dataset_and_pull_secrets_reach_the_worker_and_the_pod() -> None:
    dataset = "oci://registry.example.com/datasets/chat@" + DIGEST
    obj = qm(calibration__uri=dataset, job__imagePullSecrets=[{"name": "worker-pull"}],
             job__gpus=None, job__resources={"limits": {"nvidia.com/gpu": 2}})
    result = plan(QmObserved(obj, now=NOW), IMAGE)
    config = CalibrationConfig.model_validate_json(result.apply[0]["data"][calibration.CONFIG_FILE])
    assert config.calibration.uri == dataset  # pulled and verified by the worker, with the same credentials
    pod_spec = job_of(result)["spec"]["template"]["spec"]
    assert pod_spec["imagePullSecrets"] == [{"name": "worker-pull"}]
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"  # the limit, not a default 1


def test_configmap_holds_a_worker_config_that_round_trips() -> None:
    obj = qm(calibration__configMapRef={"name": "calib", "key": "samples.jsonl"})
    del obj["spec"]["calibration"]["uri"]
    cm = plan(QmObserved(obj, now=NOW), IMAGE).apply[0]
    config = CalibrationConfig.model_validate_json(cm["data"][calibration.CONFIG_FILE])
    assert config.base_model.startswith("hf://meta-llama/")
    assert [s.name for s in config.calibration.slices] == ["chat", "code", "retrieval-qa"]
    assert config.calibration.uri == "file:///etc/quantrol/data/samples.jsonl"
    assert config.calibration.slices[1].quality_gate is not None
    assert config.calibration.slices[1].quality_gate.min_top1_agreement == 0.85
    assert config.artifact is not None and config.artifact.tag == "llama-3-1-8b-w4a16-g1"


def test_pvc_model_is_mounted_read_only_and_rewritten_to_a_path() -> None:
    obj = qm(baseModel={"uri": "pvc://models/llama-8b"})
    result = plan(QmObserved(obj, now=NOW), IMAGE)
    config = CalibrationConfig.model_validate_json(result.apply[0]["data"][calibration.CONFIG_FILE])
    assert config.base_model == "file:///models/models/llama-8b"
    volumes = job_of(result)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "base-model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in volumes


@pytest.mark.parametrize(
    ("edits", "reason", "field"),
    [
        ({"baseModel": {"uri": "s3://bucket/llama"}}, "InvalidSpec", "spec.baseModel.uri"),
        ({"baseModel": {"uri": "oci://registry.example.com/llama:latest"}}, "InvalidSpec", "spec.baseModel.uri"),
        ({"quantization__scheme": "W8A8"}, "InvalidSpec", "spec.quantization.groupSize"),
        ({"calibration__slices": []}, "InvalidSpec", "spec.calibration.slices"),
    ],
)
def test_hopeless_specs_fail_naming_the_field_and_create_nothing(
    edits: dict[str, Any], reason: str, field: str
) -> None:
    result = plan(QmObserved(qm(**edits), now=NOW), IMAGE)
    assert result.apply == [] and result.status["phase"] == "Failed"
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == reason and field in ready["message"]
    # Planning again from the written status changes nothing: no hot loop of writes or Jobs.
    again = plan(QmObserved(qm(status=result.status, **edits), now=NOW), IMAGE)
    assert again.apply == [] and merge_patch(result.status, again.status) == {} and again.events == []


def _finished(result: TerminationResult) -> tuple[dict[str, Any], Any]:
    first = plan(QmObserved(qm(), now=NOW), IMAGE)
    job = with_status(job_of(first), **complete())
    terminated = {"exitCode": 0, "reason": "Completed", "message": result.to_message()}
    return job, plan(QmObserved(qm(status=first.status), jobs=[job], pods=[pod(terminated)], now=NOW), IMAGE)


def test_a_qualified_published_result_makes_the_model_ready() -> None:
    result = TerminationResult(
        phase=WorkerPhase.READY, reason=CalibrationReason.SUCCEEDED, artifact_ref=f"registry.example.com/m@{DIGEST}",
        digest=DIGEST, size_bytes=123, gate_passed=True,
        quality=[SliceHeadline(slice="chat", mean_kl=0.01, top1=0.97, ppl_ratio=1.01, passed=True)],
        base_model_digest="sha256:base", calibration_data_digest="sha256:data",
    )
    _job, done = _finished(result)
    status = done.status
    assert status["phase"] == "Ready" and status["artifact"]["ref"].endswith(DIGEST)
    assert status["artifact"]["shortDigest"] == "ab" * 6
    assert status["quality"][0] == {"slice": "chat", "meanKlDivergence": 0.01, "top1Agreement": 0.97,
                                    "perplexityRatio": 1.01, "passed": True, "failedLimits": []}
    assert conditions(status) == {t: ("True", "Succeeded") for t in ("Calibrated", "QualityQualified",
                                                                      "Published", "Ready")}
    assert [e.reason for e in done.events] == ["Ready"]


def test_a_gate_rejection_keeps_the_evidence_and_names_the_slice() -> None:
    result = TerminationResult(
        phase=WorkerPhase.REJECTED, reason=CalibrationReason.QUALITY_GATE_FAILED, stage=Stage.EVALUATE,
        message="slice code failed: top1Agreement 0.71 < 0.85", report_ref=f"registry.example.com/m@{DIGEST}",
        gate_passed=False,
        quality=[SliceHeadline(slice="chat", passed=True), SliceHeadline(slice="code", passed=False,
                                                                          failed=["minTop1Agreement"])],
    )
    _job, done = _finished(result)
    status = done.status
    assert status["phase"] == "Rejected" and "artifact" not in status
    assert conditions(status)["Calibrated"] == ("True", "QualityGateFailed")
    assert conditions(status)["QualityQualified"] == ("False", "QualityGateFailed")
    assert DIGEST in next(c for c in status["conditions"] if c["type"] == "Published")["message"]
    assert [q["passed"] for q in status["quality"]] == [True, False]
    assert done.events[0].type == "Warning"


def test_a_kernel_precheck_rejection_says_calibration_did_not_run() -> None:
    result = TerminationResult(phase=WorkerPhase.REJECTED, reason=CalibrationReason.KERNEL_INCOMPATIBLE,
                               stage=Stage.PRECHECK, message="W8A16 has no kernel on cpu-x86")
    _job, done = _finished(result)
    assert done.status["phase"] == "Rejected"
    assert conditions(done.status)["Calibrated"] == ("False", "KernelIncompatible")


@pytest.mark.parametrize(
    ("job_status", "terminated", "reason"),
    [
        (failed("DeadlineExceeded"), None, "DeadlineExceeded"),
        (failed("BackoffLimitExceeded"), {"exitCode": 137, "reason": "OOMKilled"}, "OOMKilled"),
        (failed("BackoffLimitExceeded"), {"exitCode": 1, "reason": "Error", "message": "Traceback…"},
         "BackoffLimitExceeded"),
        (complete(), {"exitCode": 0, "reason": "Completed", "message": "not json"}, "NoResult"),
    ],
)
def test_job_failures_end_in_failed_with_the_reason(job_status: dict[str, Any], terminated: dict[str, Any] | None,
                                                     reason: str) -> None:
    first = plan(QmObserved(qm(), now=NOW), IMAGE)
    job = with_status(job_of(first), **job_status)
    pods = [pod(terminated, phase="Failed")] if terminated else []
    done = plan(QmObserved(qm(status=first.status), jobs=[job], pods=pods, now=NOW), IMAGE)
    assert done.status["phase"] == "Failed"
    assert conditions(done.status)["Ready"] == ("False", reason)


def test_a_running_job_is_calibrating_and_an_unpullable_image_says_so() -> None:
    first = plan(QmObserved(qm(), now=NOW), IMAGE)
    running = with_status(job_of(first), active=1)
    status = plan(QmObserved(qm(status=first.status), jobs=[running], pods=[pod()], now=NOW), IMAGE).status
    assert status["phase"] == "Calibrating"
    pulling = plan(QmObserved(qm(status=first.status), jobs=[running], pods=[pod(waiting="ImagePullBackOff")],
                              now=NOW), IMAGE).status
    assert pulling["phase"] == "Pending" and "cannot be pulled" in pulling["message"]


def test_lasttransitiontime_moves_only_when_a_condition_status_does() -> None:
    first = plan(QmObserved(qm(), now=NOW), IMAGE)
    later = datetime(2026, 11, 23, 12, 5, tzinfo=UTC)
    again = plan(QmObserved(qm(status=first.status), jobs=[with_status(job_of(first), active=1)], pods=[pod()],
                            now=later), IMAGE)
    before = {c["type"]: c["lastTransitionTime"] for c in first.status["conditions"]}
    after = {c["type"]: c["lastTransitionTime"] for c in again.status["conditions"]}
    assert before == after  # Ready stayed False, the others Unknown: no transition


def test_a_finished_generation_is_never_calibrated_again_but_a_spec_change_is() -> None:
    ready_status = {"phase": "Ready", "observedGeneration": 1, "conditions": []}
    assert plan(QmObserved(qm(status=ready_status), now=NOW), IMAGE).apply == []
    old_job = with_status(job_of(plan(QmObserved(qm(), now=NOW), IMAGE)), active=1)
    changed = plan(QmObserved(qm(generation=2, status=ready_status), jobs=[old_job], now=NOW), IMAGE)
    assert job_of(changed)["metadata"]["name"].endswith("calib-g2")
    assert [d["name"] for d in changed.delete] == [old_job["metadata"]["name"]]  # the old spec's run is withdrawn
    assert changed.status["phase"] == "Pending" and changed.status["observedGeneration"] == 2


def test_termination_message_fits_in_4kb_even_with_many_slices() -> None:
    result = TerminationResult(phase=WorkerPhase.REJECTED, reason=CalibrationReason.QUALITY_GATE_FAILED,
                               message="x" * 5000,
                               quality=[SliceHeadline(slice=f"slice-{i}", mean_kl=0.1234567, passed=False,
                                                      failed=["maxMeanKlDivergence"]) for i in range(64)])
    text = result.to_message()
    assert len(text.encode()) <= 4096 and json.loads(text)["phase"] == "Rejected"


def test_a_name_too_long_for_its_children_fails_naming_the_field() -> None:
    obj = qm()
    obj["metadata"]["name"] = "m" * 60
    result = plan(QmObserved(obj=obj, now=NOW), IMAGE)
    assert result.apply == [] and result.status["phase"] == "Failed"
    assert result.status["message"].startswith("metadata.name must be a DNS-1035 label")


# --- credentials and the install policy ---


def test_a_missing_credentials_secret_waits_and_says_which_field_and_how() -> None:
    problem = "spec.artifact.credentialsSecretRef: Secret registry-credentials not found in namespace llm-serving"
    waiting = plan(QmObserved(qm(), now=NOW, credentials_problem=problem), IMAGE)
    assert waiting.apply == [] and waiting.status["phase"] == "Pending"
    assert conditions(waiting.status)["Ready"] == ("False", "CredentialsMissing")
    assert problem in waiting.status["message"]
    created = plan(QmObserved(qm(status=waiting.status), now=NOW), IMAGE)  # the Secret appeared
    assert [o["kind"] for o in created.apply] == ["ConfigMap", "Job"]


def test_a_registry_refusal_names_the_registry_the_401_and_the_secret() -> None:
    result = TerminationResult(phase=WorkerPhase.FAILED, reason=CalibrationReason.REGISTRY_UNAUTHORIZED,
                               stage=Stage.PUBLISH, message="push access to registry.example.com/models/x: "
                               "registry.example.com answered HTTP 401 Unauthorized: it asks for credentials, "
                               "and no registry credentials were given (checked before calibrating)")
    _job, done = _finished(result)
    ready = next(c for c in done.status["conditions"] if c["type"] == "Ready")
    assert done.status["phase"] == "Failed" and ready["reason"] == "RegistryUnauthorized"
    assert "registry.example.com" in ready["message"] and "401" in ready["message"]
    assert "spec.artifact.credentialsSecretRef" in ready["message"]


def test_plain_http_is_only_what_the_install_policy_allows() -> None:
    from quantrol_operator.policy import InstallPolicy

    obj = qm(artifact={"repository": "registry.ci.svc:5000/models/x", "insecure": True})
    refused = plan(QmObserved(obj, now=NOW), IMAGE)
    ready = next(c for c in refused.status["conditions"] if c["type"] == "Ready")
    assert refused.apply == [] and ready["reason"] == "RefusedByInstallPolicy"
    assert "spec.artifact.insecure" in ready["message"] and "registry.ci.svc:5000" in ready["message"]
    listed = InstallPolicy.model_validate({"registries": {"plainHttp": ["registry.ci.svc"]}})
    allowed = plan(QmObserved(obj, now=NOW), IMAGE, listed)
    config = CalibrationConfig.model_validate_json(allowed.apply[0]["data"][calibration.CONFIG_FILE])
    assert config.registries.plain_http == ["registry.ci.svc"]
