"""The control-loop rig: the operator (a real `kopf run`) closing the SLO loop over real routers and engine
stand-ins, scraped by a real Prometheus. Shared by tests/test_control_loop.py and bench/bench_control_loop.py.

Played openly by the rig, because nothing local can stand for them: the Deployment controller and the kubelet (arm
Deployments are marked ready; the router Deployment gets one Pod object per router process the rig started, Running
and Ready at 127.0.0.1), the cluster DNS and pod network (a services.json map, the local stack's resolver), and the
engines themselves (quantrol_dev.standin, a labelled stand-in for vLLM whose latency, errors and answers can be
changed at run time). The routers' config files never change after start (there is no kubelet ConfigMap sync here):
every weight they apply was pushed to them by the operator.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from quantrol_dev.fleet import FleetProcess
from quantrol_dev.localstack import addresses
from quantrol_dev.localstack.kubeapi import KubeAPIServer, OperatorProcess, kopf_watches
from quantrol_dev.localstack.procs import ManagedProcess, free_port, port_is_open, wait_until
from quantrol_dev.localstack.prometheus import PrometheusServer, TargetGroup
from quantrol_operator.api.kinds import SERVING_POLICY
from quantrol_operator.children import router, serving
from quantrol_operator.kube import Kube
from quantrol_worker.fleet import Mix, Prompt

STABLE = "oci://127.0.0.1:5000/models/tiny-bf16@sha256:" + "a" * 64
CANDIDATE = "oci://127.0.0.1:5000/models/tiny-w8a8@sha256:" + "b" * 64
TOKEN = "test-admin-token"
POD_TEMPLATE_HASH = "5c8d7f9b6"  # the router pods' ReplicaSet: <router Deployment>-<hash>, as on a cluster


class _Kernels(BaseHTTPRequestHandler):
    report: dict[str, Any] = {"verdict": "native", "kernels": ["CPUInt8ScaledMMLinearKernel"], "message": ""}

    def do_GET(self) -> None:
        body = json.dumps(self.report).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Rig:
    namespace: str
    policy: str
    kube: Kube
    engines: dict[str, int] = field(default_factory=dict)
    router_port: int = 0  # where the router Service answers: the first router pod (the local runner's choice too)
    router_ports: list[int] = field(default_factory=list)  # one router process per router pod, in pod order
    admin_ports: list[int] = field(default_factory=list)  # each router process's admin API (its own port)
    routers: list[ManagedProcess] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)
    operator_metrics_port: int = 0
    operator: OperatorProcess | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def router_pod(self, replica: int) -> str:
        return f"{router.router_name(self.policy)}-{POD_TEMPLATE_HASH}-r{replica}"

    def status(self) -> dict[str, Any]:
        obj = self.kube.get(SERVING_POLICY.api_version, SERVING_POLICY.kind, self.namespace, self.policy) or {}
        return dict(obj.get("status") or {})

    def patch_policy(self, patch: dict[str, Any]) -> None:
        self.kube.patch(SERVING_POLICY.api_version, SERVING_POLICY.kind, self.namespace, self.policy, patch)

    def wait_phase(self, *phases: str, timeout: float = 60) -> dict[str, Any]:
        try:
            wait_until(lambda: self.status().get("phase") in phases, timeout=timeout, interval=0.5, what="phase")
        except TimeoutError as exc:
            status = self.status()
            raise AssertionError(f"phase {status.get('phase')} not in {phases} after {timeout}s; counters "
                                 f"{status.get('counters')}; last analysis {status.get('lastAnalysis')}; router "
                                 f"failures {self.router_failures()}") from exc
        return self.status()

    def behave(self, arm: str, **behaviour: float) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{self.engines[arm]}/standin/behaviour",
                                         data=json.dumps(behaviour).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5):
            pass

    def operator_metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.operator_metrics_port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
        wanted = {"namespace": self.namespace, "policy": self.policy, **labels}
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in wanted.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def router_weights(self, replica: int = 0) -> dict[str, float]:
        port = self.router_ports[replica] if self.router_ports else self.router_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
        return {line.split('arm="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("quantrol_router_weight{")}

    def router_failures(self) -> dict[str, float]:
        """Every router pod's failed and shed requests, summed, by `arm/traffic/kind` (for failure messages: the
        status says an error rate, this says which errors)."""
        wanted = ("quantrol_router_errors_total", "quantrol_router_shed_total")
        totals: dict[str, float] = {}
        for port in self.router_ports or [self.router_port]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
                    text = rsp.read().decode()
            except OSError as exc:  # a frozen or stopped router pod
                totals[f"router on {port} unreadable: {exc!r}"] = 0.0
                continue
            for sample in (s for family in text_string_to_metric_families(text) for s in family.samples):
                if sample.name in wanted:
                    key = "/".join(sample.labels.get(k, "shed") for k in ("arm", "traffic", "kind"))
                    totals[key] = totals.get(key, 0.0) + sample.value
        return totals

    def router_config(self, replica: int) -> tuple[int, dict[str, int]]:
        """(applied version, weight per arm) from one router pod's own admin endpoint."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_ports[replica]}/quantrol/config",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as rsp:
            answer = json.loads(rsp.read())
        return int(answer["version"]), {arm: int(a["weight"]) for arm, a in answer["config"]["arms"].items()}

    def freeze(self, replica: int) -> None:
        """A hung router pod: its process is stopped (SIGSTOP); connections open but nothing answers."""
        os.killpg(self.routers[replica].pid, signal.SIGSTOP)
        self.frozen.add(replica)

    def thaw(self, replica: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.routers[replica].pid, signal.SIGCONT)
        self.frozen.discard(replica)


def policy_manifest(name: str, namespace: str, prometheus_url: str, first_dwell: int = 3, router_replicas: int = 1,
                    grace: int = 0, slos: dict[str, Any] | None = None, **analysis: Any) -> dict[str, Any]:
    """The rig's policy; `grace`: promotionGraceSeconds (the guard after a promotion); `slos`: SLOs replacing the
    rig's own. Probes are off: the rig's artifacts are names without a registry behind them (the router's own tests
    cover probes)."""
    return {
        "apiVersion": SERVING_POLICY.api_version, "kind": SERVING_POLICY.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseline": {"artifact": STABLE}, "candidate": {"artifact": CANDIDATE},
            "routerReplicas": router_replicas,
            "serving": {"batchBudget": {"maxNumSeqs": 8, "maxNumBatchedTokens": 512}},
            # The rig closes the SLO loop; it plays no Job controller, so the qualification Job (tested on its own
            # in tests/test_qualification.py, and run for real by the demo) is skipped here.
            "qualification": {"enabled": False},
            "rollout": {"shadow": {"durationSeconds": 3, "mirrorFraction": 0.5},
                        "canarySteps": [{"weight": 50, "minDwellSeconds": first_dwell},
                                        {"weight": 100, "minDwellSeconds": 2}],
                        "promotionGraceSeconds": grace, "probes": {"ratePerSecond": 0}},
            "analysis": {"prometheus": {"address": prometheus_url}, "intervalSeconds": 1, "windowSeconds": 8,
                         "failureLimit": 2, "successStreak": 2, "minSampleCount": 5, "inconclusiveLimit": 8,
                         "errorLimit": 4, **analysis},
            "slos": {"ttftP99": {"max": 1.0, "maxRelativeToStable": 3.0},
                     "interTokenLatencyP99": {"max": 0.5},
                     "errorRate": {"max": 0.05},
                     "queueTimeP99": {"max": 1.0},
                     "qualityDelta": {"max": 0.5},
                     "agreement": {"min": 0.8},
                     # The stand-ins run at the same speed; the goodput rule is exercised in its unit tests.
                     "goodput": {"minRelativeToStable": 0.3}, **(slos or {})},
        },
    }


@contextlib.contextmanager
def open_rig(kubeapi: KubeAPIServer, kubeconfig: Path, namespace: str, prometheus: PrometheusServer, tmp_path: Path,
             router_replicas: int = 1) -> Iterator[Rig]:
    """Stand-ins, routers (one process per router pod), kernel endpoint, services map, scrape targets and operator
    for one policy (also bench/)."""
    policy = "tiny"
    rig = Rig(namespace, policy, Kube.from_kubeconfig(str(kubeconfig)))
    rig.kube.create({"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": router.admin_secret_name(policy), "namespace": namespace},
                     "stringData": {router.TOKEN_KEY: TOKEN}})
    processes: list[ManagedProcess] = []
    kernels = ThreadingHTTPServer(("127.0.0.1", 0), _Kernels)
    threading.Thread(target=kernels.serve_forever, daemon=True).start()
    services: dict[str, Any] = {}
    for arm, ref in (("stable", STABLE), ("candidate", CANDIDATE)):
        port = free_port()
        processes.append(ManagedProcess(f"standin-{arm}", [sys.executable, "-m", "quantrol_dev.standin",
                                                           "--port", str(port), "--model", policy],
                                        tmp_path / f"{arm}.log").start())
        rig.engines[arm] = port
        services[f"{namespace}/{serving.arm_name(policy, ref)}"] = {
            "host": "127.0.0.1", "ports": {str(serving.ENGINE_PORT): port,
                                           str(serving.LAUNCHER_PORT): kernels.server_address[1]}}
    rig.router_ports = [free_port() for _ in range(router_replicas)]
    rig.admin_ports = [free_port() for _ in range(router_replicas)]
    rig.router_port = rig.router_ports[0]
    services[f"{namespace}/{policy}"] = {"host": "127.0.0.1", "ports": {str(router.ROUTER_PORT): rig.router_port}}
    services["pods"] = {f"{namespace}/{rig.router_pod(i)}": {"host": "127.0.0.1", "ports": {
        str(router.ROUTER_PORT): port, str(router.ADMIN_PORT): rig.admin_ports[i]}}
        for i, port in enumerate(rig.router_ports)}
    services_file = tmp_path / "services.json"
    services_file.write_text(json.dumps(services))
    (tmp_path / "token").write_text(TOKEN)
    # The router starts with a stable-only config at version 0; the operator's pushes take over from there.
    stable_url = f"http://{serving.arm_name(policy, STABLE)}.{namespace}.svc:{serving.ENGINE_PORT}"
    (tmp_path / "router.json").write_text(json.dumps({"version": 0, "arms": {"stable": {"url": stable_url,
                                                                                       "weight": 100}}}))
    env = addresses.environment(services_file)
    for i, port in enumerate(rig.router_ports):
        rig.routers.append(ManagedProcess(
            f"router-{i}", [sys.executable, "-m", "quantrol_worker.cli", "route", "--config",
                            str(tmp_path / "router.json"), "--host", "127.0.0.1", "--port", str(port),
                            "--admin-port", str(rig.admin_ports[i]), "--namespace", namespace,
                            "--admin-token-file", str(tmp_path / "token")],
            tmp_path / ("router.log" if i == 0 else f"router-{i}.log"), env={**os.environ, **env}).start())
    processes.extend(rig.routers)
    for name, port in (*rig.engines.items(), *((f"router-{i}", p) for i, p in enumerate(rig.router_ports))):
        wait_until(partial(port_is_open, port), timeout=20, what=f"{name} on {port}")
    # Every router pod is scraped, and every engine with its arm's short digest as `arm`, as the policy's PodMonitor
    # would have it (children/monitoring.py).
    engines = [TargetGroup([f"127.0.0.1:{rig.engines[arm]}"], {"namespace": namespace, "policy": policy,
                                                               "arm": serving.short_digest(ref)})
               for arm, ref in (("stable", STABLE), ("candidate", CANDIDATE))]
    prometheus.set_file_sd_targets([TargetGroup([f"127.0.0.1:{p}" for p in rig.router_ports],
                                                {"namespace": namespace, "policy": policy}), *engines])
    began = time.time()
    rig.operator_metrics_port = free_port()
    operator = OperatorProcess(kubeconfig, tmp_path / "operator", env={
        **env, "QUANTROL_POLL_SECONDS": "1", "QUANTROL_METRICS_PORT": str(rig.operator_metrics_port)})
    operator.start(ready=lambda: kopf_watches(kubeapi, began, ("servingpolicies",)))
    rig.operator = operator
    controller = threading.Thread(target=_deployment_controller, args=(rig,), daemon=True)
    controller.start()
    try:
        yield rig
    finally:
        rig.stop.set()
        if rig.operator is not None:
            rig.operator.stop()
        for replica in list(rig.frozen):
            rig.thaw(replica)  # a stopped process would hold its SIGTERM until killed
        for process in processes:
            process.stop()
        kernels.shutdown()
        prometheus.set_file_sd_targets([])
        controller.join(timeout=5)


def _deployment_controller(rig: Rig) -> None:
    """The Deployment controller's part: every arm and router Deployment reports its replicas ready, and the router
    Deployment gets its pods (one per router process)."""
    while not rig.stop.is_set():
        with contextlib.suppress(Exception):
            for d in rig.kube.list_objects("apps/v1", "Deployment", rig.namespace):
                if d["metadata"]["name"] == router.router_name(rig.policy):
                    _router_pods(rig, d)
                want = d["spec"].get("replicas") or 0
                generation = d["metadata"].get("generation")
                status = d.get("status") or {}
                if status.get("readyReplicas") != want or status.get("observedGeneration") != generation:
                    rig.kube.patch_status(d, {"observedGeneration": generation, "replicas": want, "readyReplicas": want,
                                              "updatedReplicas": want, "availableReplicas": want})
        rig.stop.wait(0.3)


def _router_pods(rig: Rig, deployment: dict[str, Any]) -> None:
    """The router Deployment's pods, created once through a (never stored) ReplicaSet as on a cluster, and reported
    Running and Ready at 127.0.0.1 as a kubelet would; services.json maps each to its own router process."""
    meta, spec = deployment["metadata"], deployment["spec"]
    labels = {**spec["template"]["metadata"]["labels"], "pod-template-hash": POD_TEMPLATE_HASH}
    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{meta['name']}-{POD_TEMPLATE_HASH}",
             "uid": f"{meta['uid']}-rs", "controller": True}
    existing = {p["metadata"]["name"]: p for p in rig.kube.list_objects("v1", "Pod", rig.namespace)}
    for replica in range(min(spec.get("replicas") or 0, len(rig.router_ports))):
        name = rig.router_pod(replica)
        pod = existing.get(name)
        if pod is None:
            pod = rig.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "namespace": rig.namespace, "labels": labels, "ownerReferences": [owner]},
                "spec": {"containers": [{"name": "router", "image": "quantrol-router"}]}})
        elif (pod.get("status") or {}).get("phase") == "Running":
            continue
        rig.kube.patch_status(pod, {
            "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "router", "ready": True, "restartCount": 0, "image": "quantrol-router",
                                   "imageID": "", "state": {"running": {}}}]})


# The rig's default prompts: short ones, none naming a slice (the router's prompt-length buckets still apply).
PROMPTS = tuple(Prompt(f"request {i}") for i in range(50))


@contextlib.contextmanager
def load(rig: Rig, rps: float = 20.0, seconds: float = 90.0, prompts: Sequence[Prompt] = PROMPTS,
         mix: Mix | None = None) -> Iterator[FleetProcess]:
    """The client fleet (GuideLLM, quantrol_dev.fleet) at about `rps` (Poisson arrivals), 6 tokens each, for at most
    `seconds`, spread over the router pods in turn as a Service spreads connections over its endpoints. The default
    mix is a chat fleet's: every other request sampled at temperature 0.8, one in four not streamed (the router
    streams it from the engine all the same)."""
    ports = rig.router_ports or [rig.router_port]
    with FleetProcess([f"http://127.0.0.1:{port}" for port in ports], rig.policy, prompts, seconds=seconds,
                      max_tokens=6, rate=rps, mix=mix) as fleet:
        yield fleet


def create_policy(rig: Rig, policy: dict[str, Any]) -> None:
    rig.kube.create(policy)


