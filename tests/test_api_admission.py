"""Objects a real API server accepts (issue 15): the emulation's admission rules refuse what a cluster refuses, and
every child Quantrol builds passes them, Pod Security `restricted` included.

The rules live in devstack/quantrol_dev/localstack/admission.py, each with the Kubernetes documentation it follows;
the emulation applies them on every write. Pure tests check the rules and the builders; the stack tests check that
the emulation answers as a cluster would (422 Invalid, 403 Forbidden, a Warning header).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml

from quantrol_dev.localstack import admission
from quantrol_operator.api.quantizedmodel import QuantizedModelSpec
from quantrol_operator.api.servingpolicy import KvCacheDtype, ModelStorage, ServingPolicySpec, StorageMedium
from quantrol_operator.children import calibration, label_value, monitoring, qualification, router, serving

ROOT = Path(__file__).resolve().parent.parent
STABLE = "oci://registry.example.com/models/llama-bf16@sha256:" + "a" * 64
CANDIDATE = "oci://registry.example.com/models/llama-w4@sha256:" + "b" * 64


def owner(kind: str, name: str = "llama-3-1-8b") -> dict[str, Any]:
    return {"apiVersion": "quantrol.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "team-a", "uid": "u-1", "generation": 3}}


def children(name: str = "llama-3-1-8b") -> list[dict[str, Any]]:
    """Every object Quantrol builds for one QuantizedModel and one ServingPolicy, from the e2e samples."""
    sp = yaml.safe_load((ROOT / "e2e/samples/servingpolicy-llama-8b.yaml").read_text())
    qm = yaml.safe_load((ROOT / "e2e/samples/quantizedmodel-llama-8b-w4a16.yaml").read_text())
    sp_spec, qm_spec = ServingPolicySpec.model_validate(sp["spec"]), QuantizedModelSpec.model_validate(qm["spec"])
    sp_owner, qm_owner = owner("ServingPolicy", name), owner("QuantizedModel", name)
    config = router.router_config(name, "team-a", sp_spec, STABLE, CANDIDATE, 95, 5, 0.0, version=1)
    worker = calibration.worker_config(name, "team-a", 3, qm_spec)
    context = serving.ServingContext("ghcr.io/quantrol/serve:0.1.0", "ghcr.io/quantrol/operator:0.1.0",
                                     credentials_secret="registry-credentials")
    gpu_spec = sp_spec.model_copy(update={"serving": sp_spec.serving.model_copy(update={
        "tensor_parallel_size": None, "resources": None,
        "storage": ModelStorage(medium=StorageMedium.EPHEMERAL_VOLUME, size="100Gi", storage_class_name="fast")})})
    qualify = qualification.worker_config(name, "team-a", sp_spec, STABLE, CANDIDATE)
    qualify_job = qualification.job_name(name, CANDIDATE, 12)
    return [
        qualification.job(sp_owner, qualify_job, sp_spec, qualify, "ghcr.io/quantrol/serve:0.1.0"),
        qualification.config_map(sp_owner, qualify_job, qualify),
        calibration.job(qm_owner, qm_spec, "ghcr.io/quantrol/worker:0.1.0"), calibration.config_map(qm_owner, worker),
        serving.arm_deployment(sp_owner, sp_spec, serving.ArmEngine(STABLE, "baseline"), context, 2),
        serving.arm_service(sp_owner, STABLE),
        # The candidate arm as a GPU pool runs it: a claim per pod, the registry Secret, fp8 KV cache, TP 2.
        serving.arm_deployment(sp_owner, gpu_spec, serving.ArmEngine(CANDIDATE, "candidate", 2, KvCacheDtype.FP8,
                                                                      40 << 30), context, 2),
        router.router_deployment(sp_owner, sp_spec, "ghcr.io/quantrol/serve:0.1.0"), router.router_service(sp_owner),
        router.router_config_map(sp_owner, config), router.admin_secret(sp_owner, "t" * 43),
        monitoring.pod_monitor(sp_owner, sp_spec),
    ]


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objs if o["kind"] in ("Job", "Deployment")]


# --- what Quantrol builds -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-3-1-8b", "a" * 50, "x"])
def test_every_child_passes_the_api_servers_rules(name: str) -> None:
    """Names, labels, annotations, container and port names, selectors and each kind's schema, for the shortest
    and the longest name the CRDs admit."""
    for child in children(name):
        assert admission.kind_problems(child) == [], child["kind"]
        if child["kind"] != monitoring.KIND:
            kubernetes_validate.validate(child, "1.33.0", strict=True)


def test_every_pod_passes_pod_security_restricted_without_an_api_token() -> None:
    for name, spec in pod_specs(children()):
        assert admission.violations("restricted", spec) == [], name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsUser"] != 0, name  # explicit: a tenant's image may default to root


def test_a_pod_as_quantrol_built_it_before_is_refused_by_restricted() -> None:
    """The rules are not vacuous: the pre-issue pod (no securityContext) breaks five restricted controls."""
    _, spec = pod_specs(children())[0]
    bare = {k: v for k, v in copy.deepcopy(spec).items() if k not in ("securityContext",)}
    bare["containers"] = [{k: v for k, v in c.items() if k != "securityContext"} for c in bare["containers"]]
    found = admission.violations("restricted", bare)
    assert {v.split(" (")[0] for v in found} == {"allowPrivilegeEscalation != false", "unrestricted capabilities",
                                                  "runAsNonRoot != true", "seccompProfile"}
    assert admission.violations("baseline", bare) == []


def test_labels_derived_from_names_are_always_valid() -> None:
    long = "m" * 80
    value = label_value(long)
    assert len(value) <= 63 and admission.meta_problems({"labels": {"k": value}}) == []
    assert label_value("m" * 79) != value  # two long names never share a value
    assert label_value("llama-3-1-8b") == "llama-3-1-8b"  # a name that is a label value stays itself


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "service named after a policy that starts with a digit": (
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "8b-chat"}}, "DNS-1035"),
    "service name with a dot": ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "llama-3.1-8b"}},
                                "DNS-1035"),
    "job name over 63": ({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j" * 64}}, "63"),
    "label value over 63": ({"apiVersion": "v1", "kind": "ConfigMap",
                             "metadata": {"name": "c", "labels": {"quantrol.io/servingpolicy": "p" * 64}}},
                            "a valid label"),
    "label key with two slashes": ({"apiVersion": "v1", "kind": "ConfigMap",
                                    "metadata": {"name": "c", "labels": {"a/b/c": "x"}}}, "qualified name"),
    "annotations over 256 KiB": ({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "c", "annotations": {"a": "x" * (256 * 1024)}}}, "Too long"),
    "port name over 15": ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "image": "i", "ports": [{"name": "launcher-status-1", "containerPort": 1}]}]}}, "15"),
    "container name in capitals": ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                    "spec": {"containers": [{"name": "Engine", "image": "i"}]}}, "DNS-1123"),
    "selector not matching the template": ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                                            "spec": {"selector": {"matchLabels": {"a": "1"}}, "template": {
                                                "metadata": {"labels": {"a": "2"}},
                                                "spec": {"containers": [{"name": "c", "image": "i"}]}}}},
                                           "does not match"),
    "replicas not an integer (schema)": ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                                          "spec": {"replicas": "two", "selector": {"matchLabels": {"a": "1"}},
                                                   "template": {"metadata": {"labels": {"a": "1"}}, "spec": {
                                                       "containers": [{"name": "c", "image": "i"}]}}}},
                                         "spec.replicas"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_rule_refuses_what_a_cluster_refuses(case: str) -> None:
    obj, words = BAD[case]
    problems = admission.kind_problems(obj)
    assert problems and any(words in p for p in problems), problems


# --- the emulation answers as a cluster would ---------------------------------------------------------------------


@pytest.mark.stack
def test_the_emulation_refuses_invalid_children_naming_the_field(kube_client: kubernetes.client.ApiClient,
                                                                 namespace: str) -> None:
    core = kubernetes.client.CoreV1Api(kube_client)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        core.create_namespaced_service(namespace, {"metadata": {"name": "8b-chat"},
                                                   "spec": {"ports": [{"port": 80}]}})
    assert refused.value.status == 422 and "metadata.name" in str(refused.value.body)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "c", "labels": {"k": "v" * 64}}})
    assert refused.value.status == 422 and "metadata.labels" in str(refused.value.body)


@pytest.mark.stack
def test_a_restricted_namespace_refuses_a_root_pod_and_admits_quantrols(kube_client: kubernetes.client.ApiClient,
                                                                      restricted_namespace: str) -> None:
    """Pod Security admission: enforce refuses pods (403), warn answers with a Warning on the workload, and every
    pod template Quantrol builds is admitted as a pod in that namespace."""
    core, apps = kubernetes.client.CoreV1Api(kube_client), kubernetes.client.AppsV1Api(kube_client)
    ns = restricted_namespace
    with pytest.raises(kubernetes.client.ApiException) as refused:
        core.create_namespaced_pod(ns, {"metadata": {"name": "root"},
                                        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    assert refused.value.status == 403 and 'violates PodSecurity \\"restricted:latest\\"' in refused.value.body
    _, headers = apps.create_namespaced_deployment_with_http_info(ns, {
        "metadata": {"name": "bare"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
            "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})[1:]
    assert "would violate PodSecurity 'restricted:latest'" in headers.get("Warning", "")
    for name, spec in pod_specs(children()):
        core.create_namespaced_pod(ns, {"metadata": {"name": f"{name}-pod"[:63]}, "spec": spec})
