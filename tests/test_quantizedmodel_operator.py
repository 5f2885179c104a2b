"""The QuantizedModel handlers wired to a real `kopf run` process and the KMock API.

The emulation has no Job controller and no kubelet, so these tests play that part openly: they create the
Job's pod, set its container's termination message and the Job's status, as the kubelet and the Job
controller would. Everything the operator does (create the ConfigMap and Job, read the pod by owner
reference, patch status) goes through real HTTP.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from quantrol_dev.localstack.kubeapi import KubeAPIServer, OperatorProcess, kopf_watches
from quantrol_dev.localstack.procs import wait_until
from quantrol_worker.contracts import CalibrationReason, SliceHeadline, TerminationResult, WorkerPhase

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "cd" * 32
GROUP, VERSION, PLURAL = "quantrol.io", "v1alpha1", "quantizedmodels"


@pytest.fixture
def fast_operator(kubeapi: KubeAPIServer, kubeconfig: Path, tmp_path: Path) -> Iterator[OperatorProcess]:
    began = time.time()
    operator = OperatorProcess(kubeconfig=kubeconfig, workdir=tmp_path / "operator",
                               env={"QUANTROL_POLL_SECONDS": "1"})
    try:
        operator.start(ready=lambda: kopf_watches(kubeapi, began, ("quantizedmodels", "servingpolicies")))
        yield operator
    finally:
        operator.stop()


class Cluster:
    """The API as a test sees it, plus the kubelet's and Job controller's part, played explicitly."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.ns = namespace

    def create_credentials(self, name: str = "registry-credentials") -> None:
        """The docker-config Secret the sample names, as `kubectl create secret docker-registry` makes it."""
        config = base64.b64encode(json.dumps({"auths": {"registry.example.com": {"auth": "dTpw"}}}).encode())
        self.core.create_namespaced_secret(self.ns, {"metadata": {"name": name},
                                                     "type": "kubernetes.io/dockerconfigjson",
                                                     "data": {".dockerconfigjson": config.decode()}})

    def apply_qm(self, name: str, credentials: bool = True, **spec_edits: Any) -> dict[str, Any]:
        if credentials and not self.core.list_namespaced_secret(self.ns).items:
            self.create_credentials()
        obj = yaml.safe_load((ROOT / "e2e/samples/quantizedmodel-llama-8b-w4a16.yaml").read_text())
        obj["metadata"] = {"name": name, "namespace": self.ns}
        obj["spec"].update(spec_edits)
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, obj)
        return result

    def qm(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return result

    def jobs(self) -> list[Any]:
        return list(self.batch.list_namespaced_job(self.ns).items)

    def wait_phase(self, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
        wait_until(lambda: (self.qm(name).get("status") or {}).get("phase") == phase, timeout=timeout,
                   what=f"QuantizedModel {name} to reach {phase}")
        return self.qm(name)

    def wait_job(self, name: str, timeout: float = 20) -> Any:
        wait_until(lambda: any(j.metadata.name == name for j in self.jobs()), timeout=timeout, what=f"Job {name}")
        return self.batch.read_namespaced_job(name, self.ns)

    def kubelet_runs(self, job: Any, message: str | None, exit_code: int = 0, reason: str = "Completed") -> None:
        """What the Job controller and kubelet would do: a pod owned by the Job, terminated, and the Job's status."""
        labels = dict(job.spec.template.metadata.labels)
        pod = {
            "metadata": {"name": f"{job.metadata.name}-abcde", "labels": labels,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job.metadata.name,
                                              "uid": job.metadata.uid, "controller": True}]},
            "spec": {"containers": [{"name": "calibrate", "image": "worker"}]},
        }
        self.core.create_namespaced_pod(self.ns, pod)
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason}
        if message is not None:
            terminated["message"] = message
        self.core.patch_namespaced_pod_status(pod["metadata"]["name"], self.ns, {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "calibrate", "image": "worker", "imageID": "", "ready": False,
                                   "restartCount": 0, "state": {"terminated": terminated}}]}})
        done = ({"type": "Complete", "status": "True"} if exit_code == 0
                else {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
        self.batch.patch_namespaced_job_status(job.metadata.name, self.ns, {"status": {
            "succeeded" if exit_code == 0 else "failed": 1, "conditions": [done]}})


@pytest.fixture
def cluster(kube_client: kubernetes.client.ApiClient, namespace: str) -> Cluster:
    return Cluster(kube_client, namespace)


def test_calibration_success_publishes_the_artifact_in_status(cluster: Cluster, fast_operator: OperatorProcess) -> None:
    created = cluster.apply_qm("tiny-w8a8")
    job = cluster.wait_job("tiny-w8a8-calib-g1")
    assert job.metadata.owner_references[0].uid == created["metadata"]["uid"]
    assert cluster.core.read_namespaced_config_map("tiny-w8a8-calib-g1", cluster.ns).data["config.json"]
    assert cluster.wait_phase("tiny-w8a8", "Pending")["status"]["jobName"] == "tiny-w8a8-calib-g1"

    result = TerminationResult(phase=WorkerPhase.READY, reason=CalibrationReason.SUCCEEDED, digest=DIGEST,
                               artifact_ref=f"registry.example.com/models/tiny@{DIGEST}", size_bytes=4096,
                               quality=[SliceHeadline(slice="chat", top1=0.98, passed=True)])
    cluster.kubelet_runs(job, result.to_message())
    status = cluster.wait_phase("tiny-w8a8", "Ready")["status"]
    assert status["artifact"]["ref"] == f"registry.example.com/models/tiny@{DIGEST}"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert status["observedGeneration"] == 1
    events = cluster.core.list_namespaced_event(cluster.ns).items
    assert {"JobCreated", "Ready"} <= {e.reason for e in events}


def test_quality_rejection_and_job_failure_are_reported(cluster: Cluster, fast_operator: OperatorProcess) -> None:
    cluster.apply_qm("rejected")
    cluster.apply_qm("crashed")
    rejected = TerminationResult(phase=WorkerPhase.REJECTED, reason=CalibrationReason.QUALITY_GATE_FAILED,
                                 message="slice code: top1Agreement 0.62 < 0.85", gate_passed=False,
                                 report_ref=f"registry.example.com/models/tiny@{DIGEST}")
    cluster.kubelet_runs(cluster.wait_job("rejected-calib-g1"), rejected.to_message())
    cluster.kubelet_runs(cluster.wait_job("crashed-calib-g1"), "Traceback: RuntimeError: boom", exit_code=1,
                         reason="Error")
    status = cluster.wait_phase("rejected", "Rejected")["status"]
    assert "top1Agreement" in status["message"] and DIGEST in status["message"]
    status = cluster.wait_phase("crashed", "Failed")["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "BackoffLimitExceeded" and "boom" in ready["message"]


def test_a_spec_change_starts_a_new_generation(cluster: Cluster, fast_operator: OperatorProcess) -> None:
    cluster.apply_qm("evolving")
    first = cluster.wait_job("evolving-calib-g1")
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, "evolving",
                                                  {"spec": {"quantization": {"method": "rtn"}}})
    cluster.wait_job("evolving-calib-g2")
    wait_until(lambda: cluster.qm("evolving")["status"].get("observedGeneration") == 2, timeout=20,
               what="observedGeneration 2")
    # The first generation's calibration was still running: it is withdrawn, not left burning a GPU.
    wait_until(lambda: first.metadata.name not in {j.metadata.name for j in cluster.jobs()}, timeout=20,
               what="the generation-1 Job to be deleted")


def test_a_hopeless_spec_fails_once_and_is_not_retried(cluster: Cluster, fast_operator: OperatorProcess,
                                                       kubeapi: KubeAPIServer) -> None:
    began = time.time()
    cluster.apply_qm("from-s3", baseModel={"uri": "s3://models/llama-8b"})
    status = cluster.wait_phase("from-s3", "Failed")["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    # Admission refuses s3:// (no worker reads it); here the API emulation has no admission, so the operator's own
    # validation says it, naming the field, in the same words.
    assert ready["reason"] == "InvalidSpec" and "spec.baseModel.uri" in ready["message"]
    time.sleep(60)  # the bar: watch a minute of polling (every 1 s here) and count what it wrote
    assert cluster.jobs() == []
    writes = [w for w in kubeapi.writes(since=began, user_agent_prefix="")
              if w.get("name") == "from-s3" and w["resource"].startswith("quantizedmodels")]
    status_writes = [w for w in writes if w["resource"] == "quantizedmodels/status"]
    assert 1 <= len(status_writes) <= 2, writes  # the Failed status, and nothing after it
    assert fast_operator.process is not None and fast_operator.process.alive()


def test_a_missing_credentials_secret_holds_the_job_until_it_exists(cluster: Cluster,
                                                                    fast_operator: OperatorProcess) -> None:
    """GitOps may apply the QuantizedModel before its Secret: it waits, saying which field and how to fix it, and
    its Job appears once the Secret does, with the Secret mounted as the registry credentials file."""
    cluster.apply_qm("early", credentials=False)
    wait_until(lambda: (cluster.qm("early").get("status") or {}).get("conditions"), timeout=20, what="a status")
    status = cluster.qm("early")["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert status["phase"] == "Pending" and ready["reason"] == "CredentialsMissing"
    assert "spec.artifact.credentialsSecretRef" in ready["message"] and "not found" in ready["message"]
    assert cluster.jobs() == []
    cluster.create_credentials()
    job = cluster.wait_job("early-calib-g1")
    secrets = [v.secret.secret_name for v in job.spec.template.spec.volumes if v.secret]
    assert secrets == ["registry-credentials"]
