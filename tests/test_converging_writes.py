"""Writes that converge (issue 15): kube.Kube.apply against the API emulation, which stores quantities in the server's
canonical form as a cluster does (devstack/quantrol_dev/localstack/admission.py).

Chosen: desired children in the server's canonical form plus a three-way merge patch against Quantrol's record of
what it last applied (kube.three_way), not server-side apply; tests/README.md says why.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from quantrol_dev.localstack import admission
from quantrol_dev.localstack.kubeapi import KubeAPIServer
from quantrol_operator.children import canonical_quantity, quantities
from quantrol_operator.kube import Kube

# apimachinery's own examples (k8s.io/apimachinery/pkg/api/resource/quantity_test.go, TestQuantityParse and
# TestQuantityString): what the server stores for what a client sends.
CANONICAL = {"0.5": "500m", "1.5Gi": "1536Mi", "1000m": "1", "1024Mi": "1Gi", "0.5Gi": "512Mi", "1500": "1500",
             "2000000": "2M", "100": "100", "1e3": "1e3", "0.1m": "100u", "1.5": "1500m", "64Gi": "64Gi", "8": "8",
             "0": "0", "1Ki": "1Ki", "1023Ki": "1023Ki", "100m": "100m"}


@pytest.mark.parametrize("sent", CANONICAL)
def test_quantities_in_the_servers_form(sent: str) -> None:
    assert canonical_quantity(sent) == CANONICAL[sent]  # the operator's (through the kubernetes client's parser)
    assert admission.canonical_quantity(sent) == CANONICAL[sent]  # the emulation's, written apart


def deployment(namespace: str, **pod: Any) -> dict[str, Any]:
    container = {"name": "engine", "image": "serve:1", "resources": quantities({"requests": {"cpu": "0.5"},
                                                                                 "limits": {"memory": "1.5Gi"}})}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "arm", "namespace": namespace, "labels": {"app": "arm"}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "arm"}},
                     "template": {"metadata": {"labels": {"app": "arm"}},
                                  "spec": {"containers": [container], **pod}}}}


def writes(kubeapi: KubeAPIServer, since: float) -> list[dict[str, Any]]:
    return [e for e in kubeapi.requests() if e["ts"] >= since and e["method"] in ("POST", "PATCH", "PUT")
            and e["user_agent"].startswith("quantrol-operator") and e["resource"] == "deployments"]


@pytest.mark.stack
def test_a_quantity_as_written_reaches_a_steady_state_with_zero_writes(kubeapi: KubeAPIServer, kubeconfig: Path,
                                                                        namespace: str) -> None:
    import time

    kube = Kube.from_kubeconfig(str(kubeconfig))
    began = time.time()
    assert kube.apply(deployment(namespace)) == "created"
    stored = kube.get("apps/v1", "Deployment", namespace, "arm")
    assert stored is not None
    assert stored["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    assert [kube.apply(deployment(namespace)) for _ in range(3)] == ["unchanged"] * 3
    assert len(writes(kubeapi, began)) == 1


@pytest.mark.stack
def test_a_field_removed_from_the_desired_child_disappears(kubeconfig: Path, namespace: str) -> None:
    kube = Kube.from_kubeconfig(str(kubeconfig))
    kube.apply(deployment(namespace, nodeSelector={"gpu": "h100"}))
    assert kube.apply(deployment(namespace)) == "patched"
    stored = kube.get("apps/v1", "Deployment", namespace, "arm")
    assert stored is not None and "nodeSelector" not in stored["spec"]["template"]["spec"]
    assert kube.apply(deployment(namespace)) == "unchanged"


@pytest.mark.stack
def test_a_container_a_webhook_added_is_left_alone(kubeconfig: Path, namespace: str) -> None:
    kube = Kube.from_kubeconfig(str(kubeconfig))
    kube.apply(deployment(namespace))
    stored = kube.get("apps/v1", "Deployment", namespace, "arm")
    assert stored is not None
    sidecar = {"name": "mesh-proxy", "image": "proxy:1"}  # what a mutating webhook would add
    containers = [*stored["spec"]["template"]["spec"]["containers"], sidecar]
    kube.patch("apps/v1", "Deployment", namespace, "arm",
               {"spec": {"template": {"spec": {"containers": containers}}}})
    assert kube.apply(deployment(namespace)) == "unchanged"
    changed = copy.deepcopy(deployment(namespace))
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = "serve:2"
    assert kube.apply(changed) == "patched"
    stored = kube.get("apps/v1", "Deployment", namespace, "arm")
    assert stored is not None
    assert [(c["name"], c["image"]) for c in stored["spec"]["template"]["spec"]["containers"]] == [
        ("engine", "serve:2"), ("mesh-proxy", "proxy:1")]
