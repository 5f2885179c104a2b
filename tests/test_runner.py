"""The local workload runner: pure planning first (no server, no process), then real processes against the API.

The emulated API has no kubelet, no Job/Deployment controllers and no garbage collector; in the integration
tests below the runner plays those parts, and the tests check what it reports through the API, as a client
of a real cluster would read it. The "containers" are the scripts in tests/workloads/, run with the dev
environment's python through the image map (`quantrol-test/*` -> the dev venv's bin dir).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from quantrol_dev.localstack.addresses import ServicesFile
from quantrol_dev.localstack.procs import ManagedProcess, port_is_open
from quantrol_dev.localstack.runner import (
    LOGS_ANNOTATION,
    PORTS_ANNOTATION,
    KubeClient,
    LocalRunner,
    api_path,
    groups_alive,
    pid_alive,
)
from quantrol_dev.localstack.runner_plan import (
    ContainerRun,
    Endpoint,
    ImageEnv,
    JobPod,
    LaunchError,
    PodContext,
    PodView,
    Replica,
    Terminated,
    admit,
    build_launch,
    cpu_slots,
    expand_vars,
    free_slot,
    orphaned,
    plan_deployment,
    plan_job,
    plan_pod,
    pod_status,
    pods_map,
    resolve_image,
    rewrite_args,
    rewrite_paths,
    services_map,
    template_hash,
    volume_files,
)
from quantrol_worker.addresses import ClusterAddresses, service_url
from tests.plugins.runner import TEST_IMAGE, TEST_SERVING_IMAGE

T = TypeVar("T")
JSON = dict[str, Any]
WORKLOADS = Path(__file__).parent / "workloads"
NOW = datetime(2025, 1, 1, tzinfo=UTC)
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ===================================================== pure planning =============================================


def c(name: str, **kw: Any) -> ContainerRun:
    return ContainerRun(name, "img", **kw)


def ended(code: int, at: datetime = NOW) -> Terminated:
    return Terminated(code, "Completed" if code == 0 else "Error", "", at - timedelta(seconds=1), at)


def test_init_containers_run_one_at_a_time_in_order_then_all_main_containers() -> None:
    init, main = [c("i1"), c("i2")], [c("m1"), c("m2")]
    assert plan_pod("Never", init, main, NOW).start == ("i1",)
    init[0] = c("i1", started_at=NOW)
    assert plan_pod("Never", init, main, NOW).start == ()
    init[0] = c("i1", terminated=ended(0))
    assert plan_pod("Never", init, main, NOW).start == ("i2",)
    init[1] = c("i2", terminated=ended(0))
    steps = plan_pod("Never", init, main, NOW)
    assert (steps.start, steps.phase) == (("m1", "m2"), "Pending")


def test_a_failed_init_container_fails_a_never_pod_and_is_retried_with_backoff_otherwise() -> None:
    init, main = [c("i1", terminated=ended(1))], [c("m1")]
    assert plan_pod("Never", init, main, NOW) == plan_pod("Never", init, main, NOW + timedelta(hours=1))
    assert plan_pod("Never", init, main, NOW).phase == "Failed"
    assert plan_pod("Always", init, main, NOW).start == ()  # back-off: 1 s after the first failure
    assert plan_pod("Always", init, main, NOW + timedelta(seconds=1)).start == ("i1",)


def test_pod_phase_follows_main_containers_and_restart_policy() -> None:
    assert plan_pod("Never", [], [c("m", terminated=ended(0))], NOW).phase == "Succeeded"
    assert plan_pod("Never", [], [c("m", terminated=ended(0)), c("n", terminated=ended(2))], NOW).phase == "Failed"
    assert plan_pod("Never", [], [c("m", terminated=ended(0)), c("n", started_at=NOW)], NOW).phase == "Running"
    crashing = [c("m", terminated=ended(1), restart_count=3)]
    assert plan_pod("Always", [], crashing, NOW + timedelta(seconds=5)).phase == "Running"
    assert plan_pod("Always", [], crashing, NOW + timedelta(seconds=5)).start == ()  # 2**3 = 8 s back-off
    assert plan_pod("Always", [], crashing, NOW + timedelta(seconds=8)).start == ("m",)
    assert plan_pod("OnFailure", [], [c("m", terminated=ended(0))], NOW).phase == "Succeeded"
    assert plan_pod("Never", [], [c("m", waiting_reason="ErrImagePull")], NOW).phase == "Failed"
    assert plan_pod("Always", [], [c("m", waiting_reason="ErrImagePull")], NOW).phase == "Pending"


def test_pod_status_shows_crash_loop_termination_message_and_keeps_transition_times() -> None:
    last = Terminated(3, "Error", "calibration diverged", NOW, NOW + timedelta(seconds=2))
    view = PodView("Always", (), (c("m", terminated=last, restart_count=1),), "Running", started_at=NOW)
    status = pod_status(view, {}, NOW)
    [container] = status["containerStatuses"]
    assert container["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert container["lastState"]["terminated"]["message"] == "calibration diverged"
    assert container["lastState"]["terminated"]["exitCode"] == 3
    later = pod_status(view, status, NOW + timedelta(minutes=5))
    assert later["conditions"] == status["conditions"]  # nothing changed: no new lastTransitionTime
    ready = PodView("Always", (), (c("m", started_at=NOW, ready=True),), "Running", started_at=NOW)
    flipped = {x["type"]: x for x in pod_status(ready, status, NOW + timedelta(minutes=5))["conditions"]}
    assert flipped["Ready"]["status"] == "True"
    assert flipped["Ready"]["lastTransitionTime"] == "2025-01-01T00:05:00Z"


def test_an_unscheduled_pod_reports_why() -> None:
    view = PodView("Always", (), (c("m"),), "Pending", scheduled=False, unschedulable_message="capped at 2")
    status = pod_status(view, {}, NOW)
    assert status["phase"] == "Pending"
    assert status["conditions"][0] | {"lastTransitionTime": ""} == {
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "capped at 2",
        "lastTransitionTime": "",
    }
    assert "containerStatuses" not in status


def job_spec(**spec: Any) -> JSON:
    return {"metadata": {"name": "j"}, "spec": spec, "status": {}}


def test_job_plan_starts_one_pod_then_completes() -> None:
    plan = plan_job(job_spec(), [], NOW)
    assert (plan.start, plan.status["active"], plan.status["startTime"]) == (1, 1, "2025-01-01T00:00:00Z")
    done = plan_job(job_spec(), [JobPod("p1", "Succeeded", False)], NOW)
    assert done.start == 0
    assert [c["type"] for c in done.status["conditions"]] == ["Complete"]
    assert (done.status["succeeded"], done.status["completionTime"]) == (1, "2025-01-01T00:00:00Z")


def test_job_plan_retries_up_to_the_backoff_limit() -> None:
    one_failure = [JobPod("p1", "Failed", False)]
    assert plan_job(job_spec(backoffLimit=1), one_failure, NOW).start == 1
    failed = plan_job(job_spec(backoffLimit=1), [*one_failure, JobPod("p2", "Failed", False)], NOW)
    assert failed.start == 0
    assert failed.status["conditions"][0]["reason"] == "BackoffLimitExceeded"
    assert failed.status["failed"] == 2


def test_job_plan_kills_active_pods_past_the_deadline() -> None:
    job = job_spec(activeDeadlineSeconds=5)
    job["status"] = {"startTime": "2025-01-01T00:00:00Z"}
    running = [JobPod("p1", "Running", True)]
    assert plan_job(job, running, NOW + timedelta(seconds=4)).kill == ()
    plan = plan_job(job, running, NOW + timedelta(seconds=5))
    assert (plan.kill, plan.kill_reason) == (("p1",), "DeadlineExceeded")
    assert plan.status["conditions"][0]["type"] == "Failed"


def deployment(replicas: int = 1, version: str = "v1", strategy: JSON | None = None, generation: int = 1) -> JSON:
    spec: JSON = {"replicas": replicas, "template": {"spec": {"containers": [{"name": "m", "image": version}]}}}
    if strategy:
        spec["strategy"] = strategy
    return {"metadata": {"name": "d", "generation": generation}, "spec": spec, "status": {}}


def replica(name: str, version: str, ready: bool, age: int = 0, phase: str = "Running") -> Replica:
    h = template_hash(deployment(version=version)["spec"]["template"])
    return Replica(name, h, phase, ready, NOW - timedelta(seconds=age))  # type: ignore[arg-type]


def test_deployment_rolls_by_surging_one_pod_and_stopping_the_old_once_the_new_is_ready() -> None:
    d2 = deployment(version="v2", generation=2)
    plan = plan_deployment(d2, [replica("old", "v1", True)], NOW, NOW)
    assert (plan.start, plan.stop) == (1, ())
    plan = plan_deployment(d2, [replica("old", "v1", True), replica("new", "v2", False)], NOW, NOW)
    assert (plan.start, plan.stop) == (0, ())  # the new pod is not ready yet: keep the old one serving
    plan = plan_deployment(d2, [replica("old", "v1", True), replica("new", "v2", True)], NOW, NOW)
    assert (plan.start, plan.stop) == (0, ("old",))
    assert plan.status["updatedReplicas"] == 1 and plan.status["observedGeneration"] == 2
    done = plan_deployment(d2, [replica("new", "v2", True)], NOW, NOW)
    conditions = {c["type"]: c for c in done.status["conditions"]}
    assert conditions["Progressing"]["reason"] == "NewReplicaSetAvailable"
    assert conditions["Available"]["status"] == "True"


def test_deployment_recreate_and_max_unavailable_stop_before_starting() -> None:
    recreate = deployment(version="v2", strategy={"type": "Recreate"})
    plan = plan_deployment(recreate, [replica("old", "v1", True)], NOW, NOW)
    assert (plan.start, plan.stop) == (0, ("old",))
    no_surge = deployment(version="v2", strategy={"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    plan = plan_deployment(no_surge, [replica("old", "v1", True)], NOW, NOW)
    assert (plan.start, plan.stop) == (0, ("old",))
    assert plan_deployment(no_surge, [], NOW, NOW).start == 1


def test_deployment_scales_replaces_failed_pods_and_reports_progress_deadline() -> None:
    plan = plan_deployment(deployment(replicas=3), [replica("a", "v1", True)], NOW, NOW)
    assert plan.start == 2
    pods = [replica("a", "v1", True, age=3), replica("b", "v1", False, age=2), replica("c", "v1", True, age=1)]
    assert plan_deployment(deployment(replicas=1), pods, NOW, NOW).stop == ("b", "c")
    plan = plan_deployment(deployment(), [replica("x", "v1", False, phase="Failed")], NOW, NOW)
    assert (plan.start, plan.stop) == (1, ("x",))
    stuck = plan_deployment(deployment(), [replica("a", "v1", False)], NOW + timedelta(seconds=601), NOW)
    progressing = next(c for c in stuck.status["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")


def test_services_map_resolves_named_target_ports_on_ready_selected_pods_only() -> None:
    service = {"metadata": {"name": "web", "namespace": "ns"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}
    headless = {"metadata": {"name": "ext", "namespace": "ns"}, "spec": {"ports": [{"port": 1}]}}
    pods = [
        Endpoint("web-b", "ns", {"app": "web"}, True, {8080: 40002}, {"http": 8080}),
        Endpoint("web-a", "ns", {"app": "web"}, False, {8080: 40001}, {"http": 8080}),
        Endpoint("other", "ns", {"app": "other"}, True, {8080: 40003}, {"http": 8080}),
        Endpoint("web-c", "elsewhere", {"app": "web"}, True, {8080: 40004}, {"http": 8080}),
    ]
    assert services_map([service, headless], pods) == {
        "ns/web": {"host": "127.0.0.1", "ports": {"80": 40002}},
        "ns/ext": {"host": "127.0.0.1", "ports": {}},
    }


def test_pods_map_lists_running_pods_ready_or_not_and_pod_url_resolves_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pods = [Endpoint("web-b", "ns", {}, False, {8080: 40002, 9090: 40012}, {}),
            Endpoint("web-a", "ns", {}, True, {8080: 40001}, {}),
            Endpoint("portless", "ns", {}, True, {}, {})]
    table = {"ns/web-a": {"host": "127.0.0.1", "ports": {"8080": 40001}},
             "ns/web-b": {"host": "127.0.0.1", "ports": {"8080": 40002, "9090": 40012}}}
    assert pods_map(pods) == table
    # A cluster: the pod IP itself.
    cluster = ClusterAddresses()
    assert cluster.pod_url("10.1.2.3", "ns", "web-a", 8080, "/x") == "http://10.1.2.3:8080/x"
    assert cluster.pod_url("fd00::5", "ns", "web-a", 8080) == "http://[fd00::5]:8080"
    assert cluster.pod_url("", "ns", "web-a", 8080) is None  # not started: no IP yet
    # The local runner: every pod is 127.0.0.1, told apart by name; a pod the file does not list is not reachable
    # (127.0.0.1 at the containerPort would be whatever else listens there).
    path = tmp_path / "services.json"
    path.write_text(json.dumps({"ns/web": {"host": "127.0.0.1", "ports": {"80": 40001}}, "pods": table}))
    local = ServicesFile(path)
    assert local.pod_url("127.0.0.1", "ns", "web-b", 8080, "/x") == "http://127.0.0.1:40002/x"
    assert local.pod_url("127.0.0.1", "ns", "web-b", 9090) == "http://127.0.0.1:40012"
    assert local.pod_url("127.0.0.1", "ns", "web-c", 8080) is None
    assert local.pod_url("127.0.0.1", "ns", "web-a", 9090) is None
    assert local.url(service_url("web", "ns", 80)) == "http://127.0.0.1:40001"  # Services resolve as before
    assert cluster.url(service_url("web", "ns", 80)) == "http://web.ns.svc:80"


def test_serving_cap_admits_in_order_and_never_holds_other_pods() -> None:
    waiting = [("s1", True), ("tool", False), ("s2", True), ("s3", True)]
    assert admit(waiting, serving_in_use=1, cap=2) == (["s1", "tool"], ["s2", "s3"])
    assert admit(waiting, serving_in_use=0, cap=2) == (["s1", "tool", "s2"], ["s3"])


def test_serving_pods_get_disjoint_cpu_slots_like_the_static_cpu_manager() -> None:
    assert cpu_slots([0, 1], 2) == [(0,), (1,)]
    assert cpu_slots([3, 0, 2, 1, 4], 2) == [(0, 1), (2, 3)]  # an odd CPU left over stays in the shared pool
    assert cpu_slots([0], 2) == []  # fewer CPUs than slots: nobody is pinned (sharing beats starving)
    slots = cpu_slots(range(4), 2)
    assert free_slot(slots, []) == (0, 1)
    assert free_slot(slots, [(0, 1)]) == (2, 3)
    assert free_slot(slots, [(0, 1), (2, 3)]) == ()
    assert free_slot([], []) == ()


def test_orphans_are_objects_whose_owners_all_vanished_and_unknown_kinds_keep_theirs() -> None:
    def owned(*refs: tuple[str, str]) -> JSON:
        return {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": k, "uid": u} for k, u in refs]}}

    live = {("v1", "A"): {"a1"}, ("v1", "B"): set()}
    gone, alive, mixed, unknown = owned(("A", "a0")), owned(("A", "a1")), owned(("A", "a0"), ("A", "a1")), owned(
        ("C", "c0"))
    assert orphaned([gone, alive, mixed, unknown, {"metadata": {}}], live) == [gone]


def test_var_expansion_path_and_port_rewriting() -> None:
    assert expand_vars("$(A)/$(B)/$$(A)", {"A": "x"}) == "x/$(B)/$(A)"
    paths = {"/data": "/tmp/p/data", "/dev/termination-log": "/tmp/p/main.termination-log"}
    assert rewrite_paths("--out=/data/x /database /data", paths) == "--out=/tmp/p/data/x /database /tmp/p/data"
    assert rewrite_paths("/dev/termination-log", paths) == "/tmp/p/main.termination-log"
    args = ["--port=8000", "--metrics-port", "9000", "--host", "0.0.0.0", "--upstream=http://localhost:8000/v1",
            "--other", "8000"]
    assert rewrite_args(args, {8000: 41000, 9000: 41001}) == [
        "--port=41000", "--metrics-port", "41001", "--host", "127.0.0.1", "--upstream=http://localhost:41000/v1",
        "--other", "8000",
    ]


def context(tmp: Path, **kw: Any) -> PodContext:
    base: JSON = dict(
        name="p-abcde", namespace="ns", uid="u1", labels={"app": "x"}, annotations={}, service_account="default",
        pod_dir=tmp, volume_dirs={"scratch": tmp / "scratch"}, ports={8000: 41000}, port_names={"http": 8000},
        config_maps={"cfg": {"model": "tiny"}}, secrets={}, base_env={"PATH": "/usr/bin", "HOME": "/root"},
    )
    return PodContext(**(base | kw))


def test_build_launch_maps_image_env_mounts_ports_and_probe(tmp_path: Path) -> None:
    image_map = [ImageEnv("quantrol/worker*", Path("/envs/calibrate/bin"))]
    container = {
        "name": "main", "image": "registry.example.com/quantrol/worker:1.0",
        "command": ["quantrol-worker"], "args": ["calibrate", "--out=/scratch/$(MODEL)", "--port", "8000"],
        "env": [{"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "model"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "REPORT", "value": "/dev/termination-log"}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "readinessProbe": {"httpGet": {"path": "healthz", "port": "http"}, "periodSeconds": 1},
    }
    launch = build_launch(container, context(tmp_path), image_map)
    assert launch.argv == ("quantrol-worker", "calibrate", f"--out={tmp_path}/scratch/tiny", "--port", "41000")
    assert launch.env["PATH"] == "/envs/calibrate/bin:/usr/bin"
    assert (launch.env["POD"], launch.env["QUANTROL_PORT_8000"], launch.env["QUANTROL_PORT_HTTP"]) == (
        "p-abcde", "41000", "41000")
    assert launch.env["REPORT"] == str(tmp_path / "main.termination-log") == str(launch.termination_path)
    assert launch.readiness is not None and launch.readiness.target == "http://127.0.0.1:41000/healthz"
    assert not launch.serving


def test_build_launch_refuses_unmapped_images_and_missing_config(tmp_path: Path) -> None:
    image_map = [ImageEnv("quantrol/worker*", Path("/envs/calibrate/bin"))]
    with pytest.raises(LaunchError, match='no local environment mapped for image "vllm/vllm-openai:v1"') as err:
        build_launch({"name": "m", "image": "vllm/vllm-openai:v1", "command": ["x"]}, context(tmp_path), image_map)
    assert err.value.reason == "ErrImagePull"
    missing = {"name": "m", "image": "quantrol/worker", "command": ["x"],
               "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]}
    with pytest.raises(LaunchError, match='configmap "nope"') as err:
        build_launch(missing, context(tmp_path), image_map)
    assert err.value.reason == "CreateContainerConfigError"
    assert resolve_image(image_map, "docker.io/quantrol/worker:2") is not None


def test_config_files_get_the_same_path_rewriting_as_the_command_line() -> None:
    paths = {"/var/quantrol/work": "/tmp/p/work", "/etc/quantrol/data": "/tmp/p/c/data",
             "/dev/termination-log": "/tmp/p/main.termination-log"}
    config = json.dumps({"work_dir": "/var/quantrol/work", "data_uri": "file:///etc/quantrol/data/chat.jsonl",
                         "termination_message_path": "/dev/termination-log", "other": "/var/quantrol/workshop"})
    data = {"config.json": config.encode(), "blob": b"\xff/var/quantrol/work", "unused": b"x"}
    files = volume_files({"items": [{"key": "config.json", "path": "config.json"}, {"key": "blob", "path": "b/in"}]},
                         data, paths)
    assert json.loads(files["config.json"]) == {
        "work_dir": "/tmp/p/work", "data_uri": "file:///tmp/p/c/data/chat.jsonl",
        "termination_message_path": "/tmp/p/main.termination-log", "other": "/var/quantrol/workshop",
    }
    assert files["b/in"] == b"\xff/var/quantrol/work"  # binary data is not touched
    assert sorted(volume_files({}, data, paths)) == ["blob", "config.json", "unused"]


# ================================================ against the emulated API ========================================


def eventually(get: Callable[[], T], check: Callable[[T], bool], *, timeout: float = 30.0, what: str = "") -> T:
    """Poll `get()` until `check` holds on its value; on timeout, fail showing the last value."""
    deadline = time.monotonic() + timeout
    value = get()
    while not check(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value:\n"
                                 f"{json.dumps(value, indent=1, default=str)[:3000]}")
        time.sleep(0.1)
        value = get()
    return value


@pytest.fixture
def api(kubeconfig: Path) -> Iterator[KubeClient]:
    client = KubeClient(kubeconfig)
    yield client
    client.close()


def script(name: str) -> list[str]:
    return ["python", str(WORKLOADS / name)]


def container(name: str, workload: str, *args: str, image: str = TEST_IMAGE, **extra: Any) -> JSON:
    return {"name": name, "image": image, "command": script(workload), "args": list(args), **extra}


def make_job(api: KubeClient, ns: str, name: str, containers: list[JSON], *, init: list[JSON] | None = None,
             volumes: list[JSON] | None = None, owner: JSON | None = None, **spec: Any) -> JSON:
    pod_spec: JSON = {"restartPolicy": "Never", "containers": containers, "terminationGracePeriodSeconds": 5}
    if init:
        pod_spec["initContainers"] = init
    if volumes:
        pod_spec["volumes"] = volumes
    meta: JSON = {"name": name}
    if owner:
        meta["ownerReferences"] = [owner]
    body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": 0, **spec, "template": {"spec": pod_spec}}}
    return dict(api.call("POST", api_path("batch/v1", "jobs", ns), body))


def web_deployment(name: str, *, version: str = "v1", image: str = TEST_IMAGE) -> JSON:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": 5, "containers": [container(
                    "web", "http_ready.py", "--port", "8080", "--host", "0.0.0.0", image=image,
                    env=[{"name": "VERSION", "value": version}],
                    ports=[{"containerPort": 8080, "name": "http"}],
                    readinessProbe={"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1,
                                    "failureThreshold": 1},
                )]},
            },
        },
    }


def make_service(api: KubeClient, ns: str, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": "http"}]}}
    api.call("POST", api_path("v1", "services", ns), body)


def get(api: KubeClient, api_version: str, plural: str, ns: str, name: str) -> JSON:
    return api.get(api_path(api_version, plural, ns, name)) or {}


def condition(obj: JSON, kind: str) -> JSON:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def pods_of(api: KubeClient, ns: str, owner: JSON) -> list[JSON]:
    uid = owner["metadata"]["uid"]
    return [p for p in api.list(api_path("v1", "pods", ns))
            if any(r["uid"] == uid for r in p["metadata"].get("ownerReferences") or [])]


def job_finished(job: JSON) -> bool:
    return any(condition(job, kind).get("status") == "True" for kind in ("Complete", "Failed"))


def phase(pod: JSON) -> str:
    return str((pod.get("status") or {}).get("phase", ""))  # a pod is listed before its first status write


def pid_of(pod: JSON, index: int = 0) -> int:
    return int(pod["status"]["containerStatuses"][index]["containerID"].removeprefix("local://"))


def services(runner: LocalRunner) -> JSON:
    return dict(json.loads(runner.services_path.read_text()))


def http(port: int, path: str = "/", method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST"
                                     else None)
    try:
        with _HTTP.open(request, timeout=5) as rsp:
            return int(rsp.status), rsp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


@pytest.mark.stack
def test_a_job_that_succeeds(api: KubeClient, namespace: str, workload_runner: LocalRunner) -> None:
    pod_name = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    job = make_job(api, namespace, "ok", [container("main", "exit_with.py", "--print", "hello from $(POD_NAME)",
                                                    "--print-env", "QUANTROL_LOCAL_SERVICES", env=[pod_name])])
    done = eventually(lambda: get(api, "batch/v1", "jobs", namespace, "ok"), job_finished, what="the job to finish")
    assert condition(done, "Complete")["status"] == "True"
    status = done["status"]
    assert (status["succeeded"], status["failed"], status["active"]) == (1, 0, 0)
    assert status["startTime"] <= status["completionTime"]
    [pod] = pods_of(api, namespace, job)
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["metadata"]["labels"]["job-name"] == "ok"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    log = Path(pod["metadata"]["annotations"][LOGS_ANNOTATION], "main.log").read_text()
    assert f"hello from {pod['metadata']['name']}" in log
    assert f"QUANTROL_LOCAL_SERVICES={workload_runner.services_path}" in log


@pytest.mark.stack
def test_a_job_that_fails_reports_the_termination_message(
    api: KubeClient, namespace: str, workload_runner: LocalRunner
) -> None:
    message = "calibration diverged on slice 'code': KL 0.41 > 0.05"
    job = make_job(api, namespace, "bad", [container(
        "main", "exit_with.py", "--code", "3", "--message", message, "--message-file", "/dev/termination-log")],
        backoffLimit=1)
    # FallbackToLogsOnError: no message written, so the log tail becomes the message.
    logs_job = make_job(api, namespace, "oom", [container(
        "main", "exit_with.py", "--code", "2", "--print", "boom: out of memory",
        terminationMessagePolicy="FallbackToLogsOnError")])
    failed = eventually(lambda: get(api, "batch/v1", "jobs", namespace, "bad"), job_finished, what="job bad")
    assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    assert (failed["status"]["failed"], failed["status"]["succeeded"]) == (2, 0)  # one retry, then give up
    pods = pods_of(api, namespace, job)
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (terminated["exitCode"], terminated["reason"], terminated["message"]) == (3, "Error", message)
    eventually(lambda: get(api, "batch/v1", "jobs", namespace, "oom"), job_finished, what="job oom")
    [pod] = pods_of(api, namespace, logs_job)
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "boom: out of memory"


@pytest.mark.stack
def test_a_job_past_its_deadline_is_killed(
    api: KubeClient, namespace: str, workload_runner: LocalRunner, tmp_path: Path
) -> None:
    grandchild = tmp_path / "grandchild.pid"
    job = make_job(api, namespace, "slow", [container(
        "main", "exit_with.py", "--sleep", "120", "--spawn-child", str(grandchild))], activeDeadlineSeconds=2)
    running = eventually(lambda: pods_of(api, namespace, job),
                         lambda pods: bool(pods) and phase(pods[0]) == "Running", what="pod running")
    pid = pid_of(running[0])
    began = time.monotonic()
    failed = eventually(lambda: get(api, "batch/v1", "jobs", namespace, "slow"), job_finished, what="deadline")
    assert time.monotonic() - began < 10
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"
    pod = eventually(lambda: pods_of(api, namespace, job)[0],
                     lambda p: "terminated" in p["status"]["containerStatuses"][0]["state"], what="pod terminated")
    assert (pod["status"]["phase"], pod["status"]["reason"]) == ("Failed", "DeadlineExceeded")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143  # SIGTERM
    assert not pid_alive(pid)
    # The whole process group goes (SIGKILL lands asynchronously, hence the short wait).
    eventually(lambda: pid_alive(int(grandchild.read_text())), lambda alive: not alive, timeout=5, what="grandchild")
    assert eventually(lambda: get(api, "batch/v1", "jobs", namespace, "slow"),
                      lambda j: j["status"]["failed"] == 1 and j["status"]["active"] == 0, what="counts")


@pytest.mark.stack
def test_an_unmapped_image_fails_the_pod_with_a_clear_reason(
    api: KubeClient, namespace: str, workload_runner: LocalRunner
) -> None:
    job = make_job(api, namespace, "nowhere", [container("main", "exit_with.py", image="example.org/nobody:1")])
    eventually(lambda: get(api, "batch/v1", "jobs", namespace, "nowhere"), job_finished, what="job to fail")
    [pod] = pods_of(api, namespace, job)
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ErrImagePull"
    assert 'no local environment mapped for image "example.org/nobody:1"' in waiting["message"]
    assert (pod["status"]["phase"], pod["status"]["reason"]) == ("Failed", "ErrImagePull")


@pytest.mark.stack
def test_a_two_step_init_chain_runs_in_order_before_the_main_container(
    api: KubeClient, namespace: str, workload_runner: LocalRunner
) -> None:
    api.call("POST", api_path("v1", "configmaps", namespace),
             {"metadata": {"name": "greeting"}, "data": {"greeting": "hello"}})
    volumes = [{"name": "scratch", "emptyDir": {}}, {"name": "config", "configMap": {"name": "greeting"}}]
    mounts = [{"name": "scratch", "mountPath": "/scratch"}, {"name": "config", "mountPath": "/etc/greeting"}]
    init = [
        container("first", "steps.py", "append", "/scratch/log", "first", volumeMounts=mounts),
        container("second", "steps.py", "copy", "/etc/greeting/greeting", "/scratch/log", volumeMounts=mounts),
    ]
    main = [container("main", "steps.py", "expect", "/scratch/log", "first", "hello", volumeMounts=mounts)]
    job = make_job(api, namespace, "chain", main, init=init, volumes=volumes)
    # The same chain with a failing first step: the pod fails and nothing after it runs.
    broken = make_job(api, namespace, "broken", main, volumes=volumes,
                      init=[container("first", "exit_with.py", "--code", "1"), init[1]])
    done = eventually(lambda: get(api, "batch/v1", "jobs", namespace, "chain"), job_finished, what="job chain")
    assert condition(done, "Complete")["status"] == "True", pods_of(api, namespace, job)
    [pod] = pods_of(api, namespace, job)
    first, second = (s["state"]["terminated"] for s in pod["status"]["initContainerStatuses"])
    assert first["exitCode"] == second["exitCode"] == 0
    assert first["finishedAt"] <= second["startedAt"]
    eventually(lambda: get(api, "batch/v1", "jobs", namespace, "broken"), job_finished, what="job broken")
    [pod] = pods_of(api, namespace, broken)
    assert pod["status"]["phase"] == "Failed"
    statuses = pod["status"]["initContainerStatuses"]
    assert statuses[0]["state"]["terminated"]["exitCode"] == 1
    assert "waiting" in statuses[1]["state"] and "waiting" in pod["status"]["containerStatuses"][0]["state"]


@pytest.mark.stack
def test_the_serving_pods_volume_kinds_are_shared_by_init_and_main_containers(
    api: KubeClient, namespace: str, workload_runner: LocalRunner
) -> None:
    """children/serving.py's model volume may be a generic ephemeral volume (a claim per pod on a cluster) and its
    /dev/shm a memory-backed emptyDir: both are folders of the pod here, written by an init step, read by the main."""
    claim = {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"],
                                              "resources": {"requests": {"storage": "1Gi"}}}}}
    volumes = [{"name": "model", "ephemeral": claim}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "model", "mountPath": "/models/artifact"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    init = [container("fetch", "steps.py", "append", "/models/artifact/weights", "fetched", volumeMounts=mounts)]
    main = [container("main", "steps.py", "expect", "/models/artifact/weights", "fetched", volumeMounts=mounts)]
    job = make_job(api, namespace, "ephemeral", main, init=init, volumes=volumes)
    done = eventually(lambda: get(api, "batch/v1", "jobs", namespace, "ephemeral"), job_finished, what="job")
    assert condition(done, "Complete")["status"] == "True", pods_of(api, namespace, job)


@pytest.mark.stack
def test_a_config_file_driven_job_like_the_calibration_job(
    api: KubeClient, namespace: str, workload_runner: LocalRunner
) -> None:
    # The shape of children/calibration.py: the worker learns every path from a config file in a ConfigMap.
    config = {"work_dir": "/var/quantrol/work", "data_uri": "file:///etc/quantrol/data/chat.txt",
              "termination_message_path": "/dev/termination-log"}
    for name, data in (("calib-config", {"config.json": json.dumps(config)}), ("calib-data", {"chat.txt": "hi"})):
        api.call("POST", api_path("v1", "configmaps", namespace), {"metadata": {"name": name}, "data": data})
    volumes = [{"name": "config", "configMap": {"name": "calib-config"}},
               {"name": "data", "configMap": {"name": "calib-data"}}, {"name": "work", "emptyDir": {}}]
    mounts = [{"name": "config", "mountPath": "/etc/quantrol/config", "readOnly": True},
              {"name": "data", "mountPath": "/etc/quantrol/data", "readOnly": True},
              {"name": "work", "mountPath": "/var/quantrol/work"}]
    job = make_job(api, namespace, "calib", [container(
        "calibrate", "from_config.py", "--config", "/etc/quantrol/config/config.json", volumeMounts=mounts,
        terminationMessagePolicy="FallbackToLogsOnError")], volumes=volumes)
    done = eventually(lambda: get(api, "batch/v1", "jobs", namespace, "calib"), job_finished, what="the job")
    [pod] = pods_of(api, namespace, job)
    assert condition(done, "Complete")["status"] == "True", pod["status"]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "read: hi"
    pod_dir = Path(pod["metadata"]["annotations"][LOGS_ANNOTATION])
    assert (pod_dir / "volumes" / "work" / "out.txt").read_text() == "hi"


@pytest.mark.stack
def test_deployment_readiness_follows_the_probe(api: KubeClient, namespace: str, workload_runner: LocalRunner) -> None:
    api.call("POST", api_path("apps/v1", "deployments", namespace), web_deployment("web"))
    make_service(api, namespace, "web")

    def deployment() -> JSON:
        return get(api, "apps/v1", "deployments", namespace, "web")

    ready = eventually(deployment, lambda d: (d.get("status") or {}).get("readyReplicas") == 1, what="ready")
    assert condition(ready, "Available")["status"] == "True"
    key = f"{namespace}/web"
    port = eventually(lambda: services(workload_runner), lambda s: "80" in s.get(key, {}).get("ports", {}),
                      what="services.json")[key]["ports"]["80"]
    assert http(port) == (200, "v1")
    [pod] = pods_of(api, namespace, ready)
    log = Path(pod["metadata"]["annotations"][LOGS_ANNOTATION], "web.log").read_text()
    assert f"listening on 127.0.0.1:{port}" in log  # --host 0.0.0.0 and the containerPort were mapped
    assert json.loads(pod["metadata"]["annotations"][PORTS_ANNOTATION]) == {"8080": port}

    assert http(port, "/toggle", "POST") == (200, "not ready")
    unready = eventually(deployment, lambda d: d["status"]["readyReplicas"] == 0, what="unready")
    assert condition(unready, "Available")["status"] == "False"
    [pod] = pods_of(api, namespace, ready)
    assert condition(pod, "Ready")["status"] == "False"
    assert pod["status"]["phase"] == "Running"
    eventually(lambda: services(workload_runner), lambda s: s[key]["ports"] == {}, what="no endpoint")

    assert http(port, "/toggle", "POST") == (200, "ready")
    eventually(deployment, lambda d: d["status"]["readyReplicas"] == 1, what="ready again")


@pytest.mark.stack
def test_each_pod_is_reachable_by_name_ready_or_not(api: KubeClient, namespace: str, workload_runner: LocalRunner,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """status.podIP is 127.0.0.1 for every pod; services.json's `pods` section tells them apart (pod_url)."""
    body = web_deployment("pair")
    body["spec"]["replicas"] = 2
    created = dict(api.call("POST", api_path("apps/v1", "deployments", namespace), body))
    eventually(lambda: get(api, "apps/v1", "deployments", namespace, "pair"),
               lambda d: (d.get("status") or {}).get("readyReplicas") == 2, what="both replicas ready")
    local = ServicesFile(workload_runner.services_path)
    pods = pods_of(api, namespace, created)
    urls = {p["metadata"]["name"]: local.pod_url(p["status"]["podIP"], namespace, p["metadata"]["name"],
                                                           8080) for p in pods}
    assert len(urls) == 2 and None not in urls.values() and len(set(urls.values())) == 2, urls
    assert {p["status"]["podIP"] for p in pods} == {"127.0.0.1"}
    ports = {name: int(str(url).rsplit(":", 1)[1]) for name, url in urls.items()}
    assert all(http(port) == (200, "v1") for port in ports.values())
    name, port = sorted(ports.items())[0]
    assert http(port, "/toggle", "POST") == (200, "not ready")  # unready: off the Service, still listed by name
    eventually(lambda: get(api, "v1", "pods", namespace, name), lambda p: condition(p, "Ready")["status"] == "False",
               what="the pod unready")
    assert services(workload_runner)["pods"][f"{namespace}/{name}"]["ports"] == {"8080": port}
    assert local.pod_url("127.0.0.1", namespace, name, 8080) == f"http://127.0.0.1:{port}"


@pytest.mark.stack
def test_a_template_change_rolls_the_pods(api: KubeClient, namespace: str, workload_runner: LocalRunner) -> None:
    created = dict(api.call("POST", api_path("apps/v1", "deployments", namespace), web_deployment("roll")))
    make_service(api, namespace, "roll")
    path = api_path("apps/v1", "deployments", namespace, "roll")
    eventually(lambda: get(api, "apps/v1", "deployments", namespace, "roll"),
               lambda d: (d.get("status") or {}).get("readyReplicas") == 1, what="v1 ready")
    [old] = pods_of(api, namespace, created)
    old_pid = pid_of(old)

    template = web_deployment("roll", version="v2")["spec"]["template"]
    api.call("PATCH", path, {"spec": {"template": template}}, "application/merge-patch+json")

    def rolled(d: JSON) -> bool:
        s = d.get("status") or {}
        return (s.get("observedGeneration"), s.get("updatedReplicas"), s.get("replicas"), s.get("readyReplicas")) \
            == (2, 1, 1, 1)

    done = eventually(lambda: get(api, "apps/v1", "deployments", namespace, "roll"), rolled, what="the rollout")
    assert condition(done, "Progressing")["reason"] == "NewReplicaSetAvailable"
    [new] = pods_of(api, namespace, created)
    assert new["metadata"]["name"] != old["metadata"]["name"]
    assert new["metadata"]["labels"]["pod-template-hash"] == template_hash(template)
    key = f"{namespace}/roll"
    port = eventually(lambda: services(workload_runner), lambda s: "80" in s[key]["ports"], what="endpoint")
    assert http(port[key]["ports"]["80"]) == (200, "v2")
    eventually(lambda: pid_alive(old_pid), lambda alive: not alive, what="the old process to end")


@pytest.mark.stack
def test_a_crashing_deployment_pod_restarts_with_back_off_and_shows_why(
    api: KubeClient, namespace: str, workload_runner: LocalRunner
) -> None:
    # What the operator sees when an engine fails at load (e.g. vLLM on W8A16): restarts, the exit, the reason.
    body = web_deployment("crash")
    body["spec"]["template"]["spec"]["containers"] = [container(
        "web", "exit_with.py", "--code", "1", "--print", "Failed to find a kernel for the WNA16 linear layer",
        terminationMessagePolicy="FallbackToLogsOnError")]
    created = dict(api.call("POST", api_path("apps/v1", "deployments", namespace), body))

    def restarted(pods: list[JSON]) -> bool:
        statuses = (pods[0].get("status") or {}).get("containerStatuses") or [{}] if pods else [{}]
        return int(statuses[0].get("restartCount", 0)) >= 1

    [pod] = eventually(lambda: pods_of(api, namespace, created), restarted, what="a restart")
    assert pod["status"]["phase"] == "Running"  # restartPolicy Always: the pod lives on, its container restarts
    last = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert (last["exitCode"], last["message"]) == (1, "Failed to find a kernel for the WNA16 linear layer")
    status = get(api, "apps/v1", "deployments", namespace, "crash")["status"]
    assert (status["replicas"], status["readyReplicas"]) == (1, 0)
    assert len(pods_of(api, namespace, created)) == 1  # restarted in place, not replaced


@pytest.mark.stack
def test_the_runner_makes_no_writes_at_steady_state(
    api: KubeClient, namespace: str, workload_runner: LocalRunner, kubeapi: Any
) -> None:
    api.call("POST", api_path("apps/v1", "deployments", namespace), web_deployment("steady"))
    make_service(api, namespace, "steady")
    make_job(api, namespace, "done", [container("main", "exit_with.py")])
    eventually(lambda: get(api, "apps/v1", "deployments", namespace, "steady"),
               lambda d: (d.get("status") or {}).get("readyReplicas") == 1, what="deployment ready")
    eventually(lambda: get(api, "batch/v1", "jobs", namespace, "done"), job_finished, what="job done")
    time.sleep(0.5)  # let the last status writes land
    since = time.time()
    time.sleep(2.0)  # ten passes and two readiness probes
    assert kubeapi.writes(since=since, user_agent_prefix="quantrol-local-runner") == []
    assert kubeapi.writes(since=0, user_agent_prefix="quantrol-local-runner")  # the filter does see its writes


@pytest.mark.stack
def test_deleting_an_owner_collects_its_children_and_stops_their_processes(
    api: KubeClient, namespace: str, workload_runner: LocalRunner
) -> None:
    owner = dict(api.call("POST", f"/apis/quantrol.io/v1alpha1/namespaces/{namespace}/quantizedmodels",
                          {"apiVersion": "quantrol.io/v1alpha1", "kind": "QuantizedModel",
                           "metadata": {"name": "qm"}, "spec": {}}))
    ref = {"apiVersion": "quantrol.io/v1alpha1", "kind": "QuantizedModel", "name": "qm",
           "uid": owner["metadata"]["uid"], "controller": True}
    job = make_job(api, namespace, "calib", [container("main", "exit_with.py", "--sleep", "120")], owner=ref)
    pods = eventually(lambda: pods_of(api, namespace, job),
                      lambda p: bool(p) and phase(p[0]) == "Running", what="pod running")
    pid = pid_of(pods[0])
    api.delete(f"/apis/quantrol.io/v1alpha1/namespaces/{namespace}/quantizedmodels/qm")
    eventually(lambda: get(api, "batch/v1", "jobs", namespace, "calib"), lambda j: not j, what="job collected")
    eventually(lambda: api.list(api_path("v1", "pods", namespace)), lambda p: not p, what="pods collected")
    eventually(lambda: pid_alive(pid), lambda alive: not alive, what="the process to end")


@pytest.mark.stack
def test_serving_cap_keeps_the_third_serving_pod_pending_with_the_reason(
    api: KubeClient, namespace: str, workload_runner: LocalRunner
) -> None:
    assert workload_runner.serving_cap == 2
    for name in ("serve-a", "serve-b", "serve-c"):
        api.call("POST", api_path("apps/v1", "deployments", namespace),
                 web_deployment(name, image=TEST_SERVING_IMAGE))
        time.sleep(0.3)  # creation order decides which pods the cap admits

    def ready(name: str) -> int:
        return int((get(api, "apps/v1", "deployments", namespace, name).get("status") or {}).get("readyReplicas", 0))

    eventually(lambda: (ready("serve-a"), ready("serve-b")), lambda r: r == (1, 1), what="two serving pods")
    time.sleep(1.0)  # several passes later, the third is still held

    def cpus(name: str) -> frozenset[int]:
        [pod] = pods_of(api, namespace, get(api, "apps/v1", "deployments", namespace, name))
        return frozenset(os.sched_getaffinity(pid_of(pod)))

    slots = [frozenset(slot) for slot in workload_runner.cpu_slots]
    if slots:  # each engine alone on its CPUs, as with exclusive CPUs on a node (none on a 1-CPU machine)
        assert {cpus("serve-a"), cpus("serve-b")} == set(slots)
    c_deployment = get(api, "apps/v1", "deployments", namespace, "serve-c")
    [held] = pods_of(api, namespace, c_deployment)
    scheduled = condition(held, "PodScheduled")
    assert (held["status"]["phase"], scheduled["status"], scheduled["reason"]) == ("Pending", "False", "Unschedulable")
    assert "caps concurrent serving processes at 2 on this machine" in scheduled["message"]
    assert c_deployment["status"]["readyReplicas"] == 0

    a_cpus = cpus("serve-a") if slots else frozenset()
    api.delete(api_path("apps/v1", "deployments", namespace, "serve-a"))
    eventually(lambda: ready("serve-c"), lambda r: r == 1, what="the held pod to start once a slot frees")
    if slots:
        assert cpus("serve-c") == a_cpus  # the freed slot, not the one serve-b still holds


@pytest.mark.stack
def test_teardown_leaves_no_process_and_no_port_behind(
    api: KubeClient, namespace: str, workload_runner_factory: Callable[..., LocalRunner], tmp_path: Path
) -> None:
    runner = workload_runner_factory(namespaces=[namespace])
    grandchild = tmp_path / "grandchild.pid"
    api.call("POST", api_path("apps/v1", "deployments", namespace), web_deployment("web"))
    make_job(api, namespace, "long", [container("main", "exit_with.py", "--sleep", "120",
                                                "--spawn-child", str(grandchild))])
    eventually(lambda: get(api, "apps/v1", "deployments", namespace, "web"),
               lambda d: (d.get("status") or {}).get("readyReplicas") == 1, what="deployment ready")
    eventually(lambda: grandchild.exists() and grandchild.read_text().strip() != "", bool, what="grandchild")
    pids = [*runner.live_pids(), int(grandchild.read_text())]
    ports = list(runner.allocated_ports)
    assert len(pids) == 3, (pids, runner.started_pids)  # server, job, the job's grandchild
    assert ports and all(port_is_open(p) for p in ports), ports

    began = time.monotonic()
    runner.stop()
    assert time.monotonic() - began < 15
    assert [p for p in pids if pid_alive(p)] == []
    assert groups_alive(runner.started_pids) == set()
    assert [p for p in ports if port_is_open(p)] == []


@pytest.mark.stack
def test_the_runner_runs_as_its_own_process_and_takes_its_children_along(
    api: KubeClient, namespace: str, kubeconfig: Path, tmp_path: Path
) -> None:
    image_map = tmp_path / "images.json"
    image_map.write_text(json.dumps([{"pattern": "quantrol-test/*", "bin_dir": str(Path(sys.executable).parent)}]))
    argv = [sys.executable, "-m", "quantrol_dev.localstack.runner", "--kubeconfig", str(kubeconfig),
            "--image-map", str(image_map), "--state-dir", str(tmp_path / "state"), "--namespace", namespace]
    process = ManagedProcess("runner", argv, tmp_path / "runner.log").start()
    try:
        job = make_job(api, namespace, "long", [container("main", "exit_with.py", "--sleep", "120")])
        pods = eventually(lambda: pods_of(api, namespace, job),
                          lambda p: bool(p) and phase(p[0]) == "Running", what="pod running")
        pid = pid_of(pods[0])
        assert pid_alive(pid)
    finally:
        process.stop(timeout=20)
    assert process.popen is not None and process.popen.returncode == 0, process.log_tail()
    assert not pid_alive(pid)
    assert "never used on a real cluster" in process.log_tail(200)
