"""The candidate arm's health: the launcher's kernel report (its /kernels endpoint while it runs, its termination
message once it stopped), or why the arm cannot run at all (the fetch step's termination message)."""

from __future__ import annotations

import json
import logging
from typing import Any

from quantrol_operator.api.servingpolicy import EngineReport, KernelReport
from quantrol_operator.children import serving
from quantrol_operator.kube import Kube
from quantrol_operator.observe import http
from quantrol_operator.policy import ReadBounds
from quantrol_worker.addresses import Addresses, service_url
from quantrol_worker.contracts import KernelVerdict

log = logging.getLogger(__name__)


def terminated_messages(pods: list[dict[str, Any]], container: str, init: bool) -> list[str]:
    """Termination messages of `container` in `pods` that ended with a non-zero exit code (now or last time)."""
    key = "initContainerStatuses" if init else "containerStatuses"
    out = []
    for pod in pods:
        for status in (pod.get("status") or {}).get(key, []):
            if status.get("name") != container:
                continue
            for state in (status.get("state") or {}, status.get("lastState") or {}):
                terminated = state.get("terminated") or {}
                if terminated.get("exitCode", 0) != 0:
                    out.append(str(terminated.get("message") or terminated.get("reason") or "exited"))
    return out


def kernel_report(raw: dict[str, Any]) -> KernelReport:
    """The launcher's /kernels JSON or termination message as status keeps it, every part bounded."""
    kernels = [k.get("kernel", "") if isinstance(k, dict) else str(k) for k in raw.get("kernels") or []]
    mismatches = "; ".join(f"{m.get('reason')}: {m.get('detail')}" for m in raw.get("mismatches") or []
                           if isinstance(m, dict))
    message = " ".join(part for part in (str(raw.get("message") or ""), mismatches) if part)
    verdict = str(raw.get("verdict") or "")
    return KernelReport(
        verdict=KernelVerdict(verdict) if verdict in KernelVerdict._value2member_map_ else KernelVerdict.UNKNOWN,
        kernels=[str(k)[:256] for k in kernels if k][:32], message=message[:1024])


def launcher_report(addresses: Addresses, namespace: str, policy: str, ref: str,
                    bounds: ReadBounds | None = None) -> dict[str, Any] | None:
    """The /kernels JSON of the launcher serving `ref`, or None: not up yet, gone, or an answer out of bounds."""
    arm = serving.arm_name(policy, ref)
    bounds = bounds or ReadBounds()  # the launcher runs in a tenant-chosen image: the install's bounds
    try:
        report = http.request_json(addresses.url(service_url(arm, namespace, serving.LAUNCHER_PORT, "/kernels")),
                                   total_seconds=bounds.total_seconds, max_bytes=bounds.max_bytes)
    except (OSError, ValueError) as exc:
        log.debug("launcher of %s/%s not read: %s", namespace, arm, exc)
        return None
    return report if isinstance(report, dict) else None


def envelope(kube: Kube, namespace: str, policy: str, ref: str, report: dict[str, Any] | None) -> EngineReport | None:
    """What serves the arm of `ref`: the launcher's word on its engine (`report`: version, device, settings, flags)
    and the engine container's image digest from its pods; None until the engine has reported (it is starting)."""
    engine = report.get("engine") if report is not None else None
    if report is None or not isinstance(engine, dict) or not engine.get("version"):
        return None
    selector = ",".join(f"{k}={v}" for k, v in serving.arm_selector(policy, ref).items())
    images = [str(c.get("imageID") or "") for pod in kube.list_objects("v1", "Pod", namespace, selector)
              for c in (pod.get("status") or {}).get("containerStatuses") or [] if c.get("name") == "engine"]
    listed = report.get("flags")
    flags = listed if isinstance(listed, list) else []
    settings = {str(k)[:64]: str(v)[:128] for k, v in engine.items() if k not in ("version", "device_config")}
    return EngineReport(version=str(engine["version"])[:64],
                        device=str(engine.get("device_config") or "")[:64] or None,
                        image=next((i[:256] for i in images if i), None),
                        flags=[str(f)[:256] for f in flags][:64], settings=dict(list(settings.items())[:16]))


def health(kube: Kube, namespace: str, policy: str, ref: str,
           report: dict[str, Any] | None) -> tuple[KernelReport | None, str | None]:
    """(the launcher's kernel report, or None; why the candidate cannot run, or None). `report`: what its launcher
    answered (launcher_report); without one, the pods say why."""
    if report is not None:
        return kernel_report(report), None
    selector = ",".join(f"{k}={v}" for k, v in serving.arm_selector(policy, ref).items())
    pods = kube.list_objects("v1", "Pod", namespace, selector)
    for message in terminated_messages(pods, "engine", init=False):
        try:
            report = json.loads(message)
        except ValueError:
            continue
        if isinstance(report, dict) and report.get("verdict"):
            return kernel_report(report), None
    fetch = terminated_messages(pods, "fetch", init=True)
    return None, (f"the artifact fetch refused to start the candidate: {fetch[-1][:1024]}" if fetch else None)


def fetch_failure(kube: Kube, namespace: str, policy: str, ref: str) -> str | None:
    """Why an arm's fetch step refused to start it (its termination message: a 401, a digest mismatch, a volume too
    small), or None: what an arm that is not ready says in its readiness condition."""
    selector = ",".join(f"{k}={v}" for k, v in serving.arm_selector(policy, ref).items())
    fetch = terminated_messages(kube.list_objects("v1", "Pod", namespace, selector), "fetch", init=True)
    return fetch[-1][:1024] if fetch else None
