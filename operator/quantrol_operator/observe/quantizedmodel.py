"""What a QuantizedModel pass needs from the world: the Jobs it owns, the pods of this generation's Job, and whether
the registry credentials Secret its spec names is there."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from quantrol_operator.children import calibration, label_value
from quantrol_operator.kube import Kube
from quantrol_operator.observe.credentials import docker_config_problem
from quantrol_operator.planning.quantizedmodel import QmObserved


def observe(kube: Kube, obj: dict[str, Any], now: datetime) -> QmObserved:
    meta = obj["metadata"]
    selector = f"{calibration.LABEL_QM}={label_value(meta['name'])}"
    jobs = kube.list_owned("batch/v1", "Job", meta["namespace"], meta["uid"], selector)
    current = calibration.job_name(meta["name"], int(meta.get("generation", 1)))
    job = next((j for j in jobs if j["metadata"]["name"] == current), None)
    pods = kube.list_owned("v1", "Pod", meta["namespace"], job["metadata"]["uid"], selector) if job else []
    secret = ((obj.get("spec") or {}).get("artifact") or {}).get("credentialsSecretRef") or {}
    problem = None
    if job is None and isinstance(secret, dict) and secret.get("name"):  # before the Job: its pod would need it
        problem = docker_config_problem(kube, meta["namespace"], str(secret["name"]),
                                        "spec.artifact.credentialsSecretRef")
    return QmObserved(obj=obj, jobs=jobs, pods=pods, now=now, credentials_problem=problem)
