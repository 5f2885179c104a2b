"""Shims that make KMock 0.8 behave enough like a Kubernetes API server for kopf 1.45 and kubectl.

KMock's `KubernetesEmulator` keeps objects as plain dicts merged by each PATCH. That is not enough to run kopf
and kubectl (namespaces cannot be listed, metadata is never filled, lists have no `kind`, CRDs do not register
resources), and it is too lenient: an operator that writes unknown fields, writes `status` through the main
endpoint or churns `generation` would pass here and misbehave on a cluster. This module keeps KMock's HTTP
server, request parsing, discovery endpoints and resource registry, and replaces the stateful part with the
rules a real API server applies, where they are cheap to mirror:

- metadata: uid, increasing resourceVersion, creationTimestamp, generation, namespace from the URL,
  generateName; `kind`/`apiVersion` on objects and lists; namespaces must exist before objects go into them;
- CustomResourceDefinitions (POSTed or preloaded) register their resources for discovery; deleting one
  deletes its objects; the structural schema prunes undeclared fields (x-kubernetes-preserve-unknown-fields
  respected); with a status subresource only `/status` changes `.status` and `/status` changes nothing else;
- `metadata.generation` moves only when something outside metadata and status changes; a no-op write makes
  no new resourceVersion and no watch event;
- merge patch (RFC 7386), JSON patch (with `test`, which kopf uses for optimistic concurrency), PUT,
  resourceVersion preconditions, finalizers holding deletion, deletecollection, dryRun;
- watches resume from a resourceVersion, re-type events for label/field selectors, honour timeoutSeconds
  and sendInitialEvents; label selectors and field selectors (any dotted path) filter lists and watches;
- a request log (JSON lines) for counting writes and collecting RBAC (verb, resource) pairs.

- validation and Pod Security admission of the kinds Quantrol creates (admission.py), quantities stored in canonical
  form, and the checks OwnerReferencesPermissionEnforcement makes, logged as implied requests.

What stays missing (no garbage collection, no CRD validation beyond pruning, no defaulting, no authorizer,
no controllers, no server-side apply, no Tables) is listed in tests/README.md.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import aiobus, parsing, rendering  # parsing: no hook for the path parser; see _parse_path
from multidict import CIMultiDict

from quantrol_dev.localstack import admission

JSON = dict[str, Any]
ObjectKey = tuple[kmock.resource, str | None, str]
Selector = Callable[[JSON], bool]

NAMESPACES: Final = kmock.resource("", "v1", "namespaces")
CRDS: Final = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
DEFAULT_NAMESPACES: Final = ("default", "kube-system", "kube-public", "kube-node-lease")
CUSTOM_RESOURCE_VERBS: Final = frozenset(
    {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
)
# Metadata the server owns: a client's value for these is ignored on every write.
SERVER_METADATA: Final = (
    "uid",
    "name",
    "namespace",
    "creationTimestamp",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's: no vowels, no look-alikes
_WARNING: Final = "warning:"  # marks a ready-made Warning text among the pruned paths a write returns
_SHUTDOWN: Final = object()  # put on every bus to end open watch streams before the server stops


# --- KMock's path parser -------------------------------------------------------------------------------------

_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """KMock reads `/api/v1/namespaces[/NAME]` as a namespace prefix with nothing after it, and crashes."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        return parsing.ParsedPath(
            group="",
            version="v1",
            plural="namespaces",
            name=parts[3] if len(parts) > 3 else None,
            subresource=parts[4] if len(parts) > 4 else None,
        )
    return _kmock_parse_path(path)


def install_path_parser_fix() -> None:
    # rendering.Request._parse looks the parser up on the module at every request, so this is enough.
    parsing.parse_path = _parse_path


# --- errors in the Kubernetes Status shape -------------------------------------------------------------------


def api_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    # Always pass details: KMock puts a Python traceback there otherwise.
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {"causes": []})


def not_found(what: str, name: str = "") -> kmock.KubernetesError:
    message = f'{what} "{name}" not found' if name else "the server could not find the requested resource"
    return api_error(404, "NotFound", message, name=name)


# --- pure helpers --------------------------------------------------------------------------------------------


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386. KMock's own merge refuses to replace a dict by a scalar, which a real server does."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strip_strategic_directives(patch: Any) -> Any:
    """Drop `$patch`, `$setElementOrder/…`, `$retainKeys` so a strategic patch can be applied as a merge patch."""
    if isinstance(patch, dict):
        return {k: strip_strategic_directives(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [strip_strategic_directives(v) for v in patch]
    return patch


def prune(value: Any, schema: Mapping[str, Any], path: str, pruned: list[str]) -> Any:
    """Structural pruning: drop object fields the schema does not declare, recording their paths."""
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            return [prune(item, items, f"{path}[{i}]", pruned) for i, item in enumerate(value)]
        return value
    if not isinstance(value, dict):
        return value
    properties: Mapping[str, Any] = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or extra is True
    embedded = bool(schema.get("x-kubernetes-embedded-resource"))
    result: JSON = {}
    for key, item in value.items():
        subpath = f"{path}.{key}" if path else key
        sub = properties.get(key, extra if isinstance(extra, Mapping) else None)
        if embedded and key in ("apiVersion", "kind", "metadata"):
            result[key] = item  # an embedded object's envelope is ObjectMeta, never pruned by the schema
        elif isinstance(sub, Mapping):
            result[key] = prune(item, sub, subpath, pruned)
        elif keep_unknown:
            result[key] = item
        else:
            pruned.append(subpath)
    return result


def prune_object(obj: JSON, schema: Mapping[str, Any]) -> tuple[JSON, list[str]]:
    """Prune a whole custom object: its envelope (apiVersion, kind, metadata) is the server's, not the schema's."""
    pruned: list[str] = []
    envelope = {k: obj[k] for k in ("apiVersion", "kind", "metadata") if k in obj}
    body = prune({k: v for k, v in obj.items() if k not in envelope}, schema, "", pruned)
    return {**envelope, **body}, pruned


def _content(obj: Mapping[str, Any], *, status_is_subresource: bool) -> JSON:
    # What a custom resource's generation tracks: everything but metadata (and status, if it is a subresource).
    ignored = ("metadata", "status") if status_is_subresource else ("metadata",)
    return {k: v for k, v in obj.items() if k not in ignored}


_LABEL_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)
_FIELD_REQUIREMENT = re.compile(r"^\s*(?P<path>[A-Za-z0-9_.]+)\s*(?P<op>==|!=|=)\s*(?P<value>[^,]*?)\s*$")


def parse_label_selector(text: str) -> Selector:
    """Equality- and set-based label selectors, as `kubectl -l` and client libraries send them."""
    checks: list[Selector] = []
    for part in re.split(r",(?![^()]*\))", text):
        if not part.strip():
            continue
        m = _LABEL_REQUIREMENT.match(part)
        if m is None or (m["neg"] and (m["op"] or m["setop"])):
            raise api_error(400, "BadRequest", f"unable to parse requirement: {part!r}")
        key, op, negated = m["key"], m["op"] or m["setop"], bool(m["neg"])
        values = frozenset(v.strip() for v in (m["values"] or m["value"] or "").split(",") if v.strip())
        checks.append(_label_check(key, op, values, negated))
    return lambda obj: all(check(obj) for check in checks)


def _label_check(key: str, op: str | None, values: frozenset[str], negated: bool) -> Selector:
    def check(obj: JSON) -> bool:
        labels: Mapping[str, str] = (obj.get("metadata") or {}).get("labels") or {}
        if op is None:
            return (key in labels) != negated
        if op in ("=", "==", "in"):
            return labels.get(key) in (values or {""})
        return labels.get(key) not in (values or {""})  # != and notin also match objects without the label

    return check


def parse_field_selector(text: str) -> Selector:
    """Field selectors on any dotted path (a real server allows only a per-resource set of paths)."""
    checks: list[Selector] = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = _FIELD_REQUIREMENT.match(part)
        if m is None:
            raise api_error(400, "BadRequest", f"invalid field selector: {part!r}")
        checks.append(_field_check(m["path"].split("."), m["op"] == "!=", m["value"]))
    return lambda obj: all(check(obj) for check in checks)


def _field_check(path: list[str], negated: bool, expected: str) -> Selector:
    def check(obj: JSON) -> bool:
        value: Any = obj
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        return (text == expected) != negated

    return check


def parse_selectors(params: Mapping[str, str]) -> Selector:
    label = parse_label_selector(params.get("labelSelector", ""))
    field = parse_field_selector(params.get("fieldSelector", ""))
    return lambda obj: label(obj) and field(obj)


def api_version_of(res: kmock.resource) -> str:
    return f"{res.group}/{res.version}" if res.group else str(res.version)


def rbac_verb(method: str, name: str | None, params: Mapping[str, str]) -> str:
    if method == "GET":
        return "watch" if params.get("watch") in ("true", "1") else "get" if name else "list"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method, method.lower())


def _header(headers: Mapping[str, str], name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), "")


@dataclass(frozen=True)
class StoredEvent:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: JSON
    old: JSON | None  # the state before, so that selector watches can turn MODIFIED into ADDED/DELETED


@dataclass(frozen=True)
class WatchScope:
    namespace: str | None
    name: str | None
    selector: Selector

    def sees(self, obj: JSON | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and (self.name is None or meta.get("name") == self.name)
            and self.selector(obj)
        )

    def present(self, event: StoredEvent) -> JSON | None:
        """The event as this watcher sees it, or None: an object leaving the selector is DELETED to it."""
        now, before = self.sees(event.obj), self.sees(event.old)
        if event.type == "MODIFIED":
            kind = "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else None
        else:
            kind = event.type if now or before else None
        return None if kind is None else {"type": kind, "object": event.obj}


def read_crds(directory: Path) -> list[JSON]:
    """The CustomResourceDefinitions in the YAML/JSON files of a directory (multi-document files allowed)."""
    crds: list[JSON] = []
    for path in sorted(directory.iterdir()):
        if path.suffix in (".yaml", ".yml", ".json"):
            crds.extend(
                doc
                for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"
            )
    return crds


# --- the emulator --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class KubeAPIEmulator(kmock.KubernetesEmulator):
    """KMock's Kubernetes emulator with the stateful rules of a real API server (see the module docstring)."""

    request_log: Path | None = None
    history_limit: int = 20_000  # watch events kept per resource; older resourceVersions get 410 Gone

    _store: dict[ObjectKey, JSON] = attrs.field(factory=dict, init=False)
    _history: dict[kmock.resource, list[StoredEvent]] = attrs.field(factory=lambda: defaultdict(list), init=False)
    _trimmed_rv: dict[kmock.resource, int] = attrs.field(factory=dict, init=False)
    _schemas: dict[kmock.resource, JSON] = attrs.field(factory=dict, init=False)
    _crd_resources: dict[str, set[kmock.resource]] = attrs.field(factory=dict, init=False)
    _streamed: set[int] = attrs.field(factory=set, init=False)
    _implied: dict[int, list[JSON]] = attrs.field(factory=dict, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _rv: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        install_path_parser_fix()
        self.resources.load_bundled()  # built-in kinds (K3s discovery data shipped with KMock)

    # -- start-up ----------------------------------------------------------------------------------------------

    async def bootstrap(self, crds: list[JSON]) -> list[str]:
        """Create the namespaces every cluster has, then the given CRDs; return the CRD names."""
        names: list[str] = []
        async with self._lock:
            for ns in DEFAULT_NAMESPACES:
                if (NAMESPACES, None, ns) not in self._store:
                    await self._create(NAMESPACES, None, {"metadata": {"name": ns}}, dry_run=False)
            for crd in crds:
                created, _ = await self._create(CRDS, None, crd, dry_run=False)
                names.append(created["metadata"]["name"])
        return names

    async def close_streams(self) -> None:
        """End every open watch stream (and refuse new ones), so the HTTP server stops without waiting for clients."""
        self._closing = True
        for bus in list(self._buses.values()):
            await bus.put(_SHUTDOWN)

    async def _serve_version(self, request: kmock.Request) -> rendering.Payload:
        """Fix two discovery slips kubectl trips on: the core group as "/v1" (kubectl then knows no core kind),
        and subresources with their parent's short names and categories (kubectl calls `qm` ambiguous)."""
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and str(payload.get("groupVersion", "")).startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]
        for entry in payload.get("resources", []) if isinstance(payload, dict) else []:
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], singularName="", verbs=["get", "patch", "update"])
        return payload

    # -- request entry: log, then dispatch ---------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # A watch is logged when it starts streaming (in _watch), not when it ends.
        try:
            response = await self._dispatch(request)
        except kmock.KubernetesError as exc:
            if request.id not in self._streamed:
                self._log(request, exc.status)
            raise
        except Exception:
            if request.id not in self._streamed:
                self._log(request, 500)
            raise
        else:
            if request.id not in self._streamed:
                self._log(request, response.status)
                for check in self._implied.get(request.id, []) if response.status < 400 else []:
                    self._log(request, response.status, implied=check)
            return response
        finally:
            self._streamed.discard(request.id)
            self._implied.pop(request.id, None)

    def _owner_reference_checks(self, res: kmock.resource, old: JSON | None, new: JSON) -> list[JSON]:
        """The authorization checks OwnerReferencesPermissionEnforcement makes on this write, which this emulation
        (having no authorizer) records in the request log instead: changing an object's ownerReferences needs
        `delete` on it (not on create), and a new `blockOwnerDeletion: true` needs `update` on the owner's
        `finalizers` subresource. https://kubernetes.io/docs/reference/access-authn-authz/admission-controllers/
        #ownerreferencespermissionenforcement"""
        refs = (new.get("metadata") or {}).get("ownerReferences") or []
        before = ((old or {}).get("metadata") or {}).get("ownerReferences") or []
        if refs == before:
            return []
        checks: list[JSON] = []
        if old is not None:
            checks.append({"verb": "delete", "group": res.group, "resource": res.plural})
        blocking_before = {r.get("uid") for r in before if r.get("blockOwnerDeletion")}
        for ref in refs:
            if not ref.get("blockOwnerDeletion") or ref.get("uid") in blocking_before:
                continue
            group, _, _version = str(ref.get("apiVersion", "")).rpartition("/")
            plural = next((r.plural for r, info in self.resources.items()
                           if isinstance(r, kmock.resource) and isinstance(info, kmock.ResourceInfo)
                           and r.group == group and info.kind == ref.get("kind") and r.plural), None)
            if plural is not None:
                checks.append({"verb": "update", "group": group, "resource": f"{plural}/finalizers"})
        return checks

    def _log(self, request: kmock.Request, status: int, implied: JSON | None = None) -> None:
        if self.request_log is None:
            return
        res = request.resource
        is_resource = res is not None and res.plural is not None
        method = str(request.method.value)
        entry = {
            "ts": round(time.time(), 3),
            "method": method,
            "path": request.url.path,
            "query": request.url.query_string,
            # Non-resource URLs (discovery) are authorized with the HTTP verb in RBAC, e.g. `get`.
            "verb": rbac_verb(method, request.name, request.params) if is_resource else method.lower(),
            "group": res.group if res is not None and is_resource else None,
            "version": res.version if res is not None and is_resource else None,
            "resource": (
                (f"{res.plural}/{request.subresource}" if request.subresource else res.plural)
                if res is not None and is_resource
                else None
            ),
            "namespace": request.namespace,
            "name": request.name,
            "status": status,
            "user_agent": _header(request.headers, "User-Agent"),
        }
        if implied is not None:  # an authorization check the request implies (see _owner_reference_checks)
            entry.update(implied, implied_by="OwnerReferencesPermissionEnforcement")
        with self.request_log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    async def _dispatch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        method = str(request.method.value)
        if res is None or res.plural is None:
            if method != "GET":
                raise api_error(405, "MethodNotAllowed", f"{method} is not supported on {request.url.path}")
            return await super()._handle(request)  # discovery: /api, /apis, /version, /apis/GROUP[/VERSION]
        info = self._info(res)
        if request.subresource not in (None, "status") or (
            request.subresource == "status" and "status" not in info.subresources
        ):
            raise not_found(f"{res.plural}/{request.subresource}")
        if bool(info.namespaced) != (request.namespace is not None) and (request.name or method == "POST"):
            raise not_found(res.plural or "")
        if method == "GET" and request.params.get("watch") in ("true", "1"):
            return await self._watch(request, res)
        params = request.params
        dry_run, strict = params.get("dryRun") == "All", params.get("fieldValidation") == "Strict"
        async with self._lock:
            if method == "GET" and request.name:
                return aiohttp.web.json_response(self._get(res, request.namespace, request.name))
            if method == "GET":
                return aiohttp.web.json_response(self._list(res, request.namespace, parse_selectors(params)))
            if method == "POST":
                obj, pruned = await self._create(
                    res, request.namespace, self._body(request), dry_run=dry_run, strict=strict
                )
                self._implied[request.id] = self._owner_reference_checks(res, None, obj)
                return self._written(obj, pruned, status=201)
            if method in ("PATCH", "PUT") and request.name:
                before = self._store.get((res, request.namespace, str(request.name)))
                obj, pruned = await self._update(request, res, dry_run=dry_run, strict=strict)
                self._implied[request.id] = self._owner_reference_checks(res, before, obj)
                return self._written(obj, pruned, status=200)
            if method == "DELETE" and request.name:
                options = self._body(request) if request.body.strip() else {}
                obj = await self._delete(res, request.namespace, request.name, options, dry_run=dry_run)
                return aiohttp.web.json_response(obj)
            if method == "DELETE":
                return aiohttp.web.json_response(await self._delete_collection(request, res, dry_run=dry_run))
        raise api_error(405, "MethodNotAllowed", f"{method} is not supported on {request.url.path}")

    def _info(self, res: kmock.resource) -> kmock.ResourceInfo:
        if res not in self.resources:
            raise not_found("")
        return self.resources[res]

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        ctype = _header(request.headers, "Content-Type").split(";")[0].strip().lower()
        if "protobuf" in ctype or "yaml" in ctype:
            # kubectl's generators (`kubectl create namespace X`) send protobuf; server-side apply sends YAML.
            # Neither is emulated: say so plainly instead of failing to parse JSON.
            raise api_error(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format "
                f"({ctype}) - the emulation accepts application/json bodies and JSON/merge patches "
                "(no protobuf, no server-side apply)",
            )
        try:
            return json.loads(request.body or b"null")
        except ValueError as exc:
            raise api_error(400, "BadRequest", f"the request body is not JSON: {exc}") from exc

    @staticmethod
    def _written(obj: JSON, pruned: list[str], *, status: int) -> aiohttp.web.Response:
        headers: CIMultiDict[str] = CIMultiDict()
        for path in pruned:  # what a real server says (fieldValidation=Warn, its default) about pruned fields
            text = path.removeprefix(_WARNING) if path.startswith(_WARNING) else f'unknown field \\"{path}\\"'
            headers.add("Warning", f'299 - "{text}"')
        return aiohttp.web.json_response(obj, status=status, headers=headers)

    # -- reads -------------------------------------------------------------------------------------------------

    def _get(self, res: kmock.resource, namespace: str | None, name: str) -> JSON:
        obj = self._store.get((res, namespace, name))
        if obj is None:
            raise not_found(f"{res.plural}.{res.group}" if res.group else str(res.plural), name)
        return obj

    def _list(self, res: kmock.resource, namespace: str | None, selector: Selector) -> JSON:
        items = [
            obj
            for (r, ns, _), obj in sorted(self._store.items(), key=lambda kv: (kv[0][1] or "", kv[0][2]))
            if r == res and (namespace is None or ns == namespace) and selector(obj)
        ]
        return {
            "apiVersion": api_version_of(res),
            "kind": f"{self.resources[res].kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    async def _watch(self, request: kmock.Request, res: kmock.resource) -> aiohttp.web.StreamResponse:
        if self._closing:
            raise api_error(503, "ServiceUnavailable", "the API server is shutting down")
        params = request.params
        scope = WatchScope(request.namespace, request.name, parse_selectors(params))
        since = params.get("resourceVersion", "")
        initial = params.get("sendInitialEvents") == "true"
        try:
            server_timeout = float(params["timeoutSeconds"]) if "timeoutSeconds" in params else None
            since_rv = int(since) if since not in ("", "0") and not initial else None
        except ValueError as exc:
            raise api_error(400, "BadRequest", f"invalid watch parameter: {exc}") from exc
        async with self._lock:
            if since_rv is None:  # "most recent": synthetic ADDED events for what exists now
                replay: list[JSON] = [
                    {"type": "ADDED", "object": obj}
                    for obj in self._list(res, request.namespace, scope.selector)["items"]
                    if scope.sees(obj)
                ]
                if initial:
                    replay.append(self._initial_events_end(res))
            elif since_rv < self._trimmed_rv.get(res, 0):
                replay = [
                    {
                        "type": "ERROR",
                        "object": {
                            "apiVersion": "v1",
                            "kind": "Status",
                            "metadata": {},
                            "status": "Failure",
                            "code": 410,
                            "reason": "Expired",
                            "message": f"too old resource version: {since_rv}",
                        },
                    }
                ]
            else:
                replay = [
                    shown
                    for event in self._history[res]
                    if event.rv > since_rv
                    for shown in [scope.present(event)]
                    if shown is not None
                ]
            bus = self._buses[res]
            mark = await bus.mark()  # under the lock: no event falls between the replay and the live stream
        self._log(request, 200)
        self._streamed.add(request.id)
        gone = bool(replay) and replay[0]["type"] == "ERROR"
        stream = self._stream(bus, mark, replay, scope, server_timeout, gone)
        return await rendering.Response(payload=stream, headers={"Content-Type": "application/json"})(request)

    async def _stream(
        self,
        bus: aiobus.Bus[Any],
        mark: aiobus.BusMark[Any],
        replay: list[JSON],
        scope: WatchScope,
        server_timeout: float | None,
        gone: bool,
    ) -> AsyncIterator[bytes | JSON]:
        yield b""  # send the headers now: clients wait for them before they consider the watch open
        live = cast(AsyncGenerator[Any, None], bus.stream(since=mark))  # an async generator, typed loosely
        try:
            for item in replay:
                yield item
            if gone:
                return
            loop = asyncio.get_running_loop()
            deadline = None if server_timeout is None else loop.time() + server_timeout
            while deadline is None or loop.time() < deadline:
                remaining = None if deadline is None else deadline - loop.time()
                try:
                    event = await asyncio.wait_for(anext(live), remaining)
                except TimeoutError:
                    return  # timeoutSeconds: the server ends the watch, the client re-watches
                if event is _SHUTDOWN:
                    return
                shown = scope.present(event)
                if shown is not None:
                    yield shown
        finally:
            await live.aclose()
            await bus.unmark(mark)

    def _initial_events_end(self, res: kmock.resource) -> JSON:
        return {
            "type": "BOOKMARK",
            "object": {
                "apiVersion": api_version_of(res),
                "kind": self.resources[res].kind,
                "metadata": {"resourceVersion": str(self._rv), "annotations": {"k8s.io/initial-events-end": "true"}},
            },
        }

    # -- writes (the caller holds self._lock) -----------------------------------------------------------------

    async def _commit(self, res: kmock.resource, key: ObjectKey, obj: JSON, kind: str, old: JSON | None) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if kind == "DELETED":
            self._store.pop(key, None)
        else:
            self._store[key] = obj
        history = self._history[res]
        history.append(StoredEvent(self._rv, kind, obj, old))
        if len(history) > self.history_limit:
            dropped = history[: len(history) - self.history_limit]
            del history[: len(dropped)]
            self._trimmed_rv[res] = dropped[-1].rv
        await self._buses[res].put(StoredEvent(self._rv, kind, obj, old))

    def _admit(self, res: kmock.resource, obj: JSON, *, creating: bool) -> list[str]:
        """Validation and Pod Security admission (admission.py) for the object about to be stored: raises the
        refusal a cluster gives (422 Invalid, 403 Forbidden), returns its warnings (each `_WARNING`-prefixed)."""
        if res in (NAMESPACES, CRDS):
            return []
        meta = obj.get("metadata") or {}
        kind, name = str(obj.get("kind")), str(meta.get("name"))
        if res in self._schemas:  # a custom resource: object meta only (its schema is the CRD's, applied above)
            problems = admission.name_problems(kind, name) + admission.meta_problems(meta)
        else:
            problems = admission.kind_problems(admission.normalize(obj))
        if problems:
            raise api_error(422, "Invalid", f'{kind} "{name}" is invalid: ' + "; ".join(problems), name=name,
                            kind=kind)
        pod_spec = admission.pod_spec_of(obj)
        if pod_spec is None or res in self._schemas:
            return []
        labels = (self._store.get((NAMESPACES, None, str(meta.get("namespace")))) or {}).get("metadata", {}).get(
            "labels") or {}
        warnings = []
        enforce, warn = labels.get(admission.ENFORCE_LABEL), labels.get(admission.WARN_LABEL)
        if enforce in admission.LEVELS and kind == "Pod" and creating:  # enforce refuses pods, never templates
            found = admission.violations(enforce, pod_spec)
            if found:
                raise api_error(403, "Forbidden", f'pods "{name}" is forbidden: '
                                + admission.pod_security_message(enforce, found), name=name, kind="pods")
        if warn in admission.LEVELS:
            found = admission.violations(warn, pod_spec)
            if found:
                warnings.append(_WARNING + "would " + admission.pod_security_message(warn, found).replace(
                    "violates", "violate", 1).replace('"', "'"))
        return warnings

    def _prune(self, res: kmock.resource, obj: JSON, *, strict: bool) -> tuple[JSON, list[str]]:
        schema = self._schemas.get(res)
        obj, pruned = prune_object(obj, schema) if schema else (obj, [])
        if pruned and strict:  # fieldValidation=Strict (kubectl --validate=strict) rejects instead of pruning
            raise api_error(400, "BadRequest", f'strict decoding error: unknown field "{pruned[0]}"')
        return obj, pruned

    async def _create(
        self, res: kmock.resource, namespace: str | None, body: Any, *, dry_run: bool, strict: bool = False
    ) -> tuple[JSON, list[str]]:
        info = self._info(res)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise api_error(400, "BadRequest", "the request body must be an object with object metadata")
        obj = copy.deepcopy(body)
        meta: JSON = obj.setdefault("metadata", {})
        if info.namespaced:
            if meta.get("namespace") not in (None, namespace):
                raise api_error(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            if (NAMESPACES, None, namespace) not in self._store:
                raise not_found("namespaces", namespace or "")
        name = meta.get("name") or (
            meta["generateName"] + "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
            if meta.get("generateName")
            else None
        )
        pattern = _DNS_LABEL if res == NAMESPACES else _DNS_SUBDOMAIN
        if not isinstance(name, str) or len(name) > 253 or not pattern.match(name):
            raise api_error(
                422,
                "Invalid",
                f"metadata.name: Invalid value: {name!r}: must be a lowercase "
                "RFC 1123 name (or use metadata.generateName)",
                name=str(name),
            )
        key: ObjectKey = (res, namespace if info.namespaced else None, name)
        if key in self._store:
            raise api_error(
                409,
                "AlreadyExists",
                f'{res.plural}.{res.group} "{name}" already exists'
                if res.group
                else f'{res.plural} "{name}" already exists',
                name=name,
            )
        for field in (*SERVER_METADATA, "managedFields", "selfLink"):
            meta.pop(field, None)
        meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if info.namespaced:
            meta["namespace"] = namespace
        envelope = {"apiVersion": api_version_of(res), "kind": info.kind}
        obj = {**envelope, **{k: v for k, v in obj.items() if k not in envelope}}
        if "status" in info.subresources:
            obj.pop("status", None)  # with a status subresource, create ignores status (the API server does)
        obj, pruned = self._prune(res, obj, strict=strict)
        pruned += self._admit(res, obj, creating=True)
        if res == CRDS:
            obj["status"] = self._crd_status(obj)  # what the apiextensions controllers would write at once
        if res == NAMESPACES:
            obj["status"] = {"phase": "Active"}  # the namespace registry sets it on create
        if not dry_run:
            await self._commit(res, key, obj, "ADDED", None)
            if res == CRDS:
                self._register_crd(obj)
        return obj, pruned

    async def _update(
        self, request: kmock.Request, res: kmock.resource, *, dry_run: bool, strict: bool
    ) -> tuple[JSON, list[str]]:
        info = self._info(res)
        key: ObjectKey = (res, request.namespace, str(request.name))
        old = self._get(res, request.namespace, str(request.name))
        body = self._body(request)
        candidate = self._apply(request, res, old, body)
        precondition = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if str(request.method.value) == "PUT" and precondition is None and res in self._schemas:
            raise api_error(
                422, "Invalid", "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
            )
        if precondition is not None and str(precondition) != old["metadata"]["resourceVersion"]:
            raise api_error(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {res.plural}.{res.group} "
                f'"{request.name}": the object has been modified; please apply your changes to '
                "the latest version and try again",
                name=str(request.name),
            )
        if not isinstance(candidate, dict):
            raise api_error(422, "Invalid", "the patched object is not an object")
        new = self._scope_update(info, request.subresource, old, candidate)
        new, pruned = self._prune(res, new, strict=strict)
        if request.subresource is None:
            pruned += self._admit(res, new, creating=False)
        subresource_status = "status" in info.subresources
        changed = _content(new, status_is_subresource=subresource_status) != _content(
            old, status_is_subresource=subresource_status
        )
        if changed and request.subresource is None:
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1
        if new == old or dry_run:
            return (old if new == old else new), pruned  # a no-op write: no resourceVersion, no event
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await self._remove(res, key, new, old)
        else:
            await self._commit(res, key, new, "MODIFIED", old)
            if res == CRDS:
                self._register_crd(new)
        return new, pruned

    def _apply(self, request: kmock.Request, res: kmock.resource, old: JSON, body: Any) -> Any:
        if str(request.method.value) == "PUT":
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != request.name:
                raise api_error(400, "BadRequest", "the name of the object does not match the name on the URL")
            return copy.deepcopy(body)
        ctype = _header(request.headers, "Content-Type").split(";")[0].strip().lower()
        if ctype == "application/json-patch+json":
            try:
                return jsonpatch.apply_patch(copy.deepcopy(old), body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
                # 422 is what kopf expects when its `test` op on resourceVersion fails.
                raise api_error(422, "Invalid", f"the JSON patch could not be applied: {exc}") from exc
        if ctype == "application/strategic-merge-patch+json" and res not in self._schemas:
            # Lists are replaced, not merged by key: a documented gap for built-in kinds.
            return merge_patch(copy.deepcopy(old), strip_strategic_directives(body))
        if ctype == "application/merge-patch+json":
            return merge_patch(copy.deepcopy(old), body)
        raise api_error(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format "
            f"({ctype or 'no content type'}); accepted media types include: "
            "application/json-patch+json, application/merge-patch+json "
            "(server-side apply is not emulated)",
        )

    @staticmethod
    def _scope_update(info: kmock.ResourceInfo, subresource: str | None, old: JSON, candidate: JSON) -> JSON:
        """Keep what the endpoint may not change: `/status` changes only status, the main endpoint never status."""
        if subresource == "status":
            new = copy.deepcopy(old)
            if candidate.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = candidate["status"]
            return new
        new = candidate
        if "status" in info.subresources:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        if not isinstance(new.get("metadata"), dict):
            new["metadata"] = {}
        meta, old_meta = new["metadata"], old["metadata"]
        for field in SERVER_METADATA:
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
        if old_meta.get("deletionTimestamp") and added:
            raise api_error(
                422,
                "Invalid",
                f"metadata.finalizers: Forbidden: no new finalizers can be added "
                f"if the object is being deleted, found new finalizers {sorted(added)}",
            )
        return new

    async def _delete(
        self, res: kmock.resource, namespace: str | None, name: str, options: Any, *, dry_run: bool
    ) -> JSON:
        key: ObjectKey = (res, namespace, name)
        old = self._get(res, namespace, name)
        preconditions = (options.get("preconditions") if isinstance(options, dict) else None) or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) is not None and preconditions[field] != old["metadata"].get(field):
                raise api_error(
                    409,
                    "Conflict",
                    f"Precondition failed: {field} in precondition: "
                    f"{preconditions[field]}, {field} in object meta: {old['metadata'].get(field)}",
                )
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old  # already being deleted: the finalizers' owners decide when it goes
            new = copy.deepcopy(old)
            new["metadata"].update(deletionTimestamp=now_rfc3339(), deletionGracePeriodSeconds=0)
            if not dry_run:
                await self._commit(res, key, new, "MODIFIED", old)
            return new
        new = copy.deepcopy(old)
        if not dry_run:
            await self._remove(res, key, new, old)
        return new

    async def _remove(self, res: kmock.resource, key: ObjectKey, obj: JSON, old: JSON) -> None:
        await self._commit(res, key, obj, "DELETED", old)
        if res == NAMESPACES:  # the namespace controller's part, done at once: delete what the namespace held
            for held in [k for k in self._store if k[1] == key[2] and self.resources[k[0]].namespaced]:
                await self._delete(*held, {}, dry_run=False)
        if res == CRDS:  # the API server deletes a CRD's objects before the CRD itself
            gone = self._crd_resources.pop(obj["metadata"]["name"], set())
            for child_key, child in [(k, v) for k, v in self._store.items() if k[0] in gone]:
                await self._commit(child_key[0], child_key, copy.deepcopy(child), "DELETED", child)
            for child_res in gone:
                self.resources.pop(child_res, None)
                self._schemas.pop(child_res, None)

    async def _delete_collection(self, request: kmock.Request, res: kmock.resource, *, dry_run: bool) -> JSON:
        listed = self._list(res, request.namespace, parse_selectors(request.params))
        deleted = [
            await self._delete(res, obj["metadata"].get("namespace"), obj["metadata"]["name"], {}, dry_run=dry_run)
            for obj in listed["items"]
        ]
        return {**listed, "items": deleted}

    # -- CustomResourceDefinitions ------------------------------------------------------------------------------

    @staticmethod
    def _crd_status(crd: JSON) -> JSON:
        spec = crd.get("spec") or {}
        names, versions = spec.get("names") or {}, spec.get("versions") or []
        problems = [
            text
            for text, bad in [
                ("spec.group is required", not spec.get("group")),
                (
                    "spec.names.plural and spec.names.kind are required",
                    not names.get("plural") or not names.get("kind"),
                ),
                ("spec.scope must be Namespaced or Cluster", spec.get("scope") not in ("Namespaced", "Cluster")),
                ("exactly one version must have storage: true", sum(bool(v.get("storage")) for v in versions) != 1),
                (
                    'metadata.name must be spec.names.plural + "." + spec.group',
                    crd["metadata"].get("name") != f"{names.get('plural')}.{spec.get('group')}",
                ),
            ]
            if bad
        ]
        if problems:
            raise api_error(422, "Invalid", f"CustomResourceDefinition is invalid: {'; '.join(problems)}")
        now = now_rfc3339()
        return {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in versions if v.get("storage")],
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                    "lastTransitionTime": now,
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                    "lastTransitionTime": now,
                },
            ],
        }

    def _register_crd(self, crd: JSON) -> None:
        """Make the CRD's served versions discoverable (kopf and kubectl find resources through /apis)."""
        spec, names = crd["spec"], crd["spec"]["names"]
        registered: set[kmock.resource] = set()
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            res = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[res] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec["scope"] == "Namespaced",
                verbs=CUSTOM_RESOURCE_VERBS,
                shortnames=names.get("shortNames") or [],
                categories=names.get("categories") or [],
                subresources={sub for sub in ("status", "scale") if sub in (version.get("subresources") or {})},
            )
            # An empty schema still prunes everything but the envelope, as a structural schema would.
            self._schemas[res] = (version.get("schema") or {}).get("openAPIV3Schema") or {"type": "object"}
            registered.add(res)
        for stale in self._crd_resources.get(crd["metadata"]["name"], set()) - registered:
            self.resources.pop(stale, None)
            self._schemas.pop(stale, None)
        self._crd_resources[crd["metadata"]["name"]] = registered
