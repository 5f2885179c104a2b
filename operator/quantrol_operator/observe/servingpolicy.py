"""Everything a ServingPolicy pass needs from the world, read once: its spec (validated once), its QuantizedModel,
its Deployments, the candidate's health and kernels, the router admin token, the analysis window when due, and while
an arm is not ready, why: its fetch step's refusal, or the registry credentials Secret it waits for."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime
from typing import Any

from quantrol_operator.api.kinds import QUANTIZED_MODEL
from quantrol_operator.children import label_value, qualification, router
from quantrol_operator.children.serving import LABEL_ARM, LABEL_POLICY, arm_name
from quantrol_operator.kube import Kube
from quantrol_operator.observe import analysis, candidate
from quantrol_operator.observe.credentials import docker_config_problem
from quantrol_operator.planning.servingpolicy import SpObserved, credentials_secret, read_spec
from quantrol_operator.policy import InstallPolicy
from quantrol_worker.addresses import Addresses


def router_token(kube: Kube, namespace: str, policy: str) -> tuple[str, bool]:
    """(the router admin token, whether its Secret must be created): read by name, never listed."""
    secret = kube.get("v1", "Secret", namespace, router.admin_secret_name(policy))
    if secret is None:
        return secrets.token_urlsafe(32), True
    data = (secret.get("data") or {}).get(router.TOKEN_KEY)
    string = (secret.get("stringData") or {}).get(router.TOKEN_KEY)
    return (base64.b64decode(data).decode() if data else str(string or "")), False


def _arms_ready(deployments: list[dict[str, Any]]) -> bool:
    arms = [d for d in deployments if LABEL_ARM in (d["metadata"].get("labels") or {})]
    return bool(arms) and all((d.get("status") or {}).get("readyReplicas", 0) >= d["spec"].get("replicas", 1)
                              for d in arms)


def _why_arms_wait(kube: Kube, namespace: str, name: str, status: dict[str, Any], deployments: list[dict[str, Any]],
                   spec: Any, qm: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(why the stable arm's fetch refused, why the registry credentials Secret cannot be used): read only while an
    arm is not ready, and the Secret only by name (never its data into status)."""
    stable = status.get("stableArtifact") or (spec.baseline.artifact if spec else None)
    stable_failed = None
    if stable and not _arms_ready([d for d in deployments if d["metadata"]["name"] == arm_name(name, stable)]):
        stable_failed = candidate.fetch_failure(kube, namespace, name, stable)
    secret = credentials_secret(spec, qm) if spec is not None else None
    if secret is None or _arms_ready(deployments):
        return stable_failed, None
    field = ("spec.serving.artifactCredentialsSecretRef" if spec.serving.artifact_credentials_secret_ref
             else "the candidate QuantizedModel's spec.artifact.credentialsSecretRef")
    return stable_failed, docker_config_problem(kube, namespace, secret, field)


def qualification_job(kube: Kube, namespace: str, policy: str,
                      status: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The running attempt's Job and its pods (by name from status; nothing while no attempt runs)."""
    q = status.get("qualification") or {}
    if q.get("state") != "Running" or not q.get("jobName"):
        return None, []
    job = kube.get("batch/v1", "Job", namespace, str(q["jobName"]))
    if job is None:
        return None, []
    selector = f"{LABEL_POLICY}={label_value(policy)},{qualification.LABEL_COMPONENT}={qualification.COMPONENT}"
    return job, kube.list_owned("v1", "Pod", namespace, job["metadata"]["uid"], selector)


def observe(kube: Kube, addresses: Addresses, prometheus_url: str, obj: dict[str, Any],
            now: datetime, policy: InstallPolicy | None = None) -> tuple[SpObserved, str]:
    """The facts of one pass, and the router admin token (to push configs with, created or not)."""
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    policy = policy or InstallPolicy()
    read = read_spec(obj, policy, prometheus_url)
    spec = read.spec
    qm = None
    if spec is not None and spec.candidate.quantized_model_ref is not None:
        qm = kube.get(QUANTIZED_MODEL.api_version, QUANTIZED_MODEL.kind, namespace,
                      spec.candidate.quantized_model_ref.name)
    deployments = kube.list_owned("apps/v1", "Deployment", namespace, meta["uid"],
                                  f"{LABEL_POLICY}={label_value(name)}")
    status = obj.get("status") or {}
    launchers: dict[str, dict[str, Any] | None] = {}  # each launcher's /kernels, read at most once a pass

    def launcher(ref: str) -> dict[str, Any] | None:
        if ref not in launchers:
            launchers[ref] = candidate.launcher_report(addresses, namespace, name, ref, policy.reads)
        return launchers[ref]

    kernels, failed = None, None
    pinned = status.get("candidateArtifact")
    if pinned and pinned != status.get("stableArtifact"):
        kernels, failed = candidate.health(kube, namespace, name, pinned, launcher(pinned))
    engine_reports = {}
    known = {a.get("artifact") for a in status.get("arms") or [] if (a.get("engine") or {}).get("version")}
    for ref in {status.get("stableArtifact"), pinned, status.get("rollbackTarget")} - known - {None}:
        found = candidate.envelope(kube, namespace, name, str(ref), launcher(str(ref)))  # until it has reported
        if found is not None:
            engine_reports[str(ref)] = found
    job, pods = qualification_job(kube, namespace, name, status)
    token, create_token = router_token(kube, namespace, name)
    window = None
    if spec is not None and not read.refused and analysis.due(status, spec, now):
        window = analysis.window(analysis.source_for(spec, prometheus_url, policy), namespace, name, status, spec,
                                 now)
    stable_failed, problem = _why_arms_wait(kube, namespace, name, status, deployments, spec, qm)
    observed = SpObserved(obj=obj, spec=read, quantized_model=qm, deployments=deployments, candidate_kernels=kernels,
                          candidate_failed=failed, window=window, router_token=token if create_token else "",
                          engine_reports=engine_reports, qualification_job=job, qualification_pods=pods, now=now,
                          credentials_problem=problem, stable_failed=stable_failed)
    return observed, token
