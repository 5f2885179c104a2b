"""ServingPolicy handlers: gather facts (children, kernels, SLO metrics), plan, apply, push, patch status."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from quantrol_operator import metrics
from quantrol_operator.api import servingpolicy as sp_api
from quantrol_operator.api.common import GROUP, VERSION
from quantrol_operator.api.servingpolicy import RolloutPhase, ServingPolicySpec
from quantrol_operator.children import monitoring, router, serving
from quantrol_operator.children.serving import LABEL_POLICY
from quantrol_operator.handlers.common import DEFAULTS, Events, handle, kube
from quantrol_operator.observe import analysis
from quantrol_operator.planning import routers
from quantrol_operator.planning.servingpolicy import SpObserved, Window, plan
from quantrol_worker.localservices import pod_url, service_url

HTTP_TIMEOUT = 3.0
PUSH_TIMEOUT = 2.0  # per router pod; pushes run concurrently, so a hung pod delays a pass by about this much
log = logging.getLogger(__name__)
# None: this operator writes no PodMonitors; else the extra labels they carry. Decided once, at start-up.
_pod_monitor_labels: dict[str, str] | None = None
# The status of the last failed PodMonitor write per (namespace, name), so a failure is logged once, not every pass.
_pod_monitor_failures: dict[tuple[str, str], int] = {}


@kopf.on.startup()
def detect_pod_monitors(logger: kopf.Logger, **_: Any) -> None:
    """Decide whether to write PodMonitors (QUANTROL_POD_MONITORS; `auto` asks API discovery once) and say so."""
    global _pod_monitor_labels
    try:
        enabled, why = DEFAULTS.pod_monitors_enabled(lambda: kube().serves(monitoring.API_VERSION, monitoring.KIND))
    except ApiException as exc:
        raise kopf.TemporaryError(f"API discovery failed ({exc.status} {exc.reason}); retrying", delay=5) from exc
    _pod_monitor_labels = dict(DEFAULTS.pod_monitor_labels) if enabled else None
    logger.info("%s: %s", "writing one PodMonitor per ServingPolicy" if enabled else "writing no PodMonitors", why)


def _http_json(url: str, body: bytes | None = None, token: str = "", timeout: float = HTTP_TIMEOUT) -> Any:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # cluster-internal URLs only
        return json.loads(response.read() or b"null")


def _terminated_messages(pods: list[dict[str, Any]], container: str, init: bool) -> list[str]:
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


def _kernel_report(raw: dict[str, Any]) -> dict[str, Any]:
    """The launcher's /kernels JSON or termination message, in the shape status keeps (KernelReport)."""
    kernels = [k.get("kernel", "") if isinstance(k, dict) else str(k) for k in raw.get("kernels") or []]
    mismatches = "; ".join(f"{m.get('reason')}: {m.get('detail')}" for m in raw.get("mismatches") or [])
    message = " ".join(part for part in (str(raw.get("message") or ""), mismatches) if part)
    return {"verdict": raw.get("verdict") or "unknown", "kernels": [k for k in kernels if k][:32],
            "message": message[:1024]}


def _candidate_health(namespace: str, policy: str, ref: str) -> tuple[dict[str, Any] | None, str | None]:
    """The launcher's kernel report, or why the candidate cannot run (from its pods' termination messages)."""
    arm = serving.arm_name(policy, ref)
    try:
        report = _http_json(service_url(arm, namespace, serving.LAUNCHER_PORT, "/kernels"))
        if isinstance(report, dict):
            return _kernel_report(report), None
    except (OSError, urllib.error.URLError, ValueError):
        pass  # not up yet, or gone: the pods say why
    pods = kube().list_objects("v1", "Pod", namespace, ",".join(f"{k}={v}" for k, v in
                                                                 serving.arm_selector(policy, ref).items()))
    for message in _terminated_messages(pods, "engine", init=False):
        try:
            report = json.loads(message)
        except ValueError:
            continue
        if isinstance(report, dict) and report.get("verdict"):
            return _kernel_report(report), None
    fetch = _terminated_messages(pods, "fetch", init=True)
    return None, (f"the artifact fetch refused to start the candidate: {fetch[-1]}" if fetch else None)


def _token(namespace: str, policy: str) -> tuple[str, bool]:
    """(admin token, whether the Secret must be created)."""
    secret = kube().get("v1", "Secret", namespace, router.admin_secret_name(policy))
    if secret is None:
        return secrets.token_urlsafe(32), True
    data = (secret.get("data") or {}).get(router.TOKEN_KEY)
    string = (secret.get("stringData") or {}).get(router.TOKEN_KEY)
    return (base64.b64decode(data).decode() if data else str(string or "")), False


@dataclass
class _Delivery:
    """What this operator knows of one policy's router pods (lost on restart: it then pushes once more to each)."""

    confirmed: dict[str, int] = field(default_factory=dict)  # pod key → the config version it confirmed
    refused: dict[str, str] = field(default_factory=dict)  # pod key → why it last refused a push (logged once)


# (namespace, policy) → its router pods' confirmations; passes of one policy never overlap (handlers.common.handle).
_deliveries: dict[tuple[str, str], _Delivery] = {}


def _push(url: str, config: bytes, token: str) -> tuple[int | None, str]:
    """POST the router config to one pod's admin endpoint: (the version it says it applied, why it refused)."""
    try:
        answer = _http_json(url, config, token, timeout=PUSH_TIMEOUT)
    except urllib.error.HTTPError as exc:  # a wrong token, or two writers disagreeing under one version number
        with contextlib.suppress(OSError):
            return None, f"{exc.code} {exc.read(512).decode(errors='replace').strip()}"
        return None, f"{exc.code} {exc.reason}"
    except (OSError, urllib.error.URLError, ValueError):
        return None, ""  # not up yet, or gone: the next pass pushes again
    version = answer.get("applied_version") if isinstance(answer, dict) else None
    return (version if isinstance(version, int) else None), ""


def _push_all(namespace: str, pods: list[routers.RouterPod], config: str, token: str,
              delivery: _Delivery) -> dict[str, int | None]:
    """Push to every pod at once, each bounded by PUSH_TIMEOUT: a hung pod delays the pass, never stalls it.
    Returns pod key → the version it applied (None: no answer); a refusal is logged once per pod and reason."""
    urls = {p.name: pod_url(p.ip, namespace, p.name, router.ROUTER_PORT, "/quantrol/config") for p in pods}
    reachable = [p for p in pods if urls[p.name]]
    if not reachable:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(reachable), 16), thread_name_prefix="router-push") as pool:
        futures = {p: pool.submit(_push, str(urls[p.name]), config.encode(), token) for p in reachable}
    answers: dict[str, int | None] = {}
    for pod, future in futures.items():
        answers[pod.key], why = future.result()
        if why and delivery.refused.get(pod.key) != why:
            log.warning("router pod %s/%s refused the config push: %s", namespace, pod.name, why)
        delivery.refused[pod.key] = why
    return answers


def _sync_routers(status: dict[str, Any], children: list[dict[str, Any]], deployments: list[dict[str, Any]],
                  namespace: str, policy: str, token: str) -> None:
    """Push the router config to every router pod until each confirms it; the ConfigMap stays the durable copy.

    Which pods, and what counts as confirmed, is planning.routers (pure). Every pass lists the router pods (one
    read) and pushes only to those that have not confirmed the desired version since their container started, so
    a steady state pushes nothing, while a new or restarted replica is caught up at the next pass.
    """
    document = next((c["data"][router.CONFIG_FILE] for c in children
                     if c["kind"] == "ConfigMap" and c["metadata"]["name"] == router.router_name(policy)), None)
    if document is None:
        return  # an invalid spec: no router config this pass, status.router stays as it was
    state = dict(status.get("router") or {})
    desired = int(state.get("version", 0))
    deployment = next((d for d in deployments if d["metadata"]["name"] == router.router_name(policy)), None)
    pods: list[routers.RouterPod] = []
    if deployment is not None:  # else created this pass: no pods yet
        selector = f"{LABEL_POLICY}={policy},{router.LABEL_COMPONENT}=router"
        pods = routers.current_pods(kube().list_objects("v1", "Pod", namespace, selector), deployment)
    delivery = _deliveries.setdefault((namespace, policy), _Delivery())
    answers = _push_all(namespace, routers.to_push(pods, desired, delivery.confirmed), document, token, delivery)
    delivery.confirmed = routers.remember(pods, delivery.confirmed, answers)
    delivery.refused = {p.key: delivery.refused[p.key] for p in pods if delivery.refused.get(p.key)}
    status["router"] = routers.router_status(state, pods, desired, delivery.confirmed)


def _reconcile(obj: dict[str, Any]) -> Events:
    meta = obj["metadata"]
    namespace, policy = meta["namespace"], meta["name"]
    now = datetime.now(UTC)
    k = kube()
    try:
        spec: ServingPolicySpec | None = ServingPolicySpec.model_validate(obj.get("spec") or {})
    except ValueError:
        spec = None
    qm = None
    if spec is not None and spec.candidate.quantized_model_ref is not None:
        qm = k.get("quantrol.io/v1alpha1", "QuantizedModel", namespace, spec.candidate.quantized_model_ref.name)
    deployments = k.list_owned("apps/v1", "Deployment", namespace, meta["uid"], f"{LABEL_POLICY}={policy}")
    status = obj.get("status") or {}
    kernels, failed = None, None
    candidate = status.get("candidateArtifact")
    if candidate and candidate != status.get("stableArtifact"):
        kernels, failed = _candidate_health(namespace, policy, candidate)
    token, create_token = _token(namespace, policy)
    window = None
    if spec is not None and analysis.due(status, spec, now):
        window = analysis.window(analysis.source_for(spec, DEFAULTS.prometheus_url), namespace, policy, status, spec)
    observed = SpObserved(obj=obj, quantized_model=qm, deployments=deployments, candidate_kernels=kernels,
                          candidate_failed=failed, window=window, router_token=token if create_token else "", now=now)
    result = plan(observed, (DEFAULTS.serving_image, DEFAULTS.router_image), _pod_monitor_labels)
    for child in result.apply:
        if child["kind"] == monitoring.KIND:
            _apply_pod_monitor(child)
        else:
            k.apply(child)
    for ref in result.delete:
        k.delete(ref)
    _sync_routers(result.status, result.apply, deployments, namespace, policy, token)
    k.patch_status(obj, result.status)
    _export(obj, result.status, window, result.rollback)
    return [(e.type, e.reason, e.message) for e in result.events]


def _apply_pod_monitor(desired: dict[str, Any]) -> None:
    """Write the PodMonitor; a failure is logged (once, until it changes), never raised.

    Scraping must not hold the rollout: a refused write (the Prometheus Operator's CRDs removed after start-up,
    QUANTROL_POD_MONITORS=true without them, RBAC without the podmonitors rule) would otherwise fail every pass,
    before the router sync and the status patch, and so block rollbacks too. With no metrics the analysis reads
    no data, which holds the rollout (inconclusive), never promotes it.
    """
    meta = desired["metadata"]
    key = (meta["namespace"], meta["name"])
    try:
        kube().apply(desired)
    except ApiException as exc:
        if _pod_monitor_failures.get(key) != exc.status:
            log.warning("PodMonitor %s/%s not written (%s %s); the rollout goes on without it",
                        *key, exc.status, exc.reason)
        _pod_monitor_failures[key] = int(exc.status or 0)
    else:
        _pod_monitor_failures.pop(key, None)


def _export(obj: dict[str, Any], status: dict[str, Any], window: Window | None,
            rollback: dict[str, Any] | None) -> None:
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    for phase in RolloutPhase:
        metrics.ROLLOUT_PHASE.labels(ns, name, phase.value).set(1 if status.get("phase") == phase.value else 0)
    metrics.CANDIDATE_WEIGHT.labels(ns, name).set((status.get("weights") or {}).get("candidate", 0))
    since = status.get("phaseSince")
    if since:
        metrics.ROLLOUT_PHASE_SINCE.labels(ns, name).set(datetime.fromisoformat(since.replace("Z", "+00:00"))
                                                           .timestamp())
    for judgement in (window.judgements if window else []):
        metrics.ANALYSIS_VERDICTS.labels(ns, name, judgement.slo, judgement.verdict.value).inc()
    if rollback is not None:
        metrics.ROLLBACKS.labels(ns, name, rollback.get("reason", ""), rollback.get("slo", "")).inc()


@kopf.on.event(GROUP, VERSION, sp_api.PLURAL)
async def serving_policy_changed(type: str, body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    if type == "DELETED" or body.meta.get("deletionTimestamp"):
        return
    await handle(body, logger, sp_api.KIND, "event", _reconcile)


@kopf.timer(GROUP, VERSION, sp_api.PLURAL, interval=DEFAULTS.poll_seconds, initial_delay=1)
async def serving_policy_poll(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    """The control loop's clock: arms' readiness, kernels, and SLO analysis when due (reads; writes on change)."""
    if body.meta.get("deletionTimestamp"):
        return
    await handle(body, logger, sp_api.KIND, "timer", _reconcile)


@kopf.on.delete(GROUP, VERSION, sp_api.PLURAL)
def serving_policy_deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    """deletionPolicy Orphan: take the owner references off the arms so nothing garbage-collects them.

    The PodMonitor is orphaned with them: arms that keep serving keep being scraped (and deleting it is one
    `kubectl delete podmonitor` once they go).
    """
    _deliveries.pop((str(body.meta.namespace), str(body.meta.name)), None)
    if dict(body.spec).get("deletionPolicy", "Delete") != "Orphan":
        return
    namespace, policy, uid = body.meta.namespace, body.meta.name, body.meta.uid
    assert namespace is not None and uid is not None
    children = [(api_version, kind, c) for api_version, kind in (("apps/v1", "Deployment"), ("v1", "Service"),
                                                                 ("v1", "ConfigMap"))
                for c in kube().list_owned(api_version, kind, namespace, uid, f"{LABEL_POLICY}={policy}")]
    # Secrets are read by name only: the operator holds no right to list them (or read others by enumeration).
    secret = kube().get("v1", "Secret", namespace, router.admin_secret_name(policy))
    if secret is not None:
        children.append(("v1", "Secret", secret))
    if _pod_monitor_labels is not None:
        children += _owned_pod_monitor(namespace, policy, uid, logger)
    for api_version, kind, child in children:
        refs = child["metadata"].get("ownerReferences") or []
        kube().patch(api_version, kind, namespace, child["metadata"]["name"],
                     {"metadata": {"ownerReferences": [r for r in refs if r.get("uid") != uid]}})
    logger.info("deletionPolicy Orphan: %s/%s removed, its arms and router keep serving", namespace, policy)


def _owned_pod_monitor(namespace: str, policy: str, uid: str,
                       logger: kopf.Logger) -> list[tuple[str, str, dict[str, Any]]]:
    """The policy's PodMonitor, read by name like the Secret (the operator never lists PodMonitors)."""
    try:
        monitor = kube().get(monitoring.API_VERSION, monitoring.KIND, namespace, monitoring.pod_monitor_name(policy))
    except ApiException as exc:  # as when writing it: monitoring never holds the policy's deletion back
        logger.warning("PodMonitor %s/%s not read (%s %s); left as it is", namespace, policy, exc.status, exc.reason)
        return []
    if monitor is None or not any(r.get("uid") == uid for r in monitor["metadata"].get("ownerReferences") or []):
        return []
    return [(monitoring.API_VERSION, monitoring.KIND, monitor)]
