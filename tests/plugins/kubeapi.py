"""Fixtures for the Kubernetes API emulation (KMock + apishims) and the operator process.

- `kubeapi` (session): the emulated API server on a free 127.0.0.1 port with the CRDs from `crds/`
  (or minimal stand-ins until the generated files exist), its request log at `kubeapi.request_log`;
- `kubeconfig` (session): a kubeconfig pointing at it;
- `kube_client`: a kubernetes-client ApiClient for it; `namespace`: a fresh namespace, deleted afterwards;
- `operator_process`: the real `quantrol-operator --standalone --all-namespaces` (`kopf run`) against it, started
  once it logs that it watches both kinds and has opened both watch streams;
- `kubectl`: runs /usr/bin/kubectl against it (skips loudly when kubectl is missing).

What the emulation does and does not do: tests/README.md.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from quantrol_dev.localstack.kubeapi import KubeAPIServer, OperatorProcess, kopf_watches

REPO = Path(__file__).resolve().parents[2]
REPO_CRDS = REPO / "crds"
CRD_FILES = ("quantizedmodels.quantrol.io.yaml", "servingpolicies.quantrol.io.yaml")

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def _minimal_crd(kind: str, plural: str, short: str) -> dict[str, Any]:
    """A stand-in CRD used only while crds/ has not been generated yet: status subresource, a small schema."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.quantrol.io"},
        "spec": {
            "group": "quantrol.io",
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["quantrol"],
            },
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "baseModel": {"type": "object", "properties": {"uri": {"type": "string"}}}
                                    },
                                },
                                "status": {
                                    "type": "object",
                                    "properties": {
                                        "phase": {"type": "string"},
                                        "observedGeneration": {"type": "integer"},
                                    },
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="session")
def crds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if all((REPO_CRDS / name).exists() for name in CRD_FILES):
        return REPO_CRDS
    stand_in = tmp_path_factory.mktemp("crds")
    kinds = (("QuantizedModel", "quantizedmodels", "qm"), ("ServingPolicy", "servingpolicies", "sp"))
    for kind, plural, short in kinds:
        (stand_in / f"{plural}.quantrol.io.yaml").write_text(yaml.safe_dump(_minimal_crd(kind, plural, short)))
    return stand_in


@pytest.fixture(scope="session")
def kubeapi(tmp_path_factory: pytest.TempPathFactory, crds_dir: Path) -> Iterator[KubeAPIServer]:
    server = KubeAPIServer(workdir=tmp_path_factory.mktemp("kubeapi"), crds_dir=crds_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kubeconfig(kubeapi: KubeAPIServer) -> Path:
    return kubeapi.write_kubeconfig()


@pytest.fixture
def kube_client(kubeconfig: Path) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield client
    finally:
        client.close()


_namespace_counter = itertools.count(1)


RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}


@pytest.fixture
def restricted_namespace(kube_client: kubernetes.client.ApiClient) -> Iterator[str]:
    """A fresh namespace that enforces Pod Security `restricted`, as a hardened cluster's tenant namespaces do."""
    name = f"r{next(_namespace_counter)}-{int(time.time() * 1000) % 100000}"
    core = kubernetes.client.CoreV1Api(kube_client)
    core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture
def namespace(kube_client: kubernetes.client.ApiClient) -> Iterator[str]:
    """A fresh namespace; deleting it at the end deletes what the test left in it (see tests/README.md)."""
    name = f"t{next(_namespace_counter)}-{int(time.time() * 1000) % 100000}"
    core = kubernetes.client.CoreV1Api(kube_client)
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture
def operator_process(kubeapi: KubeAPIServer, kubeconfig: Path, tmp_path: Path) -> Iterator[OperatorProcess]:
    began = time.time()
    operator = OperatorProcess(kubeconfig=kubeconfig, workdir=tmp_path / "operator")
    try:
        operator.start(ready=lambda: kopf_watches(kubeapi, began, ("quantizedmodels", "servingpolicies")))
        yield operator
    finally:
        operator.stop()


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("KUBECTL MISSING: kubectl is not on PATH, so the kubectl tests did NOT run")

    def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # A private discovery cache: kubectl's default one (~/.kube/cache) would outlive the port.
        argv = [binary, "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp_path / "kubectl-cache"), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, input=stdin, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    return run
