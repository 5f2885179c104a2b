"""Lifecycle (issue 15): an uninstall leaves nothing stuck, settled objects cost no API calls, and steady state logs
no line per pass per object.

The operator runs as a real `kopf run` process against its own API emulation (the request log holds only this test's
traffic); the test plays the controllers that would write Job and Deployment status, as the other operator tests do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from quantrol_dev.localstack import addresses
from quantrol_dev.localstack.kubeapi import KubeAPIServer, OperatorProcess, kopf_watches
from quantrol_dev.localstack.procs import wait_until
from quantrol_operator.planning.servingpolicy import settled

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION = "quantrol.io", "v1alpha1"
FINALIZER = "quantrol.io/finalizer"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[KubeAPIServer, OperatorProcess, Any]]:
    server = KubeAPIServer(workdir=tmp_path / "kubeapi", crds_dir=ROOT / "crds").start()
    kubeconfig = server.write_kubeconfig()
    services = tmp_path / "services.json"
    services.write_text("{}")
    began = time.time()
    operator = OperatorProcess(kubeconfig, tmp_path / "operator", args=("--standalone", "--all-namespaces",
                                                                         "--verbose"),
                               env={"QUANTROL_POLL_SECONDS": "0.5", **addresses.environment(services)})
    operator.start(ready=lambda: kopf_watches(server, began, ("quantizedmodels", "servingpolicies")))
    try:
        yield server, operator, kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    finally:
        operator.stop()
        server.stop()


# The docker-config Secret the samples name (spec.artifact.credentialsSecretRef): without it a QuantizedModel waits.
REGISTRY_SECRET = {"metadata": {"name": "registry-credentials"}, "type": "kubernetes.io/dockerconfigjson",
                   "data": {".dockerconfigjson": "eyJhdXRocyI6IHt9fQ=="}}


def manifests(ns: str, deletion_policy: str = "Delete") -> tuple[dict[str, Any], dict[str, Any]]:
    qm = yaml.safe_load((ROOT / "e2e/samples/quantizedmodel-llama-8b-w4a16.yaml").read_text())
    qm["metadata"] = {"name": "tiny", "namespace": ns}
    sp = yaml.safe_load((ROOT / "e2e/samples/servingpolicy-llama-8b.yaml").read_text())
    sp["metadata"] = {"name": "llama", "namespace": ns}
    sp["spec"].update(candidate={"quantizedModelRef": {"name": "tiny"}}, deletionPolicy=deletion_policy)
    sp["spec"]["analysis"]["prometheus"] = {"address": "http://127.0.0.1:9"}
    return qm, sp


def test_uninstall_then_namespace_deletion_leaves_nothing_stuck(
        stack: tuple[KubeAPIServer, OperatorProcess, Any]) -> None:
    """Only deletionPolicy Orphan needs the operator at deletion, so only such a policy carries a finalizer; after
    `helm uninstall` (the operator stopped) the namespace of Delete policies and QuantizedModels goes at once."""
    _server, operator, api = stack
    core, apps, custom = (kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api),
                          kubernetes.client.CustomObjectsApi(api))
    core.create_namespace({"metadata": {"name": "team"}})
    core.create_namespaced_secret("team", REGISTRY_SECRET)  # the samples' registry login
    qm, sp = manifests("team")
    custom.create_namespaced_custom_object(GROUP, VERSION, "team", "quantizedmodels", qm)
    custom.create_namespaced_custom_object(GROUP, VERSION, "team", "servingpolicies", sp)
    orphan = {**sp, "metadata": {"name": "kept", "namespace": "team"}, "spec": {**sp["spec"],
                                                                                  "deletionPolicy": "Orphan"}}
    custom.create_namespaced_custom_object(GROUP, VERSION, "team", "servingpolicies", orphan)
    wait_until(lambda: len(apps.list_namespaced_deployment("team").items) == 4, timeout=20,
               what="stable and router Deployments of both policies")

    def finalizers(plural: str, name: str) -> list[str]:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, "team", plural, name)
        return list(obj["metadata"].get("finalizers") or [])

    wait_until(lambda: finalizers("servingpolicies", "kept") == [FINALIZER], timeout=10, what="Orphan's finalizer")
    assert finalizers("servingpolicies", "llama") == [] and finalizers("quantizedmodels", "tiny") == []
    # The documented order (charts/README.md): Orphan policies are deleted while the operator still runs.
    custom.delete_namespaced_custom_object(GROUP, VERSION, "team", "servingpolicies", "kept")
    wait_until(lambda: not any(p["metadata"]["name"] == "kept" for p in custom.list_namespaced_custom_object(
        GROUP, VERSION, "team", "servingpolicies")["items"]), timeout=20, what="the Orphan policy to go")
    operator.stop()  # helm uninstall
    core.delete_namespace("team")
    left = [(plural, o["metadata"]["name"]) for plural in ("quantizedmodels", "servingpolicies")
            for o in custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]]
    assert left == [], f"stuck after the namespace was deleted: {left}"


def test_settled_objects_make_no_api_calls_and_no_log_line_per_pass(
        stack: tuple[KubeAPIServer, OperatorProcess, Any]) -> None:
    server, operator, api = stack
    core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    core.create_namespace({"metadata": {"name": "calm"}})
    core.create_namespaced_secret("calm", REGISTRY_SECRET)
    qm, _ = manifests("calm")
    custom.create_namespaced_custom_object(GROUP, VERSION, "calm", "quantizedmodels", qm)
    wait_until(lambda: (custom.get_namespaced_custom_object(GROUP, VERSION, "calm", "quantizedmodels", "tiny")
                        .get("status") or {}).get("jobName"), timeout=20, what="the calibration Job")
    # The Job finished long ago: the QuantizedModel is Ready for its generation (what the operator writes then).
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "calm", "quantizedmodels", "tiny", {"status": {
        "phase": "Failed", "observedGeneration": 1, "message": "settled by the test"}})
    time.sleep(2)  # the event of that write, and any pass already in flight
    since = time.time()
    lines_before = operator.log_path.read_text().count("\n")
    time.sleep(3)  # six timer intervals
    calls = [e for e in server.requests(since=since) if e["user_agent"].startswith(("quantrol-operator", "kopf/"))
             and e["verb"] != "watch"]
    assert calls == [], f"a settled QuantizedModel still costs API calls: {calls[:3]}"
    new_lines = operator.log_path.read_text().splitlines()[lines_before:]
    assert not [line for line in new_lines if "succeeded" in line], new_lines[:3]


def test_which_policies_are_settled() -> None:
    def policy(phase: str, **status: Any) -> dict[str, Any]:
        return {"metadata": {"generation": 2}, "status": {
            "phase": phase, "observedGeneration": 2, "router": {"version": 4, "appliedVersion": 4}, **status}}

    assert settled(policy("RolledBack")) and settled(policy("Failed")) and settled(policy("Promoted"))
    assert not settled(policy("Canary")) and not settled(policy("Shadow")) and not settled(policy("Pending"))
    assert not settled(policy("RolledBack", observedGeneration=1)), "a spec edit not yet observed"
    assert not settled(policy("RolledBack", router={"version": 5, "appliedVersion": 4})), "a rollback not landed"
    warm = [{"type": "PreviousStableWarm", "status": "True", "reason": "GracePeriod"}]
    assert not settled(policy("Promoted", conditions=warm)), "the previous stable arm still to scale down"
