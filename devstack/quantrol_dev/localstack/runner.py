"""The local workload runner: a kubelet and built-in-controller stand-in for the local stack.

A DEVELOPMENT AND TEST TOOL: it lets Jobs and Deployments that the operator creates run on a laptop against
the emulated API (tests/ fixtures, `quantrol demo`). On a real cluster it is never used. It holds no operator
logic: it does what a kubelet, the Job and Deployment controllers and the garbage collector would, for the
subset of the pod spec the stack uses. The rules live in runner_plan.py (pure); this module does the I/O.

It polls Jobs, Deployments and Services every `poll_interval` seconds (simple, bounded, and indifferent to
API restarts: no watch bookkeeping), and runs each container's command as a local process in its own process
group, with its output in `<state dir>/pods/<ns>/<pod>/<container>.log` (the pod's `local-runner.quantrol.io/logs`
annotation names the dir: there is no `kubectl logs`). Conventions:

- Images are never pulled. An image map (`ImageEnv`: fnmatch pattern -> a virtual environment's bin dir)
  decides what runs: that bin dir goes first on PATH, so `quantrol-worker` or `python` resolve to that
  environment's. An unmapped image fails a Job's pod (ErrImagePull, with the map in the message) and keeps
  a Deployment's pod Pending with the same waiting reason, as an image that cannot be pulled would.
- Paths: processes cannot mount, so every volumeMount's mountPath and the terminationMessagePath are
  rewritten to local dirs/files under the state dir wherever they appear as a whole path in command, args,
  env values and the text of mounted ConfigMap/Secret files (a config file naming `/var/quantrol/work` or
  `/dev/termination-log` then points where the process can write). A path a program only knows as a
  built-in default cannot be rewritten: pod specs pass paths explicitly (`--termination-log
  /dev/termination-log`), which works unchanged on a cluster. emptyDir -> a dir shared by the pod's
  containers (also `medium: Memory`, e.g. /dev/shm: the processes still share the machine's own /dev/shm, which a
  process cannot be given; sizeLimit is not enforced); ephemeral (a claim per pod on a cluster) -> a dir of the pod;
  configMap/secret -> files written per container when it starts (no live updates);
  persistentVolumeClaim -> a dir per claim under the state dir that outlives pods; hostPath -> itself.
- Ports: each declared containerPort gets a free port on 127.0.0.1, recorded in the pod's
  `local-runner.quantrol.io/ports` annotation (JSON, containerPort -> local). Processes see `QUANTROL_PORT_<port>`
  and `QUANTROL_PORT_<NAME>`; flags ending in `port` (`--port=8000`, `--metrics-port 9000`), env vars
  `PORT`/`*_PORT` and `localhost:8000` in args are rewritten when the number is a declared containerPort;
  `--host 0.0.0.0` becomes 127.0.0.1. Readiness probes (httpGet, tcpSocket, exec) use the mapped ports.
- Services: `services.json` in the state dir maps `"ns/name"` to `{"host": "127.0.0.1", "ports":
  {"<service port>": <local port>}}` over ready, selected pods (the first by name); every process gets its
  path in `QUANTROL_LOCAL_SERVICES`, so clients can resolve `http://name.ns.svc:port`. Every pod's
  `status.podIP` is 127.0.0.1, so the same file's `"pods"` section maps each running pod, ready or not,
  `"ns/pod"` to `{"host": "127.0.0.1", "ports": {"<containerPort>": <local port>}}`: a client that talks to one
  pod (the operator pushes router configs to every replica) resolves it with `addresses.ServicesFile.pod_url`.
- Pods are owned directly by their Job or Deployment (no ReplicaSets); deployment pods carry the
  `pod-template-hash` label. Status is written through `/status` as merge patches, only when it changed.
- A small garbage collector deletes pods, services, configmaps, secrets, jobs and deployments whose owners
  (all of them) are gone; the emulation has none of its own.
- Resources are recorded (they stay in the pod spec), not enforced, except that at most `serving_cap` pods
  whose main containers map to a `serving` environment hold processes at once (terminating ones included);
  the rest stay Pending with PodScheduled=False, reason Unschedulable, and a message saying why. Like the
  kubelet's static CPU manager, each admitted serving pod gets an exclusive share of this process's CPUs (the
  CPUs split into `serving_cap` slots; none when there are fewer CPUs than slots), see `cpu_slots`.
- Liveness and startup probes are not run; restart back-off is 1, 2, 4, ... 10 s; a Job retries failed
  pods at once (each retry a new pod, also under OnFailure) and keeps the pods its deadline stopped (Failed,
  reason DeadlineExceeded); a pod deleted by a client is replaced; grace periods are capped at `max_grace` s.
- The runner's state is in memory: a restarted runner does not adopt the pods of its predecessor.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets as pyrandom
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes

from quantrol_dev.localstack import addresses
from quantrol_dev.localstack.procs import ManagedProcess, free_port, port_is_open
from quantrol_dev.localstack.runner_plan import (
    CONFIG_ERROR,
    JSON,
    NODE_NAME,
    PODS_SECTION,
    TERMINAL,
    ContainerRun,
    Endpoint,
    ImageEnv,
    JobPod,
    Launch,
    LaunchError,
    Phase,
    PodContext,
    PodView,
    Probe,
    Replica,
    Terminated,
    admit,
    build_launch,
    cap_message,
    cpu_slots,
    declared_ports,
    fallback_message,
    file_volume_source,
    free_slot,
    is_serving_pod,
    mount_paths,
    orphaned,
    owner_refs,
    plan_deployment,
    plan_job,
    plan_pod,
    pod_is_ready,
    pod_status,
    pods_map,
    services_map,
    template_hash,
    truncate_message,
    volume_files,
)

log = logging.getLogger("quantrol.localstack.runner")

USER_AGENT = "quantrol-local-runner"
LOGS_ANNOTATION = "local-runner.quantrol.io/logs"
PORTS_ANNOTATION = "local-runner.quantrol.io/ports"  # JSON: {"<containerPort>": <local port>}
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's generateName alphabet
# What the collector scans for dangling owner references: (apiVersion, plural).
DEPENDENTS = (("v1", "pods"), ("v1", "services"), ("v1", "configmaps"), ("v1", "secrets"),
              ("batch/v1", "jobs"), ("apps/v1", "deployments"))
BUILTIN_PLURALS = {
    ("v1", "Pod"): "pods", ("v1", "Service"): "services", ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets", ("batch/v1", "Job"): "jobs", ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "ReplicaSet"): "replicasets", ("apps/v1", "StatefulSet"): "statefulsets",
}
# Without an explicit empty ProxyHandler, urllib sends 127.0.0.1 probes to $http_proxy when one is set.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300]}")
        self.status = status


def api_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"
    return f"{path}/{name}" if name else path


class KubeClient:
    """The few REST calls the runner makes, as JSON dicts, through the official client and an explicit kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        self._api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self._api.user_agent = USER_AGENT  # lets tests tell the runner's writes from the operator's

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self._api.param_serialize(method=method, resource_path=path, header_params=headers, body=body)
        response = self._api.call_api(*request[:4], _request_timeout=10)
        data = response.read()
        if response.status >= 400:
            raise ApiError(response.status, method, path, data.decode(errors="replace"))
        return json.loads(data) if data else None

    def list(self, path: str) -> list[JSON]:
        return list(self.call("GET", path).get("items") or [])

    def get(self, path: str) -> JSON | None:
        try:
            return dict(self.call("GET", path))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, path: str) -> None:
        """Delete; an object that is already gone is fine (the collector and the runner may race for it)."""
        try:
            self.call("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise

    def patch_status(self, path: str, status: JSON) -> None:
        self.call("PATCH", f"{path}/status", {"status": status}, "application/merge-patch+json")

    def close(self) -> None:
        self._api.close()


def _meta(obj: Mapping[str, Any]) -> JSON:
    return dict(obj.get("metadata") or {})


def _subset_equal(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """True when every field we would write already has that value (a steady state makes no write)."""
    return all(json.dumps(v, sort_keys=True) == json.dumps(old.get(k), sort_keys=True) for k, v in new.items())


@dataclass
class _ProbeState:
    next_at: datetime
    future: concurrent.futures.Future[bool] | None = None
    successes: int = 0
    failures: int = 0


@dataclass
class _PodRun:
    """One pod this runner created: its processes and the states its status is rendered from."""

    namespace: str
    name: str
    owner: JSON  # the ownerReference
    template: JSON
    template_hash: str
    serving: bool
    restart_policy: str
    created_at: datetime
    pod_dir: Path
    init: list[ContainerRun]
    main: list[ContainerRun]
    in_api: bool = False
    admitted: bool = False
    prepared: bool = False
    unschedulable: str = ""
    phase: Phase = "Pending"
    started_at: datetime | None = None
    reason: str = ""
    message: str = ""
    retired: bool = False  # deleted (or its owner gone): waiting only for its processes to end
    stop_deadline: datetime | None = None
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    launches: dict[str, Launch] = field(default_factory=dict)
    probes: dict[str, _ProbeState] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    volume_dirs: dict[str, Path] = field(default_factory=dict)
    last_status: JSON | None = None
    cpus: tuple[int, ...] = ()  # a serving pod's exclusive CPU slot (cpu_slots), () when unpinned

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def spec(self) -> JSON:
        return dict(self.template.get("spec") or {})

    @property
    def labels(self) -> dict[str, str]:
        return dict(_meta(self.template).get("labels") or {})

    def view(self) -> PodView:
        reason, message = self.reason, self.message
        fatal = next((r for r in [*self.init, *self.main] if r.fatal), None)
        if self.phase == "Failed" and not reason and fatal is not None:
            reason, message = fatal.waiting_reason, fatal.waiting_message
        return PodView(
            restart_policy=self.restart_policy, init=tuple(self.init), main=tuple(self.main), phase=self.phase,
            scheduled=self.admitted, unschedulable_message=self.unschedulable, started_at=self.started_at,
            reason=reason, message=message,
        )

    @property
    def ready(self) -> bool:
        return pod_is_ready(self.view())

    def runs(self) -> Iterator[ContainerRun]:
        yield from self.init
        yield from self.main

    def set_run(self, updated: ContainerRun) -> None:
        for runs in (self.init, self.main):
            for i, run in enumerate(runs):
                if run.name == updated.name:
                    runs[i] = updated

    def container(self, name: str) -> JSON:
        spec = self.spec
        return next(c for c in [*(spec.get("initContainers") or []), *spec["containers"]] if c["name"] == name)


@dataclass
class _Observed:
    jobs: list[JSON]
    deployments: list[JSON]
    services: list[JSON]
    pods: list[JSON]


class LocalRunner:
    """Runs the Jobs' and Deployments' pods of the emulated API as local processes (a dev/test tool).

    `start()` polls in a background thread every `poll_interval` seconds; `stop()` ends the thread and every
    process it started (nothing is left listening). `tick()` is one pass, for callers that drive it.
    """

    def __init__(
        self,
        *,
        kubeconfig: Path,
        image_map: Sequence[ImageEnv],
        state_dir: Path,
        namespaces: Sequence[str] | None = None,
        serving_cap: int = 2,
        poll_interval: float = 0.3,
        gc_interval: float = 1.0,
        max_grace: float = 10.0,
        workdir: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.image_map = list(image_map)
        # Absolute: pod folders, services.json and PVC paths are handed to processes with other working folders.
        self.state_dir = state_dir.resolve()
        self.namespaces = list(namespaces) if namespaces else None
        self.serving_cap = serving_cap
        self.cpu_slots = cpu_slots(sorted(os.sched_getaffinity(0)), serving_cap)
        self.poll_interval = poll_interval
        self.gc_interval = gc_interval
        self.max_grace = max_grace
        self.workdir = (workdir or Path.cwd()).resolve()
        self.extra_env = dict(extra_env or {})
        self._clock = clock
        self._kube = KubeClient(kubeconfig)
        self._runs: dict[tuple[str, str], _PodRun] = {}
        self._rollouts: dict[tuple[str, str], datetime] = {}  # (deployment uid, template hash) -> first seen
        self._plurals: dict[tuple[str, str], str] = dict(BUILTIN_PLURALS)
        self._services_written: JSON | None = None
        self._last_gc = 0.0
        self._probe_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="runner-probe")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_pids: list[int] = []  # every process ever started: teardown checks that none lives
        self.allocated_ports: list[int] = []  # every local port handed out: teardown checks that none listens
        self.errors = 0
        self.last_error: BaseException | None = None

    @property
    def services_path(self) -> Path:
        return self.state_dir / "services.json"

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> LocalRunner:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_services({})
        log.warning(
            "local workload runner starting: a development/test stand-in for the kubelet and the Job/Deployment "
            "controllers, never used on a real cluster; namespaces %s, serving cap %d, state in %s",
            self.namespaces or "all", self.serving_cap, self.state_dir,
        )
        for entry in self.image_map:
            log.info("image %s -> %s%s", entry.pattern, entry.bin_dir, " (serving)" if entry.serving else "")
        self._thread = threading.Thread(target=self._loop, name="local-runner", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.tick()
            except Exception as exc:  # the API may be restarting; the next pass retries
                self.errors += 1
                self.last_error = exc
                log.exception("local runner pass failed")
            self._stop.wait(max(0.05, self.poll_interval - (time.monotonic() - began)))

    def stop(self) -> None:
        """End the loop, then every process (SIGTERM, SIGKILL after the capped grace period). Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        runs = list(self._runs.values())
        for run in runs:  # signal everything first, so that the grace periods run side by side
            self._signal_stop(run)
        for run in runs:
            for proc in run.procs.values():
                proc.stop(timeout=self._grace(run))
            run.procs.clear()
        # SIGKILL is delivered asynchronously: wait (bounded) until no process of any group we started is left.
        deadline = time.monotonic() + 5.0
        while (left := groups_alive(self.started_pids)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            log.error("local runner: processes of groups %s outlived the stop", sorted(left))
        self._probe_pool.shutdown(wait=True, cancel_futures=True)
        self._kube.close()
        log.warning("local workload runner stopped; %d processes were started in its lifetime", len(self.started_pids))

    def __enter__(self) -> LocalRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def live_pids(self) -> list[int]:
        """Processes started by this runner that are still alive (children are reaped by their ManagedProcess)."""
        return [pid for pid in self.started_pids if pid_alive(pid)]

    # -- one pass ---------------------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self._clock()
        observed = self._observe()
        if time.monotonic() - self._last_gc >= self.gc_interval:
            self._collect_garbage()
            self._last_gc = time.monotonic()
        self._retire_unowned(observed)
        for run in list(self._runs.values()):
            self._poll(run, now)
        # Pods first, as a kubelet reports before a controller reacts: a client that reads a Job as Complete
        # (or a Deployment as ready) then finds its pods saying the same.
        self._write_pod_statuses(now)
        for job in observed.jobs:
            self._sync_job(job, now)
        for deployment in observed.deployments:
            self._sync_deployment(deployment, now)
        self._admit()
        for run in list(self._runs.values()):
            self._advance(run, now)
        self._forget_finished_retirees()
        self._write_pod_statuses(now)
        endpoints = self._endpoints()
        self._write_services({**services_map(observed.services, endpoints), PODS_SECTION: pods_map(endpoints)})

    def _scoped(self, api_version: str, plural: str) -> list[JSON]:
        if self.namespaces is None:
            return self._kube.list(api_path(api_version, plural))
        return [obj for ns in self.namespaces for obj in self._kube.list(api_path(api_version, plural, ns))]

    def _observe(self) -> _Observed:
        return _Observed(
            jobs=self._scoped("batch/v1", "jobs"),
            deployments=self._scoped("apps/v1", "deployments"),
            services=self._scoped("v1", "services"),
            pods=self._scoped("v1", "pods"),
        )

    # -- ownership: deleted owners, deleted pods, the garbage collector ----------------------------------------

    def _retire_unowned(self, observed: _Observed) -> None:
        owners = {_meta(o).get("uid") for o in [*observed.jobs, *observed.deployments]}
        pods = {(_meta(p).get("namespace"), _meta(p).get("name")) for p in observed.pods}
        for run in list(self._runs.values()):
            if run.retired:
                continue
            if run.owner["uid"] not in owners:
                log.info("pod %s/%s: its %s is gone; stopping it", *run.key, run.owner["kind"])
                self._retire(run, delete=True)
            elif run.in_api and run.key not in pods:
                log.info("pod %s/%s was deleted; stopping its processes", *run.key)
                self._retire(run, delete=False)

    def _plural(self, api_version: str, kind: str) -> str | None:
        """The resource name for a kind, from discovery (None while the API does not know it, e.g. a CRD to come)."""
        key = (api_version, kind)
        if key not in self._plurals:
            with contextlib.suppress(ApiError):
                root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
                resources = self._kube.call("GET", root).get("resources") or []
                found = next((r["name"] for r in resources if r.get("kind") == kind and "/" not in r["name"]), None)
                if found is not None:
                    self._plurals[key] = found
        return self._plurals.get(key)

    def _collect_garbage(self) -> None:
        dependents = [obj for version, plural in DEPENDENTS for obj in self._scoped(version, plural)]
        live: dict[tuple[str, str], set[str]] = {}
        for api_version, kind in {(r.api_version, r.kind) for obj in dependents for r in owner_refs(obj)}:
            plural = self._plural(api_version, kind)
            if plural is None:
                continue  # unknown owner kind: keep its dependants rather than guess
            try:
                owners = self._scoped(api_version, plural)
            except ApiError:
                continue
            live[(api_version, kind)] = {str(_meta(o).get("uid")) for o in owners}
        for obj in orphaned(dependents, live):
            meta = _meta(obj)
            plural = self._plural(str(obj.get("apiVersion")), str(obj.get("kind")))
            if plural is None:
                continue
            log.info("collecting %s %s/%s: its owners are gone", obj.get("kind"), meta.get("namespace"), meta["name"])
            self._kube.delete(api_path(str(obj["apiVersion"]), plural, meta.get("namespace"), meta["name"]))

    # -- controllers ------------------------------------------------------------------------------------------

    def _owned(self, owner: Mapping[str, Any]) -> list[_PodRun]:
        uid = _meta(owner).get("uid")
        return [r for r in self._runs.values() if r.owner["uid"] == uid and not r.retired]

    def _sync_job(self, job: JSON, now: datetime) -> None:
        meta = _meta(job)
        runs = self._owned(job)
        plan = plan_job(job, [JobPod(r.name, r.phase, r.ready) for r in runs], now)
        for run in runs:
            if run.name in plan.kill:
                self._kill(run, plan.kill_reason, "Pod was active on the node longer than the specified deadline"
                           if plan.kill_reason == "DeadlineExceeded" else f"the Job failed: {plan.kill_reason}")
        name, uid = str(meta["name"]), str(meta["uid"])
        labels = {"job-name": name, "batch.kubernetes.io/job-name": name,
                  "controller-uid": uid, "batch.kubernetes.io/controller-uid": uid}
        for _ in range(plan.start):
            self._create_pod(job, labels, restart_policy="Never")  # every retry is a new pod
        self._write_status(job, "jobs", plan.status)

    def _sync_deployment(self, deployment: JSON, now: datetime) -> None:
        meta, spec = _meta(deployment), deployment.get("spec") or {}
        current = template_hash(spec.get("template") or {})
        since = self._rollouts.setdefault((str(meta["uid"]), current), now)
        runs = self._owned(deployment)
        replicas = [Replica(r.name, r.template_hash, r.phase, r.ready, r.created_at) for r in runs]
        plan = plan_deployment(deployment, replicas, now, since)
        for run in runs:
            if run.name in plan.stop:
                log.info("deployment %s/%s: stopping pod %s", meta.get("namespace"), meta["name"], run.name)
                self._retire(run, delete=True)
        labels = {"pod-template-hash": current}
        for _ in range(plan.start):
            self._create_pod(deployment, labels, restart_policy=None)
        self._write_status(deployment, "deployments", plan.status)

    def _write_status(self, obj: JSON, plural: str, status: JSON) -> None:
        if _subset_equal(status, obj.get("status") or {}):
            return
        meta = _meta(obj)
        try:
            self._kube.patch_status(api_path(str(obj["apiVersion"]), plural, meta["namespace"], meta["name"]), status)
        except ApiError as exc:
            if exc.status != 404:  # deleted since the list: nothing left to report to
                raise

    def _create_pod(self, owner: JSON, extra_labels: Mapping[str, str], restart_policy: str | None) -> None:
        meta = _meta(owner)
        template = dict((owner.get("spec") or {}).get("template") or {})
        spec = dict(template.get("spec") or {})
        ns = str(meta["namespace"])
        name = f"{str(meta['name'])[:52]}-{''.join(pyrandom.choice(NAME_ALPHABET) for _ in range(5))}"
        labels = {**(_meta(template).get("labels") or {}), **extra_labels}
        template_meta = {**_meta(template), "labels": labels}
        pod_dir = self.state_dir / "pods" / ns / name
        ports = {port: free_port() for port in declared_ports(spec)}  # known at creation: the annotation shows them
        owner_ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                         "annotations": {**(template_meta.get("annotations") or {}), LOGS_ANNOTATION: str(pod_dir),
                                         PORTS_ANNOTATION: json.dumps({str(k): v for k, v in ports.items()})},
                         "ownerReferences": [owner_ref]},
            "spec": {**spec, "nodeName": NODE_NAME},
        }
        run = _PodRun(
            namespace=ns, name=name, owner=owner_ref, template={"metadata": template_meta, "spec": spec},
            template_hash=template_hash(template), serving=is_serving_pod(spec, self.image_map),
            restart_policy=restart_policy or str(spec.get("restartPolicy") or "Always"),
            created_at=self._clock(), pod_dir=pod_dir,
            init=[ContainerRun(c["name"], str(c.get("image", "")), waiting_reason="PodInitializing")
                  for c in spec.get("initContainers") or []],
            main=[ContainerRun(c["name"], str(c.get("image", "")), waiting_reason="PodInitializing")
                  for c in spec.get("containers") or []],
        )
        try:
            created = self._kube.call("POST", api_path("v1", "pods", ns), body)
        except ApiError as exc:
            if exc.status not in (403, 422):
                raise
            # Refused by admission (Pod Security, validation): a ReplicaSet or Job controller records FailedCreate
            # and tries again later; so does this one, at its next pass.
            log.warning("%s %s/%s: FailedCreate: %s", owner["kind"], ns, meta["name"], exc)
            return
        run.template["metadata"]["uid"] = _meta(created).get("uid", "")
        run.in_api = True
        run.ports = ports
        self.allocated_ports.extend(ports.values())
        self._runs[run.key] = run
        log.info("%s %s/%s: created pod %s", owner["kind"], ns, meta["name"], name)

    # -- scheduling (the serving cap) --------------------------------------------------------------------------

    def _admit(self) -> None:
        holding = [
            r for r in self._runs.values()
            if r.serving and r.admitted and (r.procs or (r.phase not in TERMINAL and not r.retired))
        ]
        in_use = len(holding)
        waiting = sorted(
            (r for r in self._runs.values() if not r.admitted and not r.retired), key=lambda r: r.created_at
        )
        admitted, held = admit([(r.name, r.serving) for r in waiting], in_use, self.serving_cap)
        for run in waiting:
            if run.name in admitted:
                run.admitted, run.unschedulable, run.started_at = True, "", self._clock()
                if run.serving:
                    run.cpus = free_slot(self.cpu_slots, (r.cpus for r in holding))
                    holding.append(run)
                    if run.cpus:
                        log.info("pod %s/%s: exclusive CPUs %s", *run.key, ",".join(map(str, run.cpus)))
            elif run.name in held and not run.unschedulable:
                run.unschedulable = cap_message(self.serving_cap)
                log.info("pod %s/%s held Pending: %s", *run.key, run.unschedulable)

    # -- the kubelet part ------------------------------------------------------------------------------------

    def _grace(self, run: _PodRun) -> float:
        return min(float(run.spec.get("terminationGracePeriodSeconds", 30)), self.max_grace)

    def _poll(self, run: _PodRun, now: datetime) -> None:
        """Notice exited processes, escalate overdue stops, update readiness and the phase."""
        for name, proc in list(run.procs.items()):
            if proc.alive():
                if run.stop_deadline is not None and now >= run.stop_deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                continue
            self._record_exit(run, name, proc, now)
        for container in run.main:
            if container.state == "running":
                self._update_readiness(run, container, now)
        if run.admitted and not run.reason and run.phase not in TERMINAL:
            run.phase = plan_pod(run.restart_policy, run.init, run.main, now).phase
            if run.phase in TERMINAL:
                log.info("pod %s/%s %s", *run.key, run.phase)

    def _record_exit(self, run: _PodRun, name: str, proc: ManagedProcess, now: datetime) -> None:
        assert proc.popen is not None
        code = proc.popen.returncode
        code = 128 - code if code < 0 else code  # killed by signal N: the kubelet reports 128+N
        proc.stop(timeout=1)  # reap whatever the process left in its group
        del run.procs[name]
        run.probes.pop(name, None)
        launch = run.launches[name]
        message = ""
        with contextlib.suppress(OSError):
            message = truncate_message(launch.termination_path.read_text(errors="replace"))
        if not message.strip() and launch.fallback_to_logs and code != 0:
            message = fallback_message(proc.log_tail(200))
        container = next(r for r in run.runs() if r.name == name)
        ended = Terminated(code, "Completed" if code == 0 else "Error", message.strip(), container.started_at, now)
        run.set_run(replace(container, started_at=None, terminated=ended, ready=False))
        log.info("pod %s/%s: container %s exited with %d", *run.key, name, code)

    def _update_readiness(self, run: _PodRun, container: ContainerRun, now: datetime) -> None:
        probe = run.launches[container.name].readiness
        if probe is None:
            if not container.ready:
                run.set_run(replace(container, ready=True))
            return
        state = run.probes.setdefault(container.name, _ProbeState(next_at=now + timedelta(seconds=probe.initial_delay)))
        if state.future is not None and state.future.done():
            ok = state.future.result()
            state.future = None
            state.successes, state.failures = (state.successes + 1, 0) if ok else (0, state.failures + 1)
            ready = container.ready
            if state.successes >= probe.success_threshold:
                ready = True
            elif state.failures >= probe.failure_threshold:
                ready = False
            if ready != container.ready:
                log.info("pod %s/%s: container %s ready=%s", *run.key, container.name, ready)
                run.set_run(replace(container, ready=ready))
        if state.future is None and now >= state.next_at:
            state.next_at = now + timedelta(seconds=probe.period)
            state.future = self._probe_pool.submit(_run_probe, probe, run.launches[container.name], self.workdir)

    def _advance(self, run: _PodRun, now: datetime) -> None:
        """Start what the pod's plan says is due (init containers in order, then the main ones)."""
        if not run.admitted or run.retired or run.reason or run.phase in TERMINAL:
            return
        if not run.prepared:
            try:
                self._prepare(run)
            except LaunchError as exc:
                for container in run.runs():
                    if container.state == "waiting":
                        run.set_run(replace(container, waiting_reason=exc.reason, waiting_message=exc.message))
                return
        steps = plan_pod(run.restart_policy, run.init, run.main, now)
        run.phase = steps.phase
        for name in steps.start:
            self._start_container(run, name, now)

    def _prepare(self, run: _PodRun) -> None:
        """Pod-level volumes as local dirs, once per pod (ports were chosen when the pod was created)."""
        run.pod_dir.mkdir(parents=True, exist_ok=True)
        (run.pod_dir / "tmp").mkdir(exist_ok=True)
        for volume in run.spec.get("volumes") or []:
            local = self._pod_volume(run, volume)
            if local is not None:
                run.volume_dirs[str(volume["name"])] = local
        run.prepared = True

    def _pod_volume(self, run: _PodRun, volume: Mapping[str, Any]) -> Path | None:
        """The local dir of a volume shared by the pod's containers (None for configMap/secret: per container)."""
        if file_volume_source(volume) is not None:
            return None
        if "emptyDir" in volume:
            target = run.pod_dir / "volumes" / str(volume["name"])
            target.mkdir(parents=True, exist_ok=True)
            return target
        if "ephemeral" in volume:
            # A generic ephemeral volume: on a cluster a claim per pod from its template, deleted with the pod.
            # Here a folder of the pod; its requested size is recorded in the spec, not enforced.
            target = run.pod_dir / "volumes" / str(volume["name"])
            target.mkdir(parents=True, exist_ok=True)
            return target
        if "persistentVolumeClaim" in volume:  # outlives the pod, as the claim's volume would
            claim = self.state_dir / "pvcs" / run.namespace / str(volume["persistentVolumeClaim"]["claimName"])
            claim.mkdir(parents=True, exist_ok=True)
            return claim
        if "hostPath" in volume:
            return Path(str(volume["hostPath"]["path"]))
        raise LaunchError(CONFIG_ERROR, f"volume {volume['name']}: only emptyDir, ephemeral, configMap, secret, "
                                        "persistentVolumeClaim and hostPath are supported by the local runner")

    def _file_volume_dirs(self, run: _PodRun, container: str) -> dict[str, Path]:
        # ConfigMaps and Secrets are read-only in a pod, so a copy per container is faithful, and lets each
        # container's copy carry that container's path rewriting (its termination-message file differs).
        return {
            str(v["name"]): run.pod_dir / "containers" / container / "volumes" / str(v["name"])
            for v in run.spec.get("volumes") or [] if file_volume_source(v) is not None
        }

    def _write_file_volumes(self, run: _PodRun, container: Mapping[str, Any], ctx: PodContext) -> None:
        paths = mount_paths(container, ctx)
        mounted = {str(m.get("name")) for m in container.get("volumeMounts") or []}
        for volume in run.spec.get("volumes") or []:
            found = file_volume_source(volume)
            if found is None or str(volume["name"]) not in mounted:
                continue
            plural, name, source = found
            data = self._key_values(run.namespace, plural, name)
            if data is None and not source.get("optional"):
                kind = "configmap" if plural == "configmaps" else "secret"
                raise LaunchError(CONFIG_ERROR, f'{kind} "{name}" not found (volume {volume["name"]})')
            target = ctx.volume_dirs[str(volume["name"])]
            shutil.rmtree(target, ignore_errors=True)  # a restart sees the object as it is now
            target.mkdir(parents=True)
            for relative, content in volume_files(source, data or {}, paths).items():
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                (target / relative).write_bytes(content)

    def _key_values(self, namespace: str, plural: str, name: str) -> dict[str, bytes] | None:
        """A ConfigMap's or Secret's data as bytes (Secrets and binaryData are base64 in the API)."""
        obj = self._kube.get(api_path("v1", plural, namespace, name))
        if obj is None:
            return None
        out = {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        for key, value in (obj.get("data") or {}).items():
            out[key] = base64.b64decode(value) if plural == "secrets" else str(value).encode()
        out.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
        return out

    def _context(self, run: _PodRun, container: Mapping[str, Any]) -> PodContext:
        config_maps: dict[str, Mapping[str, str]] = {}
        secret_data: dict[str, Mapping[str, str]] = {}
        refs = [*(e.get("valueFrom") or {} for e in container.get("env") or []), *(container.get("envFrom") or [])]
        for ref in refs:
            for key, plural, store in (("configMapKeyRef", "configmaps", config_maps),
                                       ("configMapRef", "configmaps", config_maps),
                                       ("secretKeyRef", "secrets", secret_data),
                                       ("secretRef", "secrets", secret_data)):
                name = str((ref.get(key) or {}).get("name", ""))
                if name and name not in store:
                    data = self._key_values(run.namespace, plural, name)
                    if data is not None:
                        store[name] = {k: v.decode(errors="replace") for k, v in data.items()}
        meta = _meta(run.template)
        names = {name: port for port, name in declared_ports(run.spec).items() if name}
        base_env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(run.pod_dir)),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "TMPDIR": str(run.pod_dir / "tmp"),
            "PYTHONUNBUFFERED": "1",
            **addresses.environment(self.services_path),
            **self.extra_env,
        }
        return PodContext(
            name=run.name, namespace=run.namespace, uid=str(meta.get("uid", "")), labels=run.labels,
            annotations=dict(meta.get("annotations") or {}),
            service_account=str(run.spec.get("serviceAccountName", "default")), pod_dir=run.pod_dir,
            volume_dirs={**run.volume_dirs, **self._file_volume_dirs(run, str(container["name"]))},
            ports=run.ports, port_names=names, config_maps=config_maps, secrets=secret_data, base_env=base_env,
        )

    def _start_container(self, run: _PodRun, name: str, now: datetime) -> None:
        container = next(r for r in run.runs() if r.name == name)
        spec = run.container(name)
        try:
            ctx = self._context(run, spec)
            self._write_file_volumes(run, spec, ctx)
            launch = build_launch(spec, ctx, self.image_map)
        except LaunchError as exc:
            if (container.waiting_reason, container.waiting_message) != (exc.reason, exc.message):
                log.info("pod %s/%s: container %s cannot start: %s", *run.key, name, exc.message)
            run.set_run(replace(container, waiting_reason=exc.reason, waiting_message=exc.message))
            return
        launch.termination_path.parent.mkdir(parents=True, exist_ok=True)
        launch.termination_path.write_text("")
        cwd = Path(launch.cwd) if launch.cwd and Path(launch.cwd).is_dir() else self.workdir
        proc = ManagedProcess(f"{run.namespace}/{run.name}/{name}", launch.argv, run.pod_dir / f"{name}.log",
                              env=dict(launch.env), cwd=cwd, cpus=run.cpus)
        restarted = container.terminated is not None
        previous = container.terminated or container.last_terminated
        count = container.restart_count + (1 if restarted else 0)
        try:
            proc.start()
        except OSError as exc:  # e.g. the command is not in the mapped environment
            ended = Terminated(128, "StartError", f"failed to start {launch.argv[0]!r}: {exc}", None, now)
            run.launches[name] = launch
            run.set_run(replace(container, terminated=ended, last_terminated=previous, restart_count=count))
            return
        self.started_pids.append(proc.pid)
        run.procs[name], run.launches[name] = proc, launch
        run.probes.pop(name, None)
        run.set_run(replace(container, started_at=now, pid=proc.pid, terminated=None, last_terminated=previous,
                            restart_count=count, ready=False, waiting_reason="", waiting_message=""))
        log.info("pod %s/%s: started container %s (pid %d): %s", *run.key, name, proc.pid, " ".join(launch.argv))

    def _signal_stop(self, run: _PodRun) -> None:
        if run.stop_deadline is None:
            run.stop_deadline = self._clock() + timedelta(seconds=self._grace(run))
        for proc in run.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def _kill(self, run: _PodRun, reason: str, message: str) -> None:
        """Stop a pod's processes and fail it with `reason` (its containers' exit codes are still recorded)."""
        if run.reason:
            return
        log.info("pod %s/%s: stopping (%s)", *run.key, reason)
        run.reason, run.message, run.phase = reason, message, "Failed"
        self._signal_stop(run)

    def _retire(self, run: _PodRun, *, delete: bool) -> None:
        """Forget a pod: stop its processes and (when asked) delete its object, as a pod deletion would."""
        run.retired = True
        self._signal_stop(run)
        if delete and run.in_api:
            self._kube.delete(api_path("v1", "pods", run.namespace, run.name))

    def _forget_finished_retirees(self) -> None:
        for run in list(self._runs.values()):
            if run.retired and not run.procs:
                del self._runs[run.key]

    # -- reporting --------------------------------------------------------------------------------------------

    def _write_pod_statuses(self, now: datetime) -> None:
        for run in list(self._runs.values()):
            if run.retired or not run.in_api:
                continue
            status = pod_status(run.view(), run.last_status or {}, now)
            if status == run.last_status:
                continue
            try:
                self._kube.patch_status(api_path("v1", "pods", run.namespace, run.name), status)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                continue  # deleted since the list; the next pass retires it
            run.last_status = status

    def _endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(name=r.name, namespace=r.namespace, labels=r.labels, ready=r.ready, ports=dict(r.ports),
                     named_ports={n: p for p, n in declared_ports(r.spec).items() if n})
            for r in self._runs.values() if not r.retired and r.phase == "Running"
        ]

    def _write_services(self, services: JSON) -> None:
        if services == self._services_written:
            return
        tmp = self.services_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(services, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.services_path)  # atomic: a reader never sees half a file
        self._services_written = services


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def groups_alive(pgids: Sequence[int]) -> set[int]:
    """The process groups among `pgids` that still have a running (not zombie) member, read from /proc."""
    wanted, alive = set(pgids), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp in wanted and state != "Z":
            alive.add(pgrp)
    return alive


def _run_probe(probe: Probe, launch: Launch, workdir: Path) -> bool:
    try:
        if probe.kind == "http":
            with _HTTP.open(probe.target, timeout=probe.timeout) as response:
                return 200 <= int(response.status) < 400
        if probe.kind == "tcp":
            return port_is_open(int(probe.target))
        result = subprocess.run(  # the probe's command comes from the pod spec, as with a kubelet's exec probe
            list(probe.command), env=dict(launch.env), cwd=workdir, capture_output=True, timeout=probe.timeout,
            check=False,
        )
        return result.returncode == 0
    except (OSError, urllib.error.URLError, subprocess.TimeoutExpired, ValueError):
        return False


def load_image_map(path: Path) -> list[ImageEnv]:
    """An image map file: a JSON list of {"pattern", "bin_dir", "serving"?, "entrypoint"?, "env"?}."""
    return [ImageEnv.from_json(entry) for entry in json.loads(path.read_text())]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="quantrol-local-runner",
        description="Run the emulated API's Jobs and Deployments as local processes (a dev/test tool).",
    )
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--image-map", type=Path, required=True, help="JSON list of image map entries")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--namespace", action="append", dest="namespaces", help="repeat; default: all")
    parser.add_argument("--serving-cap", type=int, default=2)
    parser.add_argument("--poll-interval", type=float, default=0.3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runner = LocalRunner(kubeconfig=args.kubeconfig, image_map=load_image_map(args.image_map),
                         state_dir=args.state_dir, namespaces=args.namespaces, serving_cap=args.serving_cap,
                         poll_interval=args.poll_interval)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    runner.start()
    try:
        done.wait()
    finally:
        runner.stop()


if __name__ == "__main__":
    main()
