"""The PodMonitor per ServingPolicy: the pure builder against the pods the real builders make, the planner's switch,
the operator's setting, and the operator writing it (or not) against the API emulation.

The Prometheus Operator and Prometheus are not run here. What they would do with a PodMonitor is played by
`targets()` below: one scrape job per endpoint that keeps the pod ports named like the endpoint's `port`, then the
endpoint's relabelings (Prometheus's keep and replace, with anchored regexes), then the `namespace` label the
Prometheus Operator adds. The CRD the emulation serves is the Prometheus Operator's own, cut down to the fields
Quantrol writes (tests/data/crds/): the emulation has no garbage collector, so owner references are checked, not
acted on.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes
import pytest
import yaml

from quantrol_dev.localstack import addresses
from quantrol_dev.localstack.kubeapi import KubeAPIServer, OperatorProcess, kopf_watches
from quantrol_dev.localstack.procs import wait_until
from quantrol_operator.api.servingpolicy import ServingPolicySpec
from quantrol_operator.children import MANAGED_BY, monitoring, owner_reference, router, serving
from quantrol_operator.defaults import OperatorDefaults, parse_labels
from quantrol_operator.planning.servingpolicy import Images, SpObserved, plan, read_spec

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "e2e/samples/servingpolicy-llama-8b.yaml"
CANDIDATE = "oci://registry.example.com/models/llama-w4a16@sha256:" + "c" * 64
IMAGES = Images("serve:test", "router:test", "tools:test")
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PODMONITOR_CRD = ROOT / "tests/data/crds/podmonitors.monitoring.coreos.com.yaml"
GROUP, VERSION = "quantrol.io", "v1alpha1"
PM_GROUP, PM_VERSION, PM_PLURAL = "monitoring.coreos.com", "v1", "podmonitors"
OPERATOR_AGENTS = ("quantrol-operator", "kopf/")


# --- what a Prometheus Operator and Prometheus would make of it ---------------------------------------------------


def meta_labels(pod: dict[str, Any], container_port: dict[str, Any], namespace: str) -> dict[str, str]:
    """The labels Prometheus's Kubernetes pod discovery gives one container port of a pod."""
    labels = {monitoring.pod_label(k): v for k, v in pod["metadata"]["labels"].items()}
    labels.update({"__meta_kubernetes_namespace": namespace,
                   "__meta_kubernetes_pod_container_port_name": container_port.get("name", ""),
                   "__meta_kubernetes_pod_container_port_number": str(container_port["containerPort"])})
    return labels


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus's `keep` and `replace` (the only actions the builder uses); None when a rule drops the target."""
    out = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(out.get(s, "") for s in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace").lower()
        if action == "keep":
            if match is None:
                return None
        elif action == "replace":
            if match is not None:
                result = match.expand(rule.get("replacement", "$1").replace("$1", r"\1"))
                if result:
                    out[rule["targetLabel"]] = result
                else:
                    out.pop(rule["targetLabel"], None)  # an empty value removes the label
        else:
            raise AssertionError(f"relabel action {action} is not played here")
    return out


def targets(monitor: dict[str, Any], pods: list[dict[str, Any]]) -> set[tuple[str, int, str, frozenset[Any]]]:
    """(pod, port, path, public labels) of every target the PodMonitor makes of these pods."""
    spec, namespace = monitor["spec"], monitor["metadata"]["namespace"]
    found = set()
    for pod in pods:
        if not spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items():
            continue
        ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]
        for endpoint in spec["podMetricsEndpoints"]:
            for port in ports:
                if port.get("name") != endpoint["port"]:
                    continue  # the Prometheus Operator's own first relabelling: the port named by the endpoint
                labels = relabel(meta_labels(pod, port, namespace), endpoint.get("relabelings", []))
                if labels is None:
                    continue
                public = {k: v for k, v in labels.items() if not k.startswith("__")}
                public["namespace"] = namespace  # the Prometheus Operator adds it for every target
                found.add((pod["metadata"]["name"], port["containerPort"], endpoint.get("path", "/metrics"),
                           frozenset(public.items())))
    return found


def pods_of(deployment: dict[str, Any]) -> dict[str, Any]:
    """The pod a Deployment's template makes, named after the Deployment (enough to tell them apart here)."""
    template = copy.deepcopy(deployment["spec"]["template"])
    template["metadata"]["name"] = deployment["metadata"]["name"]
    return template


@pytest.fixture
def owner() -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    obj["metadata"].update(uid="uid-sp", generation=1)
    return obj


def built_pods(owner: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stable arm, the candidate arm and the router, as the real builders make them."""
    spec = ServingPolicySpec.model_validate(owner["spec"])
    stable = owner["spec"]["baseline"]["artifact"]
    context = serving.ServingContext("serve:test", "tools:test")
    arm = serving.ArmEngine
    return {"stable": pods_of(serving.arm_deployment(owner, spec, arm(stable, "baseline"), context, 1)),
            "candidate": pods_of(serving.arm_deployment(owner, spec, arm(CANDIDATE, "candidate"), context, 1)),
            "router": pods_of(router.router_deployment(owner, spec, "router:test"))}


def build(owner: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return monitoring.pod_monitor(owner, ServingPolicySpec.model_validate(owner["spec"]), labels)


# --- the builder --------------------------------------------------------------------------------------------------


def test_the_selector_picks_the_arms_and_routers_of_its_own_policy_only(owner: dict[str, Any]) -> None:
    selector = build(owner)["spec"]["selector"]["matchLabels"]
    for role, pod in built_pods(owner).items():
        assert selector.items() <= pod["metadata"]["labels"].items(), f"the {role} pods are not selected"
    other = copy.deepcopy(owner)
    other["metadata"].update(name="another-policy", uid="uid-other")
    for role, pod in built_pods(other).items():
        assert not selector.items() <= pod["metadata"]["labels"].items(), f"another policy's {role} pods are selected"


def test_every_metrics_port_of_the_pods_becomes_one_target_with_the_label_contract(owner: dict[str, Any]) -> None:
    pods = built_pods(owner)
    found = targets(build(owner), list(pods.values()))
    policy_name, namespace = owner["metadata"]["name"], owner["metadata"]["namespace"]

    def labels(**extra: str) -> frozenset[Any]:
        return frozenset({"namespace": namespace, "policy": policy_name, **extra}.items())

    stable, candidate, router_pod = (pods[r]["metadata"]["name"] for r in ("stable", "candidate", "router"))
    stable_arm = serving.short_digest(owner["spec"]["baseline"]["artifact"])
    candidate_arm = serving.short_digest(CANDIDATE)
    assert found == {
        # vLLM's own /metrics (vllm:*) and the launcher's (quantrol_engine_kernel_info), per arm: `arm` is the digest.
        (stable, serving.ENGINE_PORT, "/metrics", labels(arm=stable_arm)),
        (stable, serving.LAUNCHER_PORT, "/metrics", labels(arm=stable_arm)),
        (candidate, serving.ENGINE_PORT, "/metrics", labels(arm=candidate_arm)),
        (candidate, serving.LAUNCHER_PORT, "/metrics", labels(arm=candidate_arm)),
        # The router's: no `arm` target label, which would turn the router's own `arm` (the role) into exported_arm.
        (router_pod, router.ROUTER_PORT, "/metrics", labels()),
    }
    # The scrape annotations stay for a plain Prometheus, and point at ports the PodMonitor scrapes too.
    for pod in pods.values():
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert any(t[0] == pod["metadata"]["name"] and t[1] == int(annotations["prometheus.io/port"]) for t in found)


def test_port_names_are_valid_container_port_names(owner: dict[str, Any]) -> None:
    for pod in built_pods(owner).values():
        names = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
        assert len(names) == len(set(names))
        assert all(re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", n) and len(n) <= 15 for n in names)


def test_name_labels_and_owner(owner: dict[str, Any]) -> None:
    monitor = build(owner, {"release": "kube-prometheus-stack", "app.kubernetes.io/managed-by": "someone-else"})
    meta = monitor["metadata"]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert (meta["name"], meta["namespace"]) == (owner["metadata"]["name"], "llm-serving")
    assert meta["labels"] == {**MANAGED_BY, serving.LABEL_POLICY: owner["metadata"]["name"],
                              router.LABEL_COMPONENT: "monitoring", "release": "kube-prometheus-stack"}
    assert meta["ownerReferences"] == [owner_reference(owner)]
    assert meta["ownerReferences"][0]["controller"] is True


@pytest.mark.parametrize(("window", "interval"), [(5, "5s"), (20, "5s"), (60, "15s"), (100, "25s"), (3600, "30s")])
def test_the_scrape_interval_leaves_several_samples_in_the_analysis_window(owner: dict[str, Any], window: int,
                                                                            interval: str) -> None:
    owner["spec"]["analysis"]["windowSeconds"] = window
    assert {e["interval"] for e in build(owner)["spec"]["podMetricsEndpoints"]} == {interval}


def undeclared(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Paths in `value` that a structural schema does not declare (a real API server prunes them)."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key in schema["properties"]:
                found += undeclared(item, schema["properties"][key], f"{path}.{key}")
            else:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += undeclared(item, schema["items"], f"{path}[{index}]")
    return found


def test_every_field_is_declared_by_the_prometheus_operator_schema(owner: dict[str, Any]) -> None:
    crd = yaml.safe_load(PODMONITOR_CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    monitor = build(owner)
    jsonschema.validate(monitor, schema)  # types, patterns (interval) and enums (relabel actions)
    assert undeclared(monitor["spec"], schema["properties"]["spec"], "spec") == []
    # The check above can fail: a misspelt field is reported.
    monitor["spec"]["podMetricsEndpoints"][0]["relabellings"] = []
    assert undeclared(monitor["spec"], schema["properties"]["spec"], "spec") == [
        "spec.podMetricsEndpoints[0].relabellings"]


# --- the planner and the setting ----------------------------------------------------------------------------------


def test_the_plan_holds_the_pod_monitor_only_when_this_installation_writes_them(owner: dict[str, Any]) -> None:
    off = plan(SpObserved(obj=owner, spec=read_spec(owner), now=T0), IMAGES)
    on = plan(SpObserved(obj=owner, spec=read_spec(owner), now=T0), IMAGES, {"release": "prom"})
    assert not [o for o in off.apply if o["kind"] == "PodMonitor"]
    (monitor,) = (o for o in on.apply if o["kind"] == "PodMonitor")
    assert monitor == build(owner, {"release": "prom"})
    # Nothing else in the plan changes.
    assert [o for o in on.apply if o["kind"] != "PodMonitor"] == off.apply and on.status == off.status
    invalid = copy.deepcopy(owner)
    invalid["spec"]["analysis"]["windowSeconds"] = "sixty"
    # nothing changes while the spec is invalid
    assert plan(SpObserved(obj=invalid, spec=read_spec(invalid), now=T0), IMAGES, {}).apply == []


def test_the_setting_is_auto_true_or_false() -> None:
    assert OperatorDefaults.from_env({}).pod_monitors == "auto"
    assert OperatorDefaults.from_env({"QUANTROL_POD_MONITORS": " True "}).pod_monitors == "true"
    assert OperatorDefaults.from_env({"QUANTROL_POD_MONITORS": ""}).pod_monitors == "auto"
    with pytest.raises(ValueError, match="QUANTROL_POD_MONITORS must be one of auto, true, false"):
        OperatorDefaults.from_env({"QUANTROL_POD_MONITORS": "yes"})
    assert parse_labels("release=kube-prometheus-stack, team=ml,") == {"release": "kube-prometheus-stack",
                                                                        "team": "ml"}
    with pytest.raises(ValueError, match="not key=value"):
        parse_labels("release")


@pytest.mark.parametrize(("mode", "served", "enabled", "asked"), [
    ("auto", True, True, True), ("auto", False, False, True),
    ("true", False, True, False), ("false", True, False, False),
])
def test_only_auto_asks_the_api_server(mode: str, served: bool, enabled: bool, asked: bool) -> None:
    calls: list[bool] = []

    def discovery() -> bool:
        calls.append(True)
        return served

    decided, why = OperatorDefaults(pod_monitors=mode).pod_monitors_enabled(discovery)
    assert (decided, bool(calls)) == (enabled, asked)
    assert f"QUANTROL_POD_MONITORS={mode}" in why


# --- the operator against the API emulation -----------------------------------------------------------------------


@pytest.fixture
def private_api(tmp_path: Path) -> Iterator[KubeAPIServer]:
    """An API server of this test's own, so its request log holds only this test's traffic."""
    server = KubeAPIServer(workdir=tmp_path / "kubeapi", crds_dir=ROOT / "crds").start()
    try:
        yield server
    finally:
        server.stop()


class Cluster:
    def __init__(self, api: KubeAPIServer, tmp_path: Path) -> None:
        self.api, self.tmp_path = api, tmp_path
        self.client = kubernetes.config.new_client_from_config(config_file=str(api.write_kubeconfig()))
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        self.namespace = "pm"
        kubernetes.client.CoreV1Api(self.client).create_namespace({"metadata": {"name": self.namespace}})

    def install_pod_monitor_crd(self) -> None:
        crd = yaml.safe_load(PODMONITOR_CRD.read_text())
        kubernetes.client.ApiextensionsV1Api(self.client).create_custom_resource_definition(crd)

    def operator(self, **env: str) -> OperatorProcess:
        began = time.time()
        services = self.tmp_path / "services.json"
        services.write_text("{}")  # no Service resolves: kernel reads and router pushes fail fast
        process = OperatorProcess(self.api.write_kubeconfig(), self.tmp_path / f"operator-{began}", env={
            "QUANTROL_POLL_SECONDS": "1", **addresses.environment(services), **env})
        return process.start(ready=lambda: kopf_watches(self.api, began, ("quantizedmodels", "servingpolicies")))

    def create_policy(self, name: str = "llama") -> dict[str, Any]:
        sp = yaml.safe_load(SAMPLE.read_text())
        sp["metadata"] = {"name": name, "namespace": self.namespace}
        # The candidate's QuantizedModel does not exist: the policy stays Pending with the stable arm serving,
        # which is a steady state (no clock in it) for the zero-writes check.
        sp["spec"]["candidate"] = {"quantizedModelRef": {"name": "not-there"}}
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "servingpolicies", sp)
        wait_until(lambda: self.policy(name).get("status", {}).get("phase") == "Pending"
                   and len(self.apps.list_namespaced_deployment(self.namespace).items) == 2,
                   timeout=30, what="the policy reconciled: status written, stable and router Deployments")
        return created

    def policy(self, name: str = "llama") -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace,
                                                                          "servingpolicies", name)
        return found

    def pod_monitors(self) -> list[dict[str, Any]]:
        found: dict[str, Any] = self.custom.list_namespaced_custom_object(PM_GROUP, PM_VERSION, self.namespace,
                                                                           PM_PLURAL)
        return list(found["items"])

    def policies(self) -> list[dict[str, Any]]:
        found: dict[str, Any] = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace,
                                                                           "servingpolicies")
        return list(found["items"])

    def operator_requests(self, since: float = 0.0, resource: str = PM_PLURAL) -> list[dict[str, Any]]:
        return [e for e in self.api.requests(since=since)
                if e["user_agent"].startswith(OPERATOR_AGENTS) and e["resource"] == resource]


@pytest.fixture
def cluster(private_api: KubeAPIServer, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(private_api, tmp_path)
    try:
        yield made
    finally:
        made.client.close()


@pytest.mark.stack
def test_without_the_crd_auto_writes_none_and_the_policy_is_served(cluster: Cluster) -> None:
    operator = cluster.operator()
    try:
        assert operator.logged("writing no PodMonitors: QUANTROL_POD_MONITORS=auto and the API server does not serve")
        cluster.create_policy()
        time.sleep(2.5)  # a few timer passes (QUANTROL_POLL_SECONDS=1)
    finally:
        operator.stop()
    assert cluster.operator_requests() == []  # not even a read: the kind is known to be absent
    assert "Traceback" not in operator.log()


@pytest.mark.stack
def test_true_without_the_crd_warns_once_and_the_rollout_goes_on(cluster: Cluster) -> None:
    operator = cluster.operator(QUANTROL_POD_MONITORS="true")
    try:
        assert operator.logged("writing one PodMonitor per ServingPolicy: QUANTROL_POD_MONITORS=true")
        cluster.create_policy()
        time.sleep(2.5)
    finally:
        operator.stop()
    # Every pass tries (and the API answers 404), but the status and the arms were written all the same.
    assert {e["status"] for e in cluster.operator_requests()} == {404}
    assert operator.log().count("PodMonitor pm/llama not written (404") == 1


@pytest.mark.stack
def test_with_the_crd_the_operator_owns_one_pod_monitor_and_keeps_it_steady(cluster: Cluster) -> None:
    cluster.install_pod_monitor_crd()  # before start-up: `auto` asks API discovery once, then
    operator = cluster.operator()
    try:
        assert operator.logged("writing one PodMonitor per ServingPolicy: QUANTROL_POD_MONITORS=auto and the API "
                               "server serves monitoring.coreos.com/v1 podmonitors")
        sp = cluster.create_policy()
        wait_until(lambda: len(cluster.pod_monitors()) == 1, timeout=20, what="the PodMonitor")
        (monitor,) = cluster.pod_monitors()
        assert monitor["metadata"]["name"] == "llama"
        assert monitor["metadata"]["ownerReferences"] == [{
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ServingPolicy", "name": "llama",
            "uid": sp["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        # It selects the pods of the Deployments the operator wrote (as stored, not as built).
        selector = monitor["spec"]["selector"]["matchLabels"]
        for deployment in cluster.apps.list_namespaced_deployment(cluster.namespace).to_dict()["items"]:
            assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert [e["interval"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["15s"] * 3

        # Steady state: every pass reads it and writes nothing (the emulation prunes what the schema does not
        # declare, as a real server does, so a field the builder got wrong would show up here as a patch per pass).
        quiet = time.time()
        time.sleep(3.5)
        reads = cluster.operator_requests(quiet)
        assert reads and {e["verb"] for e in reads} == {"get"}

        # A spec change that moves the scrape interval: one merge patch.
        changed = time.time()
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "servingpolicies", "llama",
                                                      {"spec": {"analysis": {"windowSeconds": 120}}})
        wait_until(lambda: cluster.pod_monitors()[0]["spec"]["podMetricsEndpoints"][0]["interval"] == "30s",
                   timeout=20, what="the PodMonitor's interval to follow the analysis window")
        time.sleep(2.5)
        writes = [e for e in cluster.operator_requests(changed) if e["verb"] != "get"]
        assert [(e["verb"], e["status"]) for e in writes] == [("patch", 200)]

        # deletionPolicy Orphan: the arms keep serving without an owner, and keep being scraped.
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "servingpolicies", "llama",
                                                      {"spec": {"deletionPolicy": "Orphan"}})
        # Only an Orphan policy carries the operator's finalizer; delete once it does (charts/README.md).
        wait_until(lambda: cluster.policies()[0]["metadata"].get("finalizers"), timeout=10,
                   what="the finalizer of an Orphan policy")
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "servingpolicies", "llama")
        wait_until(lambda: not cluster.policies(), timeout=20, what="the policy to go")
    finally:
        operator.stop()
    (orphan,) = cluster.pod_monitors()
    assert not orphan["metadata"].get("ownerReferences")
    assert "Traceback" not in operator.log()
