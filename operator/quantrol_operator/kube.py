"""The one Kubernetes API client of the operator, the `quantrol` CLI and the demo (besides kopf itself).

Children are found by owner reference (label selectors only narrow the list), created when missing,
merge-patched only on the fields Quantrol owns and only when those differ (a three-way merge against the record of
what it last applied, so removed fields go and others' additions stay), so a steady-state pass makes zero writes.
Status goes through the /status subresource as a JSON merge patch of what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from quantrol_operator.api.kinds import KINDS
from quantrol_operator.children import monitoring

# (apiVersion, kind) → plural. Only the kinds Quantrol manages or reads (the demo adds the claim its model lies on).
_KINDS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Secret"): "secrets",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Namespace"): "namespaces",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "customresourcedefinitions",
    **{(k.api_version, k.kind): k.plural for k in KINDS},
    (monitoring.API_VERSION, monitoring.KIND): "podmonitors",  # the Prometheus Operator's, when it is installed
}
_CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition"}
# Fields a controller may not change after creation; Quantrol makes a new object instead.
_IMMUTABLE_SPEC_KINDS = {"Job", "Pod"}
# Created once, never rewritten: a Secret's generated token must not change under the pods that read it.
_CREATE_ONLY_KINDS = {"Secret"}


def _group_version_path(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def _collection(api_version: str, kind: str, namespace: str | None) -> str:
    """The collection's path: namespaced kinds in `namespace`, or across all namespaces when it is None."""
    plural = _KINDS[(api_version, kind)]
    if kind in _CLUSTER_SCOPED or namespace is None:
        return f"{_group_version_path(api_version)}/{plural}"
    return f"{_group_version_path(api_version)}/namespaces/{namespace}/{plural}"


# The owned part of each child as Quantrol last wrote it: what a later pass removes when the desired object no longer
# names it (kubectl's client-side apply keeps the same record in kubectl.kubernetes.io/last-applied-configuration).
LAST_APPLIED = "quantrol.io/last-applied"


def _item_key(item: Any) -> Any:
    """Lists of objects with a `uid` (ownerReferences) or a `name` (containers, env, ports, volumes) merge by it."""
    if isinstance(item, dict):
        return ("uid", item["uid"]) if "uid" in item else ("name", item["name"]) if "name" in item else None
    return None


def three_way(live: Any, last: Any, desired: Any) -> Any:
    """What the object becomes when Quantrol applies `desired`, given what it `last` applied and what is `live`.

    Maps: desired keys are set (recursively), keys Quantrol applied before and no longer wants are removed, every
    other live key (server defaults, another controller's or a webhook's) is kept. Lists of named objects merge by
    name: an item someone else added (a sidecar container) stays. Any other value or list is Quantrol's, whole.
    """
    if isinstance(desired, dict):
        out = dict(live) if isinstance(live, dict) else {}
        before = last if isinstance(last, dict) else {}
        for key in before.keys() - desired.keys():
            out.pop(key, None)
        for key, value in desired.items():
            out[key] = three_way(out.get(key), before.get(key), value)
        return out
    keys = [_item_key(item) for item in desired] if isinstance(desired, list) else []
    if not keys or None in keys or not isinstance(live, list):
        return desired
    live_items = {_item_key(item): item for item in live}
    last_items = {_item_key(item): item for item in last} if isinstance(last, list) else {}
    merged = [three_way(live_items.get(k), last_items.get(k), item) for k, item in zip(keys, desired, strict=True)]
    foreign = [item for item in live if _item_key(item) not in keys and _item_key(item) not in last_items]
    return merged + foreign


def owned(desired: dict[str, Any]) -> dict[str, Any]:
    """The part of a child Quantrol owns: its labels, annotations and owner references, and everything outside
    metadata (only the metadata for kinds whose spec is immutable)."""
    meta = desired["metadata"]
    owned_meta = {k: v for k, v in meta.items() if k in ("labels", "annotations", "ownerReferences")}
    if desired["kind"] in _IMMUTABLE_SPEC_KINDS:
        owned_meta.pop("annotations", None)
        return {"metadata": owned_meta}
    body = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "status", "metadata")}
    return {"metadata": owned_meta, **body}


def with_record(owned_part: dict[str, Any]) -> dict[str, Any]:
    """`owned_part` with its own record in the LAST_APPLIED annotation."""
    record = json.dumps(owned_part, sort_keys=True, separators=(",", ":"))
    meta = owned_part["metadata"]
    annotations = {**(meta.get("annotations") or {}), LAST_APPLIED: record}
    return {**owned_part, "metadata": {**meta, "annotations": annotations}}


def last_applied(actual: dict[str, Any]) -> dict[str, Any] | None:
    text = ((actual.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        found = json.loads(text) if text else None
    except ValueError:
        return None  # edited by hand into something else: apply as if for the first time
    return found if isinstance(found, dict) else None


def merge_patch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch turning `before` into `after` (None deletes a key; lists are replaced)."""
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            sub = merge_patch(old, value)
            if sub:
                patch[key] = sub
        elif value != old:
            patch[key] = value
    return patch


def status_digest(status: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(status, sort_keys=True, default=str).encode()).hexdigest()


USER_AGENT = "quantrol-operator"  # audit logs (and the tests' request log) tell the operator's calls apart


@dataclass
class Kube:
    api: client.ApiClient
    namespace: str = "default"  # the kubeconfig context's namespace (the CLI's default)
    # uid -> digests of the statuses our last few status patches were computed from (handlers.common.superseded)
    status_written_from: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.api.user_agent = USER_AGENT

    @classmethod
    def from_environment(cls) -> Kube:
        """In a pod: the service account. Elsewhere: the kubeconfig named by $KUBECONFIG (read now, not at import)."""
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            return cls(client.ApiClient())
        return cls.from_kubeconfig(None)

    @classmethod
    def from_kubeconfig(cls, path: str | None, context: str | None = None) -> Kube:
        """The kubeconfig at `path` (default: $KUBECONFIG, read now, or ~/.kube/config), in `context` (default: its
        current one)."""
        path = path or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        api = config.new_client_from_config(config_file=path, context=context)  # type: ignore[no-untyped-call]
        contexts, current = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
        chosen = context or (current or {}).get("name")
        entry: dict[str, Any] = next((c for c in contexts or [] if c.get("name") == chosen), {}) or {}
        return cls(api, namespace=str((entry.get("context") or {}).get("namespace") or "default"))

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def _call(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self.api.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.api.call_api(*request)
        raw = response.read()  # type: ignore[no-untyped-call]
        if response.status >= 400:  # call_api itself does not raise; the generated methods do it afterwards
            raise ApiException(status=response.status, reason=response.reason, body=raw.decode(errors="replace"))
        return json.loads(raw) if raw else None

    def serves(self, api_version: str, kind: str) -> bool:
        """Whether the API server serves `kind` in `api_version`, from discovery (which every authenticated client
        may read: no RBAC rule needed). An API group nobody installed answers 404."""
        try:
            found = self._call("GET", _group_version_path(api_version))
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        plural = _KINDS[(api_version, kind)]
        return any(r.get("name") == plural for r in (found or {}).get("resources", []))

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._call("GET", f"{_collection(api_version, kind, namespace)}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        """Objects of `kind` in `namespace` (None: in every namespace), narrowed by a label selector."""
        query = [("labelSelector", label_selector)] if label_selector else []
        found = self._call("GET", _collection(api_version, kind, namespace), query=query)
        return list(found.get("items", []))

    def list_owned(self, api_version: str, kind: str, namespace: str, owner_uid: str,
                   label_selector: str = "") -> list[dict[str, Any]]:
        """Objects whose ownerReferences name `owner_uid`; labels only narrow what the server sends."""
        return [
            item for item in self.list_objects(api_version, kind, namespace, label_selector)
            if any(ref.get("uid") == owner_uid for ref in item.get("metadata", {}).get("ownerReferences", []))
        ]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj` (409 AlreadyExists raises like any other refusal)."""
        meta = obj["metadata"]
        created: dict[str, Any] = self._call("POST", _collection(obj["apiVersion"], obj["kind"],
                                                                 meta.get("namespace")), body=obj)
        return created

    def read_text(self, path: str, query: list[tuple[str, str]] | None = None) -> str:
        """A plain-text subresource (a pod's log, a Service proxy answer): GET `path` as text."""
        headers = {"Accept": "*/*"}
        request = self.api.param_serialize("GET", path, query_params=query or [], header_params=headers,
                                           auth_settings=["BearerToken"])
        response = self.api.call_api(*request)
        raw = response.read()  # type: ignore[no-untyped-call]
        if response.status >= 400:
            raise ApiException(status=response.status, reason=response.reason, body=raw.decode(errors="replace"))
        return str(raw.decode(errors="replace"))

    def apply(self, desired: dict[str, Any]) -> str:
        """Create `desired`, or bring what Quantrol owns of it to `desired` (three_way: fields it no longer names
        are removed, what others added stays), with one merge patch, only when something differs; returns
        created / patched / unchanged. The desired object is in the server's canonical form (quantities), so a
        steady state compares equal and makes no write."""
        meta = desired["metadata"]
        collection = _collection(desired["apiVersion"], desired["kind"], meta["namespace"])
        mine = owned(desired)
        actual = self.get(desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"])
        if actual is None:
            body = {**desired, "metadata": {**meta, **with_record(mine)["metadata"]}}
            try:
                self._call("POST", collection, body=body)
            except ApiException as exc:
                if exc.status != 409:  # a concurrent pass created it a moment ago
                    raise
                return "unchanged"
            return "created"
        if desired["kind"] in _CREATE_ONLY_KINDS:
            return "unchanged"
        target = three_way(actual, last_applied(actual), with_record(mine))
        patch = merge_patch({k: actual.get(k) for k in target}, target)
        if not patch:
            return "unchanged"
        # Only on the version this was computed from: a concurrent change is a 409, and the next pass recomputes.
        patch.setdefault("metadata", {})["resourceVersion"] = actual["metadata"]["resourceVersion"]
        self._call("PATCH", f"{collection}/{meta['name']}", body=patch, content_type="application/merge-patch+json")
        return "patched"

    def delete(self, ref: dict[str, Any]) -> None:
        path = f"{_collection(ref['apiVersion'], ref['kind'], ref['namespace'])}/{ref['name']}"
        try:
            self._call("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        path = f"{_collection(api_version, kind, namespace)}/{name}"
        self._call("PATCH", path, body=patch, content_type="application/merge-patch+json")

    def patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> bool:
        """Merge-patch what changed in `status`; no request at all when nothing did."""
        patch = merge_patch(obj.get("status") or {}, status)
        if not patch:
            return False
        meta = obj["metadata"]
        path = f"{_collection(obj['apiVersion'], obj['kind'], meta['namespace'])}/{meta['name']}/status"
        self._call("PATCH", path, body={"status": patch}, content_type="application/merge-patch+json")
        if meta.get("uid"):
            recent = self.status_written_from.setdefault(str(meta["uid"]), [])
            recent.append(status_digest(obj.get("status") or {}))
            del recent[:-8]
        return True
