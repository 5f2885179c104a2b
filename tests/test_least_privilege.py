"""Least privilege, checked rather than claimed: the (verb, resource) pairs the operator really uses over a
full lifecycle of both kinds equal the rules the Helm chart grants (charts/quantrol/files/rbac.yaml).

The lifecycle runs against its own API emulation, so the request log holds only this test's traffic. As in the
other operator tests, the test plays the kubelet and the Deployment controller (Job and Deployment status).
The Prometheus Operator's PodMonitor CRD is installed (tests/data/crds/), so the chart's default
(monitoring.podMonitors.enabled=auto) is what runs: the `podMonitors` rules are checked with the rest. Without
that CRD the operator makes no podmonitors request at all (tests/test_pod_monitor.py), yet the chart still grants
them, as it cannot know at render time whether the CRD will be there; `monitoring.podMonitors.enabled=false` drops
them (tests/test_chart.py).
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
from quantrol_dev.localstack.procs import free_port, wait_until

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION = "quantrol.io", "v1alpha1"
OPERATOR_AGENTS = ("quantrol-operator", "kopf/")


@pytest.fixture
def private_api(tmp_path: Path) -> Iterator[KubeAPIServer]:
    crds = tmp_path / "crds"  # Quantrol's own CRDs and the Prometheus Operator's PodMonitor
    crds.mkdir()
    for path in [*(ROOT / "crds").glob("*.yaml"), *(ROOT / "tests/data/crds").glob("*.yaml")]:
        (crds / path.name).write_bytes(path.read_bytes())
    server = KubeAPIServer(workdir=tmp_path / "kubeapi", crds_dir=crds).start()
    try:
        yield server
    finally:
        server.stop()


def granted(*lists: str) -> set[tuple[str, str, str]]:
    rules = yaml.safe_load((ROOT / "charts/quantrol/files/rbac.yaml").read_text())
    return {(verb, group, resource) for name in lists for rule in rules[name] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def used(server: KubeAPIServer) -> set[tuple[str, str, str]]:
    """What the operator's requests need authorized: the requests themselves, and the checks
    OwnerReferencesPermissionEnforcement makes on them (the emulation logs those as `implied_by` entries)."""
    return {(e["verb"], e["group"] or "", e["resource"]) for e in server.requests()
            if e["user_agent"].startswith(OPERATOR_AGENTS) and e["resource"]}


def test_owner_reference_checks_are_logged_as_a_cluster_would_make_them(private_api: KubeAPIServer) -> None:
    """The emulation records what OwnerReferencesPermissionEnforcement asks the authorizer: `update` on the owner's
    finalizers for a new blockOwnerDeletion, `delete` on the object when its ownerReferences change."""
    api = kubernetes.config.new_client_from_config(config_file=str(private_api.write_kubeconfig()))
    core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    core.create_namespace({"metadata": {"name": "gc"}})
    sp = yaml.safe_load((ROOT / "e2e/samples/servingpolicy-llama-8b.yaml").read_text())
    sp["metadata"] = {"name": "owner", "namespace": "gc"}
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, "gc", "servingpolicies", sp)["metadata"]["uid"]
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ServingPolicy", "name": "owner", "uid": uid,
           "controller": True, "blockOwnerDeletion": True}
    core.create_namespaced_config_map("gc", {"metadata": {"name": "c", "ownerReferences": [ref]}})
    core.patch_namespaced_config_map("c", "gc", {"metadata": {"ownerReferences": None}})
    implied = [(e["verb"], e["resource"]) for e in private_api.requests() if e.get("implied_by")]
    assert implied == [("update", "servingpolicies/finalizers"), ("delete", "configmaps")]


def _ready(apps: kubernetes.client.AppsV1Api, namespace: str) -> None:
    for d in apps.list_namespaced_deployment(namespace).items:
        want = d.spec.replicas or 0
        apps.patch_namespaced_deployment_status(d.metadata.name, namespace, {"status": {
            "observedGeneration": d.metadata.generation, "replicas": want, "readyReplicas": want,
            "updatedReplicas": want}})


def test_the_operator_uses_exactly_what_the_chart_grants(private_api: KubeAPIServer, tmp_path: Path) -> None:
    kubeconfig = private_api.write_kubeconfig()
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    core, apps, batch = (kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api),
                         kubernetes.client.BatchV1Api(api))
    custom = kubernetes.client.CustomObjectsApi(api)
    ns = "lp"
    core.create_namespace({"metadata": {"name": ns}})
    services = tmp_path / "services.json"
    services.write_text("{}")  # no Service resolves: kernel reads and router pushes fail fast, as when pods are down
    began = time.time()
    operator = OperatorProcess(kubeconfig, tmp_path / "operator", env={
        "QUANTROL_POLL_SECONDS": "1", **addresses.environment(services)})
    operator.start(ready=lambda: kopf_watches(private_api, began, ("quantizedmodels", "servingpolicies")))
    try:
        _lifecycle(custom, core, apps, batch, ns, free_port())
    finally:
        operator.stop()
    # What the chart grants by default: podMonitors.enabled=auto grants the podmonitors rules too.
    missing = used(private_api) - granted("workload", "clusterDiscovery", "podMonitors")
    extra = granted("workload", "clusterDiscovery", "podMonitors") - used(private_api)
    assert not missing, f"the operator used what the chart does not grant: {sorted(missing)}"
    assert not extra, f"the chart grants what the operator never used: {sorted(extra)}"


def _lifecycle(custom: Any, core: Any, apps: Any, batch: Any, ns: str, dead_port: int) -> None:
    core.create_namespaced_secret(ns, {"metadata": {"name": "registry-credentials"},  # the samples' registry login
                                       "type": "kubernetes.io/dockerconfigjson",
                                       "data": {".dockerconfigjson": "eyJhdXRocyI6IHt9fQ=="}})
    qm = yaml.safe_load((ROOT / "e2e/samples/quantizedmodel-llama-8b-w4a16.yaml").read_text())
    qm["metadata"] = {"name": "tiny", "namespace": ns}
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "quantizedmodels", qm)
    wait_until(lambda: [j.metadata.name for j in batch.list_namespaced_job(ns).items] == ["tiny-calib-g1"],
               timeout=20, what="the generation-1 Job")
    # A spec change while the first Job still runs: a new Job, and the old one withdrawn.
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "quantizedmodels", "tiny",
                                          {"spec": {"quantization": {"method": "rtn"}}})
    wait_until(lambda: [j.metadata.name for j in batch.list_namespaced_job(ns).items] == ["tiny-calib-g2"],
               timeout=20, what="only the generation-2 Job")

    sp = yaml.safe_load((ROOT / "e2e/samples/servingpolicy-llama-8b.yaml").read_text())
    sp["metadata"] = {"name": "llama", "namespace": ns}
    sp["spec"]["candidate"] = {"quantizedModelRef": {"name": "tiny"}}  # still calibrating: stable serves alone
    sp["spec"]["deletionPolicy"] = "Orphan"
    sp["spec"]["analysis"]["prometheus"] = {"address": f"http://127.0.0.1:{dead_port}"}
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "servingpolicies", sp)
    wait_until(lambda: len(apps.list_namespaced_deployment(ns).items) == 2, timeout=20,
               what="stable and router Deployments")
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "servingpolicies", "llama", {"spec": {"candidate": {
        "quantizedModelRef": None, "artifact": "oci://registry.example.com/m@sha256:" + "b" * 64}}})
    wait_until(lambda: len(apps.list_namespaced_deployment(ns).items) == 3, timeout=20,
               what="stable, candidate and router Deployments")
    _ready(apps, ns)
    # A new candidate digest: the old candidate's arm is withdrawn (Deployment and Service deleted).
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "servingpolicies", "llama", {
        "spec": {"candidate": {"artifact": "oci://registry.example.com/m@sha256:" + "c" * 64}}})
    wait_until(lambda: not any(d.metadata.name.endswith("bbbbbbbbbbbb")
                               for d in apps.list_namespaced_deployment(ns).items),
               timeout=20, what="the withdrawn candidate arm to be deleted")
    # deletionPolicy Orphan: the children lose their owner reference and keep serving.
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "servingpolicies", "llama")
    wait_until(lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, ns, "servingpolicies")["items"],
               timeout=20, what="the ServingPolicy to be gone")
    orphans = apps.list_namespaced_deployment(ns).items
    assert orphans and all(not d.metadata.owner_references for d in orphans)
    (monitor,) = custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", ns, "podmonitors")["items"]
    assert not monitor["metadata"].get("ownerReferences")  # orphaned with the arms it scrapes
