"""The SLO control loop closed for real: operator (kopf run) → router (real process) → engine stand-ins,
scraped by a real Prometheus at 1 s, judged by the operator, which moves the weights through the router's
admin endpoint.

Played openly by the test, because nothing local can stand for them: the Deployment controller and the
kubelet (the test marks the arms' Deployments ready, and gives the router Deployment one Pod object per router
process it started, Running and Ready at 127.0.0.1; the processes are started by the test, not from the pod
spec), the cluster DNS and pod network (a services.json map, the same convention the local workload runner
uses: the router Service answers on the first router process, and its `pods` section maps each router pod to
its own process), and the engines themselves (tests/engine_standin.py, a labelled stand-in for vLLM whose
latency, errors and answers the test changes at run time). The faults are real: the stand-in really answers
slower, fails, or answers differently, and the router really measures it. The routers' config files never
change after start (there is no kubelet ConfigMap sync here): every weight they apply was pushed to them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from quantrol_dev.localstack import addresses
from quantrol_dev.localstack.kubeapi import KubeAPIServer, OperatorProcess
from quantrol_dev.localstack.procs import ManagedProcess, free_port, port_is_open, wait_until
from quantrol_dev.localstack.prometheus import PrometheusServer, TargetGroup
from quantrol_operator.children import router, serving
from tests.plugins.kubeapi import kopf_watches

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION = "quantrol.io", "v1alpha1"
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
    custom: kubernetes.client.CustomObjectsApi
    apps: kubernetes.client.AppsV1Api
    engines: dict[str, int] = field(default_factory=dict)
    router_port: int = 0  # where the router Service answers: the first router pod (the local runner's choice too)
    router_ports: list[int] = field(default_factory=list)  # one router process per router pod, in pod order
    routers: list[ManagedProcess] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)
    core: kubernetes.client.CoreV1Api | None = None
    operator_metrics_port: int = 0
    operator: OperatorProcess | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0

    def router_pod(self, replica: int) -> str:
        return f"{router.router_name(self.policy)}-{POD_TEMPLATE_HASH}-r{replica}"

    def status(self) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "servingpolicies", self.policy)
        return dict(obj.get("status") or {})

    def wait_phase(self, *phases: str, timeout: float = 60) -> dict[str, Any]:
        try:
            wait_until(lambda: self.status().get("phase") in phases, timeout=timeout, interval=0.5, what="phase")
        except TimeoutError as exc:
            status = self.status()
            raise AssertionError(f"phase {status.get('phase')} not in {phases} after {timeout}s; counters "
                                 f"{status.get('counters')}; last analysis {status.get('lastAnalysis')}") from exc
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

    def router_config(self, replica: int) -> tuple[int, dict[str, int]]:
        """(applied version, weight per arm) from one router pod's own admin endpoint."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.router_ports[replica]}/quantrol/config",
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


def _policy(name: str, namespace: str, prometheus_url: str, first_dwell: int = 3, router_replicas: int = 1,
            **analysis: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ServingPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseline": {"artifact": STABLE}, "candidate": {"artifact": CANDIDATE},
            "routerReplicas": router_replicas,
            "serving": {"batchBudget": {"maxNumSeqs": 8, "maxNumBatchedTokens": 512}},
            "rollout": {"shadow": {"durationSeconds": 3, "mirrorFraction": 0.5},
                        "canarySteps": [{"weight": 50, "minDwellSeconds": first_dwell},
                                        {"weight": 100, "minDwellSeconds": 2}],
                        "promotionGraceSeconds": 0},
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
                     "goodput": {"minRelativeToStable": 0.3}},
        },
    }


@pytest.fixture
def rig(kubeapi: KubeAPIServer, kubeconfig: Path, kube_client: kubernetes.client.ApiClient, namespace: str,
        prometheus: PrometheusServer, tmp_path: Path) -> Iterator[Rig]:
    with open_rig(kubeapi, kubeconfig, kube_client, namespace, prometheus, tmp_path) as opened:
        yield opened


@pytest.fixture
def two_router_rig(kubeapi: KubeAPIServer, kubeconfig: Path, kube_client: kubernetes.client.ApiClient,
                   namespace: str, prometheus: PrometheusServer, tmp_path: Path) -> Iterator[Rig]:
    with open_rig(kubeapi, kubeconfig, kube_client, namespace, prometheus, tmp_path, router_replicas=2) as opened:
        yield opened


@contextlib.contextmanager
def open_rig(kubeapi: KubeAPIServer, kubeconfig: Path, kube_client: kubernetes.client.ApiClient, namespace: str,
             prometheus: PrometheusServer, tmp_path: Path, router_replicas: int = 1) -> Iterator[Rig]:
    """Stand-ins, routers (one process per router pod), kernel endpoint, services map, scrape targets and operator
    for one policy (also bench/)."""
    policy = "tiny"
    core = kubernetes.client.CoreV1Api(kube_client)
    rig = Rig(namespace, policy, kubernetes.client.CustomObjectsApi(kube_client),
              kubernetes.client.AppsV1Api(kube_client), core=core)
    core.create_namespaced_secret(namespace, {"metadata": {"name": router.admin_secret_name(policy)},
                                              "stringData": {router.TOKEN_KEY: TOKEN}})
    processes: list[ManagedProcess] = []
    kernels = ThreadingHTTPServer(("127.0.0.1", 0), _Kernels)
    threading.Thread(target=kernels.serve_forever, daemon=True).start()
    services: dict[str, Any] = {}
    for arm, ref in (("stable", STABLE), ("candidate", CANDIDATE)):
        port = free_port()
        processes.append(ManagedProcess(f"standin-{arm}", [sys.executable, str(ROOT / "tests/engine_standin.py"),
                                                           "--port", str(port), "--model", policy],
                                        tmp_path / f"{arm}.log").start())
        rig.engines[arm] = port
        services[f"{namespace}/{serving.arm_name(policy, ref)}"] = {
            "host": "127.0.0.1", "ports": {str(serving.ENGINE_PORT): port,
                                           str(serving.LAUNCHER_PORT): kernels.server_address[1]}}
    rig.router_ports = [free_port() for _ in range(router_replicas)]
    rig.router_port = rig.router_ports[0]
    services[f"{namespace}/{policy}"] = {"host": "127.0.0.1", "ports": {str(router.ROUTER_PORT): rig.router_port}}
    services["pods"] = {f"{namespace}/{rig.router_pod(i)}": {"host": "127.0.0.1",
                                                             "ports": {str(router.ROUTER_PORT): port}}
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
                            "--admin-token-file", str(tmp_path / "token")],
            tmp_path / ("router.log" if i == 0 else f"router-{i}.log"), env={**os.environ, **env}).start())
    processes.extend(rig.routers)
    for name, port in (*rig.engines.items(), *((f"router-{i}", p) for i, p in enumerate(rig.router_ports))):
        wait_until(lambda p=port: port_is_open(p), timeout=20, what=f"{name} on {port}")
    # Every router pod is scraped, as a PodMonitor (or the scrape annotations) would have it.
    prometheus.set_file_sd_targets([TargetGroup([f"127.0.0.1:{p}" for p in rig.router_ports],
                                                {"namespace": namespace, "policy": policy})])
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
            for d in rig.apps.list_namespaced_deployment(rig.namespace).items:
                if d.metadata.name == router.router_name(rig.policy):
                    _router_pods(rig, d)
                want = d.spec.replicas or 0
                status = d.status
                if status is None or status.ready_replicas != want or status.observed_generation != \
                        d.metadata.generation:
                    rig.apps.patch_namespaced_deployment_status(d.metadata.name, rig.namespace, {"status": {
                        "observedGeneration": d.metadata.generation, "replicas": want, "readyReplicas": want,
                        "updatedReplicas": want, "availableReplicas": want}})
        rig.stop.wait(0.3)


def _router_pods(rig: Rig, deployment: Any) -> None:
    """The router Deployment's pods, created once through a (never stored) ReplicaSet as on a cluster, and reported
    Running and Ready at 127.0.0.1 as a kubelet would; services.json maps each to its own router process."""
    assert rig.core is not None
    labels = {**deployment.spec.template.metadata.labels, "pod-template-hash": POD_TEMPLATE_HASH}
    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{deployment.metadata.name}-{POD_TEMPLATE_HASH}",
             "uid": f"{deployment.metadata.uid}-rs", "controller": True}
    existing = {p.metadata.name: p for p in rig.core.list_namespaced_pod(rig.namespace).items}
    for replica in range(min(deployment.spec.replicas or 0, len(rig.router_ports))):
        name = rig.router_pod(replica)
        if name not in existing:
            rig.core.create_namespaced_pod(rig.namespace, {
                "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
                "spec": {"containers": [{"name": "router", "image": "quantrol-router"}]}})
        elif existing[name].status is not None and existing[name].status.phase == "Running":
            continue
        rig.core.patch_namespaced_pod_status(name, rig.namespace, {"status": {
            "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "router", "ready": True, "restartCount": 0, "image": "quantrol-router",
                                   "imageID": "", "state": {"running": {}}}]}})


@contextlib.contextmanager
def load(rig: Rig, rps: float = 20.0, seconds: float = 90.0) -> Iterator[None]:
    """A bounded load generator: greedy completions at about `rps`, for at most `seconds`, spread over the router
    pods in turn as a Service spreads connections over its endpoints."""
    done = threading.Event()
    ports = rig.router_ports or [rig.router_port]

    def one(i: int) -> None:
        body = json.dumps({"model": rig.policy, "prompt": f"request {i % 50}", "max_tokens": 6,
                           "temperature": 0, "stream": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{ports[i % len(ports)]}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        with contextlib.suppress(Exception), urllib.request.urlopen(request, timeout=10) as rsp:
            rsp.read()

    def loop() -> None:
        deadline = time.monotonic() + seconds
        i = 0
        while not done.is_set() and time.monotonic() < deadline:
            threading.Thread(target=one, args=(i,), daemon=True).start()
            i += 1
            rig.sent = i
            done.wait(1 / rps)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def _create(rig: Rig, policy: dict[str, Any]) -> None:
    rig.custom.create_namespaced_custom_object(GROUP, VERSION, rig.namespace, "servingpolicies", policy)


def test_a_healthy_candidate_with_noisy_latency_is_promoted(rig: Rig, prometheus: PrometheusServer,
                                                          kubeapi: KubeAPIServer) -> None:
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.012)
    with load(rig):
        _create(rig, _policy(rig.policy, rig.namespace, prometheus.url))
        rig.wait_phase("Shadow", timeout=30)
        status = rig.wait_phase("Promoted", "RolledBack", "Paused", timeout=90)
    assert status["phase"] == "Promoted", json.dumps(status.get("lastAnalysis"), indent=1)
    assert status["stableArtifact"] == CANDIDATE
    reasons = [h["reason"] for h in status["history"]]
    assert reasons == ["ArmsReady", "ShadowPassed", "StepPassed", "Promoted"]
    weights = rig.router_weights()  # the promoted artifact now serves as stable, confirmed by the router
    assert weights["stable"] == 100.0 and weights.get("candidate", 0.0) == 0.0
    # Steady state: the operator keeps polling every second, and writes nothing at all.
    time.sleep(2)
    quiet_since = time.time()
    time.sleep(5)
    operator = ("quantrol-operator", "kopf/")
    writes = [w for w in kubeapi.writes(since=quiet_since) if w["user_agent"].startswith(operator)]
    reads = [r for r in kubeapi.requests(since=quiet_since) if r.get("namespace") == rig.namespace
             and r["verb"] in ("get", "list") and r["user_agent"].startswith("quantrol-operator")]
    assert writes == [] and len(reads) >= 5, writes
    assert rig.operator_metric("quantrol_rollout_phase", phase="Promoted") == 1.0
    assert rig.operator_metric("quantrol_rollbacks_total") == 0.0


@pytest.mark.parametrize(
    ("fault", "slo"),
    [
        # A slower engine shows first in time to first token and goodput; ITL p99 sits near its bucket edge.
        ({"token_latency_s": 0.4}, {"ttftP99", "interTokenLatencyP99", "goodput"}),
        ({"error_rate": 0.5}, {"errorRate"}),
        ({"deviation": 0.6}, {"agreement", "qualityDelta"}),
    ],
    ids=["latency", "errors", "quality"],
)
def test_an_injected_fault_rolls_back_to_stable(rig: Rig, prometheus: PrometheusServer, fault: dict[str, float],
                                               slo: set[str], kubeconfig: Path) -> None:
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.01)
    with load(rig):
        # The fault lands during the 50% step, which dwells long enough for an 8 s window to see it: at 100%
        # nothing is left to compare with, so a fault that arrives only then is judged on absolute limits alone.
        _create(rig, _policy(rig.policy, rig.namespace, prometheus.url, first_dwell=25, successStreak=3))
        rig.wait_phase("Canary", timeout=60)
        rig.behave("candidate", **fault)
        status = rig.wait_phase("RolledBack", "Promoted", "Paused", timeout=60)
        assert status["phase"] == "RolledBack", status.get("lastAnalysis")
        record = status["rollback"]
        assert record["reason"] == "SloBreach"
        failing = {m["slo"] for m in status["lastAnalysis"]["metrics"] if m["verdict"] == "fail"}
        assert failing and failing <= slo | {"goodput"}, json.dumps(status["lastAnalysis"], indent=1)
        assert record["slo"] in slo | {"goodput"} and set(record["failingSlos"]) == failing
        assert rig.operator_metric("quantrol_rollbacks_total", reason="SloBreach") == 1.0
        # All live traffic is back on stable, confirmed by the router itself, while requests keep flowing.
        wait_until(lambda: rig.router_weights().get("candidate", 0.0) == 0.0, timeout=5, what="candidate weight 0")
    # Confirmed by the router pod itself (usually already in the RolledBack write; a slow answer, at the next pass).
    wait_until(lambda: _confirmed(rig, 1, status["router"]["version"]), timeout=10, what="the rollback confirmed")
    # The status view a human reads at 3 a.m. names the rollback, the SLO and how to retry.
    view = subprocess.run([sys.executable, "-m", "quantrol_operator.cli", "status", f"sp/{rig.policy}", "-n",
                           rig.namespace, "--kubeconfig", str(kubeconfig)], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert "RolledBack" in view and f"on {record['slo']}" in view and "quantrol.io/retry" in view



def test_a_rollback_reaches_every_router_replica_within_seconds(two_router_rig: Rig,
                                                                prometheus: PrometheusServer) -> None:
    """routerReplicas 2: the operator pushes to each router pod, not through the Service (which would reach one);
    appliedVersion moves only once both pods confirmed, and a hung pod holds it back without stalling the loop."""
    rig = two_router_rig
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.01)
    with load(rig):
        _create(rig, _policy(rig.policy, rig.namespace, prometheus.url, first_dwell=25, successStreak=3,
                             router_replicas=2))
        rig.wait_phase("Canary", timeout=60)
        # Both pods run the canary split, each told directly: their config files never change in this rig.
        wait_until(lambda: [rig.router_config(i)[1] for i in (0, 1)] == [{"stable": 50, "candidate": 50}] * 2,
                   timeout=10, what="the 50% split on both router pods")
        wait_until(lambda: _confirmed(rig, 2), timeout=10, what="both router pods confirmed in status")
        rig.behave("candidate", error_rate=0.5)
        status = rig.wait_phase("RolledBack", "Promoted", "Paused", timeout=60)
        seen = time.monotonic()
        assert status["phase"] == "RolledBack", status.get("lastAnalysis")
        # The rollback is on every replica within seconds (a kubelet ConfigMap sync would take a minute or more,
        # and this rig's router files never change): normally already when the status says RolledBack, as the pass
        # pushes before it writes status; the bound leaves room for a push retried at the next pass.
        wait_until(lambda: all(rig.router_config(i) == (status["router"]["version"], {"stable": 100})
                               for i in (0, 1)), timeout=10, interval=0.1, what="100% stable on both router pods")
        assert time.monotonic() - seen < 10
        assert all(rig.router_weights(i).get("candidate", 0.0) == 0.0 for i in (0, 1))
    wait_until(lambda: _confirmed(rig, 2, status["router"]["version"]), timeout=10,
               what="the rollback confirmed by both router pods in status")

    # A hung replica: the next config (a retry puts the candidate back in) reaches the other pod at once, and
    # appliedVersion stays on the version both hold until the hung one answers too.
    rolled_back = status["router"]["version"]
    rig.freeze(1)
    try:
        rig.custom.patch_namespaced_custom_object(GROUP, VERSION, rig.namespace, "servingpolicies", rig.policy, {
            "metadata": {"annotations": {"quantrol.io/retry": "1"}}})
        wait_until(lambda: rig.status()["router"]["version"] > rolled_back
                   and rig.status()["router"].get("replicas") == {"confirmed": 1, "total": 2},
                   timeout=20, interval=0.2, what="a new router config, confirmed by one pod of two")
        time.sleep(3)  # a few passes, each pushing again to the hung pod (bounded by the push timeout)
        held = rig.status()["router"]
        assert held["appliedVersion"] == rolled_back and held["replicas"] == {"confirmed": 1, "total": 2}, held
        assert rig.router_config(0)[0] >= held["version"]  # the retry may have moved on since
    finally:
        rig.thaw(1)
    wait_until(lambda: _confirmed(rig, 2), timeout=20, interval=0.2, what="both pods confirmed the new config")
    latest = rig.status()["router"]["version"]
    assert latest > rolled_back and all(rig.router_config(i)[0] >= latest for i in (0, 1))


def _confirmed(rig: Rig, replicas: int, version: int | None = None) -> bool:
    """Whether status says every router pod confirmed the current config version (`version`, when given)."""
    state = rig.status()["router"]
    return (state.get("appliedVersion") == state["version"] and version in (None, state["version"])
            and state.get("replicas") == {"confirmed": replicas, "total": replicas})


def test_no_traffic_pauses_and_never_promotes(rig: Rig, prometheus: PrometheusServer) -> None:
    _create(rig, _policy(rig.policy, rig.namespace, prometheus.url))
    status = rig.wait_phase("Paused", "Canary", "Promoted", timeout=60)
    assert status["phase"] == "Paused" and status["history"][-1]["reason"] == "AnalysisCannotJudge"
    assert status["lastAnalysis"]["verdict"] == "inconclusive"


def test_prometheus_down_pauses_with_the_stable_arm_untouched(rig: Rig) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with load(rig, seconds=40):
        _create(rig, _policy(rig.policy, rig.namespace, dead))
        status = rig.wait_phase("Paused", "Canary", "Promoted", "RolledBack", timeout=60)
    assert status["phase"] == "Paused" and status["lastAnalysis"]["verdict"] == "error"
    assert status["weights"]["stable"] == 100 and "rollback" not in status


def test_an_operator_restart_one_failure_below_the_limit_resumes_the_count(
        rig: Rig, prometheus: PrometheusServer, kubeapi: KubeAPIServer) -> None:
    """Streak counters live in status: a restarted operator resumes them instead of granting a fresh budget."""
    rig.behave("stable", token_latency_s=0.01)
    rig.behave("candidate", token_latency_s=0.01)
    with load(rig):
        _create(rig, _policy(rig.policy, rig.namespace, prometheus.url, failureLimit=4, intervalSeconds=2,
                             successStreak=3))
        rig.wait_phase("Canary", timeout=60)
        rig.behave("candidate", error_rate=0.5)
        wait_until(lambda: (rig.status().get("counters") or {}).get("consecutiveFailures") == 3, timeout=30,
                   interval=0.1, what="three failing windows, one below the limit")
        assert rig.operator is not None
        old = rig.operator
        # A crash, mid-rollout: after SIGTERM kopf may finish in-flight passes for seconds, and one of them could
        # count the fourth window before the process is gone, which would test the shutdown, not the resume.
        old.kill()
        assert rig.status()["phase"] == "Canary"
        began = time.time()
        rig.operator = OperatorProcess(old.kubeconfig, old.workdir.with_name("operator-restarted"), env=old.env)
        rig.operator.start(ready=lambda: kopf_watches(kubeapi, began, ("servingpolicies",)))
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = rig.status()
            seen.append((status.get("counters") or {}).get("consecutiveFailures"))
            if status["phase"] == "RolledBack":
                break
            time.sleep(0.1)
    assert status["phase"] == "RolledBack", status
    # Never counted again from zero: every observation after the restart is 3 (or 0 once rolled back).
    assert all(v in (3, 0, None) for v in seen), seen
    assert status["rollback"]["reason"] == "SloBreach" and status["rollback"]["slo"] == "errorRate"
