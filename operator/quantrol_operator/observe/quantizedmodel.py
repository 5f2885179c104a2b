"""What a QuantizedModel pass needs from the world: the Jobs it owns and the pods of this generation's Job."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from quantrol_operator.children import calibration, label_value
from quantrol_operator.kube import Kube
from quantrol_operator.planning.quantizedmodel import QmObserved


def observe(kube: Kube, obj: dict[str, Any], now: datetime) -> QmObserved:
    meta = obj["metadata"]
    selector = f"{calibration.LABEL_QM}={label_value(meta['name'])}"
    jobs = kube.list_owned("batch/v1", "Job", meta["namespace"], meta["uid"], selector)
    current = calibration.job_name(meta["name"], int(meta.get("generation", 1)))
    job = next((j for j in jobs if j["metadata"]["name"] == current), None)
    pods = kube.list_owned("v1", "Pod", meta["namespace"], job["metadata"]["uid"], selector) if job else []
    return QmObserved(obj=obj, jobs=jobs, pods=pods, now=now)
