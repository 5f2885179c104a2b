"""Smoke tests proving the emulated Kubernetes API (KMock + apishims) is real enough for kopf and kubectl.

Each test that depends on a gap of the emulation says how it plays the missing part; the gaps themselves are
listed in tests/README.md. Objects go into a fresh namespace per test (the `namespace` fixture).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from quantrol_dev.localstack.kubeapi import KOPF_USER_AGENT, KubeAPIServer, OperatorProcess, kopf_watches
from quantrol_dev.localstack.procs import port_is_open, wait_until
from tests.plugins.kubeapi import Kubectl

pytestmark = pytest.mark.stack

GROUP, VERSION = "quantrol.io", "v1alpha1"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"

# A test-only kind with a schema these tests control: the real CRDs evolve with the models.
WIDGETS_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.quantrol.io"},
    "spec": {
        "group": "test.quantrol.io",
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "shortNames": ["wg"]},
        "versions": [
            {
                "name": "v1",
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
                                    "size": {"type": "integer"},
                                    "tags": {
                                        "type": "array",
                                        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
                                    },
                                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                    "notes": {"type": "object", "additionalProperties": {"type": "string"}},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {"phase": {"type": "string"}, "observedGeneration": {"type": "integer"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


def call(
    kubeapi: KubeAPIServer, method: str, path: str, body: Any = None, content_type: str = "application/json"
) -> tuple[int, Any, list[str]]:
    """One raw HTTP request: (status, decoded JSON body, Warning headers)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        kubeapi.url + path, data=data, method=method, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read() or b"null"), rsp.headers.get_all("Warning") or []
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null"), []


def watch(kubeapi: KubeAPIServer, path: str, **params: str) -> list[dict[str, Any]]:
    """A bounded watch: the server ends it after timeoutSeconds (1 s unless given)."""
    query = urllib.parse.urlencode({"watch": "true", "timeoutSeconds": "1", **params})
    with urllib.request.urlopen(f"{kubeapi.url}{path}?{query}", timeout=15) as rsp:
        return [json.loads(line) for line in rsp.read().splitlines() if line.strip()]


def widgets(namespace: str, name: str = "", sub: str = "") -> str:
    return "/".join(p for p in (f"/apis/test.quantrol.io/v1/namespaces/{namespace}/widgets", name, sub) if p)


@pytest.fixture(scope="module")
def widget_crd(kubeapi: KubeAPIServer) -> dict[str, Any]:
    """Registered through the API (POST), as `kubectl apply -f crd.yaml` would."""
    code, crd, _ = call(kubeapi, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGETS_CRD)
    assert code in (201, 409), crd
    return WIDGETS_CRD


def make_widget(
    kubeapi: KubeAPIServer, namespace: str, name: str, spec: dict[str, Any] | None = None, **meta: Any
) -> dict[str, Any]:
    body = {
        "apiVersion": "test.quantrol.io/v1",
        "kind": "Widget",
        "metadata": {"name": name, **meta},
        "spec": spec or {"size": 1},
    }
    code, obj, _ = call(kubeapi, "POST", widgets(namespace), body)
    assert code == 201, obj
    return obj  # type: ignore[no-any-return]


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


# --- discovery and namespaces ---------------------------------------------------------------------------------


def test_discovery_serves_both_quantrol_kinds_and_the_core_group(kubeapi: KubeAPIServer) -> None:
    _, apis, _ = call(kubeapi, "GET", "/apis")
    assert {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION} in next(
        g["versions"] for g in apis["groups"] if g["name"] == GROUP
    )
    _, listing, _ = call(kubeapi, "GET", f"/apis/{GROUP}/{VERSION}")
    by_name = {r["name"]: r for r in listing["resources"]}
    assert by_name["quantizedmodels"]["kind"] == "QuantizedModel"
    assert by_name["quantizedmodels"]["namespaced"] is True
    assert "qm" in by_name["quantizedmodels"]["shortNames"]
    assert by_name["servingpolicies"]["kind"] == "ServingPolicy"
    assert {"quantizedmodels/status", "servingpolicies/status"} <= set(by_name)
    _, core, _ = call(kubeapi, "GET", "/api/v1")
    assert core["groupVersion"] == "v1"  # KMock says "/v1", which kubectl cannot map; the shim fixes it


def test_namespaces_are_listed_required_and_cascade(kubeapi: KubeAPIServer, widget_crd: Any) -> None:
    code, listed, _ = call(kubeapi, "GET", "/api/v1/namespaces")  # crashes KMock's path parser unshimmed
    assert code == 200 and listed["kind"] == "NamespaceList"
    assert "default" in {ns["metadata"]["name"] for ns in listed["items"]}
    code, err, _ = call(kubeapi, "POST", widgets("no-such-ns"), {"metadata": {"name": "w"}, "spec": {}})
    assert (code, err["reason"]) == (404, "NotFound")
    call(kubeapi, "POST", "/api/v1/namespaces", {"metadata": {"name": "doomed"}})
    make_widget(kubeapi, "doomed", "w1")
    assert call(kubeapi, "DELETE", "/api/v1/namespaces/doomed")[0] == 200
    # The namespace controller's part (deleting what the namespace held) is done at once by the shim.
    assert call(kubeapi, "GET", widgets("doomed", "w1"))[0] == 404


# --- objects through the kubernetes client: create, get, list, watch ---------------------------------------


def test_custom_object_create_get_list_watch(kube_client: kubernetes.client.ApiClient, namespace: str) -> None:
    api = kubernetes.client.CustomObjectsApi(kube_client)
    args = (GROUP, VERSION, namespace, "quantizedmodels")
    start = api.list_namespaced_custom_object(*args)["metadata"]["resourceVersion"]
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "QuantizedModel", "metadata": {"name": "qm1"}, "spec": {}}
    created = api.create_namespaced_custom_object(*args, body)
    meta = created["metadata"]
    assert meta["namespace"] == namespace  # from the URL: the body named none
    assert meta["uid"] and meta["generation"] == 1 and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) > int(start)
    assert api.get_namespaced_custom_object(*args, "qm1") == created
    listed = api.list_namespaced_custom_object(*args)
    assert (listed["kind"], listed["apiVersion"]) == ("QuantizedModelList", f"{GROUP}/{VERSION}")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["qm1"]

    patched = api.patch_namespaced_custom_object(*args, "qm1", {"metadata": {"labels": {"tier": "gold"}}})
    # A live watch sees a change made while it is open; it also replays what happened since `start`.
    relabel = threading.Timer(
        0.5, api.patch_namespaced_custom_object, args=(*args, "qm1", {"metadata": {"labels": {"tier": "silver"}}})
    )
    relabel.start()
    try:
        stream = kubernetes.watch.Watch().stream(
            api.list_namespaced_custom_object, *args, resource_version=start, timeout_seconds=2
        )
        seen = [(e["type"], e["object"]["metadata"].get("labels", {}).get("tier")) for e in stream]
    finally:
        relabel.cancel()
        relabel.join()
    assert seen == [("ADDED", None), ("MODIFIED", "gold"), ("MODIFIED", "silver")]

    api.delete_namespaced_custom_object(*args, "qm1")
    events = list(
        kubernetes.watch.Watch().stream(
            api.list_namespaced_custom_object,
            *args,
            resource_version=patched["metadata"]["resourceVersion"],
            timeout_seconds=1,
        )
    )
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    with pytest.raises(kubernetes.client.ApiException) as err:
        api.get_namespaced_custom_object(*args, "qm1")
    assert err.value.status == 404


def test_generate_name_and_increasing_resource_versions(kubeapi: KubeAPIServer, namespace: str) -> None:
    # kopf posts its Events with metadata.generateName.
    versions = []
    for _ in range(3):
        code, event, _ = call(
            kubeapi,
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            {"metadata": {"generateName": "kopf-event-"}, "reason": "Test", "message": "m"},
        )
        assert code == 201 and event["metadata"]["name"].startswith("kopf-event-")
        assert len(event["metadata"]["name"]) == len("kopf-event-") + 5
        versions.append(rv(event))
    assert versions == sorted(versions) and len(set(versions)) == 3


# --- honesty: pruning, status subresource, generation, finalizers, concurrency -------------------------------


def test_unknown_fields_are_pruned_as_the_schema_says(kubeapi: KubeAPIServer, widget_crd: Any, namespace: str) -> None:
    spec = {
        "size": 3,
        "color": "red",
        "tags": [{"name": "a", "extra": 1}],
        "free": {"anything": {"goes": True}},
        "notes": {"x": "y"},
    }
    code, obj, warnings = call(kubeapi, "POST", widgets(namespace), {"metadata": {"name": "w1"}, "spec": spec})
    assert code == 201
    assert obj["spec"] == {
        "size": 3,
        "tags": [{"name": "a"}],
        "free": {"anything": {"goes": True}},
        "notes": {"x": "y"},
    }
    assert sorted(warnings) == [
        '299 - "unknown field \\"spec.color\\""',
        '299 - "unknown field \\"spec.tags[0].extra\\""',
    ]
    assert call(kubeapi, "GET", widgets(namespace, "w1"))[1]["spec"] == obj["spec"]
    code, _, _ = call(kubeapi, "PATCH", widgets(namespace, "w1"), {"spec": {"shape": "round"}}, MERGE)
    assert code == 200 and "shape" not in call(kubeapi, "GET", widgets(namespace, "w1"))[1]["spec"]
    code, err, _ = call(
        kubeapi,
        "POST",
        widgets(namespace) + "?fieldValidation=Strict",
        {"metadata": {"name": "w2"}, "spec": {"color": "red"}},
    )
    assert code == 400 and "spec.color" in err["message"]
    assert call(kubeapi, "GET", widgets(namespace, "w2"))[0] == 404


def test_status_changes_only_through_the_status_subresource(
    kubeapi: KubeAPIServer, widget_crd: Any, namespace: str
) -> None:
    created = make_widget(kubeapi, namespace, "w1", status={"phase": "Forged"})
    assert "status" not in created  # create ignores status when status is a subresource
    _, obj, _ = call(kubeapi, "PATCH", widgets(namespace, "w1"), {"spec": {"size": 2}, "status": {"phase": "X"}}, MERGE)
    assert obj["spec"]["size"] == 2 and "status" not in obj
    _, obj, _ = call(
        kubeapi,
        "PATCH",
        widgets(namespace, "w1", "status"),
        {"spec": {"size": 9}, "status": {"phase": "Ready", "bogus": 1}},
        MERGE,
    )
    assert obj["status"] == {"phase": "Ready"} and obj["spec"]["size"] == 2
    _, obj, _ = call(kubeapi, "PATCH", widgets(namespace, "w1"), {"status": None}, MERGE)
    assert obj["status"] == {"phase": "Ready"}  # the main endpoint cannot delete it either


def test_generation_moves_only_on_spec_changes_and_no_op_writes_are_free(
    kubeapi: KubeAPIServer, widget_crd: Any, namespace: str
) -> None:
    w = make_widget(kubeapi, namespace, "w1", spec={"size": 1})
    assert w["metadata"]["generation"] == 1
    _, w2, _ = call(kubeapi, "PATCH", widgets(namespace, "w1"), {"metadata": {"labels": {"a": "b"}}}, MERGE)
    _, w3, _ = call(kubeapi, "PATCH", widgets(namespace, "w1", "status"), {"status": {"phase": "Ready"}}, MERGE)
    assert w3["metadata"]["generation"] == w2["metadata"]["generation"] == 1 and rv(w) < rv(w2) < rv(w3)
    _, w4, _ = call(kubeapi, "PATCH", widgets(namespace, "w1"), {"spec": {"size": 2}}, MERGE)
    assert w4["metadata"]["generation"] == 2
    for path, patch in (
        (widgets(namespace, "w1"), {"spec": {"size": 2}}),
        (widgets(namespace, "w1", "status"), {"status": {"phase": "Ready"}}),
    ):
        code, same, _ = call(kubeapi, "PATCH", path, patch, MERGE)
        assert code == 200 and rv(same) == rv(w4)  # as on a real server: no new version, no event
    assert watch(kubeapi, widgets(namespace), resourceVersion=str(rv(w4))) == []


def test_finalizers_hold_deletion_until_removed(kubeapi: KubeAPIServer, widget_crd: Any, namespace: str) -> None:
    w = make_widget(kubeapi, namespace, "w1", finalizers=["quantrol.io/finalizer"])
    code, deleting, _ = call(kubeapi, "DELETE", widgets(namespace, "w1"))
    assert code == 200 and deleting["metadata"]["deletionTimestamp"]
    assert call(kubeapi, "GET", widgets(namespace, "w1"))[0] == 200
    code, err, _ = call(
        kubeapi,
        "PATCH",
        widgets(namespace, "w1"),
        {"metadata": {"finalizers": ["quantrol.io/finalizer", "other/x"]}},
        MERGE,
    )
    assert (code, err["reason"]) == (422, "Invalid") and "no new finalizers" in err["message"]
    # kopf's way: a JSON patch guarded by a `test` on resourceVersion.
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": deleting["metadata"]["resourceVersion"]},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]
    assert call(kubeapi, "PATCH", widgets(namespace, "w1"), ops, JSON_PATCH)[0] == 200
    assert call(kubeapi, "GET", widgets(namespace, "w1"))[0] == 404
    events = watch(kubeapi, widgets(namespace), resourceVersion=str(rv(w)))
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]


def test_stale_writes_conflict(kubeapi: KubeAPIServer, widget_crd: Any, namespace: str) -> None:
    w = make_widget(kubeapi, namespace, "w1")
    _, w2, _ = call(kubeapi, "PATCH", widgets(namespace, "w1"), {"spec": {"size": 5}}, MERGE)
    stale = w["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": stale},
        {"op": "replace", "path": "/spec/size", "value": 6},
    ]
    assert call(kubeapi, "PATCH", widgets(namespace, "w1"), ops, JSON_PATCH)[0] == 422  # kopf expects 422
    merge = {"metadata": {"resourceVersion": stale}, "spec": {"size": 7}}
    assert call(kubeapi, "PATCH", widgets(namespace, "w1"), merge, MERGE)[0] == 409
    replacement = {**copy.deepcopy(w2), "spec": {"size": 8}}
    del replacement["metadata"]["resourceVersion"]
    assert call(kubeapi, "PUT", widgets(namespace, "w1"), replacement)[0] == 422  # PUT needs a resourceVersion
    replacement["metadata"]["resourceVersion"] = w2["metadata"]["resourceVersion"]
    code, replaced, _ = call(kubeapi, "PUT", widgets(namespace, "w1"), replacement)
    assert code == 200 and replaced["spec"] == {"size": 8} and replaced["metadata"]["generation"] == 3
    assert call(kubeapi, "PATCH", widgets(namespace, "w1"), [], "application/apply-patch+yaml")[0] == 415


def test_label_and_field_selectors_filter_lists_and_watches(
    kubeapi: KubeAPIServer, widget_crd: Any, namespace: str
) -> None:
    first = make_widget(kubeapi, namespace, "gold", labels={"tier": "gold"})
    make_widget(kubeapi, namespace, "silver", labels={"tier": "silver"})
    make_widget(kubeapi, namespace, "plain")

    def names(query: str) -> list[str]:
        _, listed, _ = call(kubeapi, "GET", widgets(namespace) + "?" + query)
        return [item["metadata"]["name"] for item in listed["items"]]

    assert names("labelSelector=tier%3Dgold") == ["gold"]
    assert names("labelSelector=tier+in+(gold,silver)") == ["gold", "silver"]
    assert names("labelSelector=!tier") == ["plain"]
    assert names("labelSelector=tier!%3Dgold") == ["plain", "silver"]
    assert names("fieldSelector=metadata.name%3Dsilver") == ["silver"]
    # Relabelled out of the selector: a selector watch sees it DELETED, as from a real server.
    call(kubeapi, "PATCH", widgets(namespace, "gold"), {"metadata": {"labels": {"tier": "bronze"}}}, MERGE)
    events = watch(kubeapi, widgets(namespace), resourceVersion=str(rv(first)), labelSelector="tier=gold")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("DELETED", "gold")]


def test_request_log_records_verbs_resources_and_codes(kubeapi: KubeAPIServer, widget_crd: Any, namespace: str) -> None:
    since = time.time()
    make_widget(kubeapi, namespace, "w1")
    call(kubeapi, "GET", widgets(namespace, "w1"))
    call(kubeapi, "GET", widgets(namespace))
    call(kubeapi, "PATCH", widgets(namespace, "w1", "status"), {"status": {"phase": "Ready"}}, MERGE)
    call(kubeapi, "DELETE", widgets(namespace, "w1"))
    call(kubeapi, "GET", widgets(namespace, "w1"))
    entries = [e for e in kubeapi.requests(since=since) if e["namespace"] == namespace]
    assert [(e["verb"], e["resource"], e["status"]) for e in entries] == [
        ("create", "widgets", 201),
        ("get", "widgets", 200),
        ("list", "widgets", 200),
        ("patch", "widgets/status", 200),
        ("delete", "widgets", 200),
        ("get", "widgets", 404),
    ]
    assert {e["group"] for e in entries} == {"test.quantrol.io"}
    assert len(kubeapi.writes(since=since)) >= 3


# --- kubectl ----------------------------------------------------------------------------------------------------


def test_kubectl_apply_get_patch_wait_delete(kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    manifest = tmp_path / "qm.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "QuantizedModel",
                "metadata": {"name": "qm1", "namespace": namespace},
                "spec": {},
            }
        )
    )
    # --validate=false: the emulation serves no OpenAPI document for client-side validation.
    assert "created" in kubectl("apply", "--validate=false", "-f", str(manifest)).stdout
    assert "unchanged" in kubectl("apply", "--validate=false", "-f", str(manifest)).stdout
    got = json.loads(kubectl("-n", namespace, "get", "qm", "qm1", "-o", "json").stdout)
    assert got["metadata"]["namespace"] == namespace and got["metadata"]["uid"]
    kubectl("-n", namespace, "patch", "qm", "qm1", "--type", "merge", "-p", '{"metadata":{"labels":{"a":"b"}}}')
    # The test plays the operator's part here: it writes status as a controller would, through /status.
    kubectl(
        "-n",
        namespace,
        "patch",
        "qm",
        "qm1",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        '{"status":{"phase":"Ready"}}',
    )
    kubectl("-n", namespace, "wait", "--for=jsonpath={.status.phase}=Ready", "qm/qm1", "--timeout=20s")
    assert kubectl("-n", namespace, "get", "qm", "-l", "a=b", "-o", "name").stdout.strip() == (
        "quantizedmodel.quantrol.io/qm1"
    )
    assert "deleted" in kubectl("-n", namespace, "delete", "qm", "qm1", "--timeout=20s").stdout
    kubectl("-n", namespace, "wait", "--for=delete", "qm/qm1", "--timeout=5s")
    assert "No resources found" in kubectl("-n", namespace, "get", "qm").stderr


# --- the operator process ---------------------------------------------------------------------------------------


def _observed_generation(api: kubernetes.client.CustomObjectsApi, namespace: str, plural: str, name: str) -> object:
    obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    return (obj.get("status") or {}).get("observedGeneration")


def test_operator_watches_both_kinds_sees_objects_and_then_stays_quiet(
    operator_process: OperatorProcess,
    kube_client: kubernetes.client.ApiClient,
    kubeapi: KubeAPIServer,
    namespace: str,
) -> None:
    print(f"operator ready {operator_process.started_in:.2f}s after its process started")
    assert operator_process.logged("watching QuantizedModel and ServingPolicy in all namespaces")
    api = kubernetes.client.CustomObjectsApi(kube_client)
    kinds = (("quantizedmodels", "QuantizedModel", "qm1"), ("servingpolicies", "ServingPolicy", "sp1"))
    for plural, kind, name in kinds:
        api.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            plural,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": {}},
        )
        # Seen means reconciled: the operator wrote the object's status (an empty spec is reported as invalid).
        wait_until(lambda p=plural, n=name: _observed_generation(api, namespace, p, n) == 1, timeout=30, interval=0.2,
                   what=f"{kind} {namespace}/{name} reconciled")
    # Steady state: once it has handled both objects, the operator makes no writes at all.
    time.sleep(1.0)
    quiet_from = time.time()
    time.sleep(3.0)
    assert kubeapi.writes(since=quiet_from, user_agent_prefix=KOPF_USER_AGENT) == []


def test_operator_resumes_existing_objects_and_teardown_leaves_nothing(tmp_path: Path, crds_dir: Path) -> None:
    # A private API server: this test stops it and checks that nothing is left behind.
    server = KubeAPIServer(workdir=tmp_path / "kubeapi", crds_dir=crds_dir).start()
    operator = OperatorProcess(kubeconfig=server.write_kubeconfig(), workdir=tmp_path / "operator")
    try:
        call(
            server,
            "POST",
            f"/apis/{GROUP}/{VERSION}/namespaces/default/quantizedmodels",
            {"metadata": {"name": "old"}, "spec": {}},
        )
        began = time.time()
        operator.start(ready=lambda: kopf_watches(server, began, ("quantizedmodels", "servingpolicies")))
        # Found by the initial list (a resume), and reconciled: its status is written.
        path = f"/apis/{GROUP}/{VERSION}/namespaces/default/quantizedmodels/old"
        wait_until(lambda: (call(server, "GET", path)[1].get("status") or {}).get("observedGeneration") == 1,
                   timeout=30, interval=0.2, what="QuantizedModel default/old reconciled")
        pids = [p.pid for p in (server.process, operator.process) if p is not None]
    finally:
        operator.stop()
        server.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # neither the process nor anything in its group survives
    assert not port_is_open(server.port)
