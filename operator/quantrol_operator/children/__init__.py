"""Desired-state builders, one module per child kind: plain dicts in, plain manifests out."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kubernetes.utils.quantity import parse_quantity

from quantrol_operator.api.common import LocalObjectReference, Toleration

MANAGED_BY = {"app.kubernetes.io/managed-by": "quantrol", "app.kubernetes.io/part-of": "quantrol"}
# Quantrol's images run as this user (worker/Dockerfile, worker/serve.Dockerfile); a tenant's image whose default user
# is root runs as it too, because Pod Security `restricted` refuses root and cannot see an image's USER.
POD_USER = 65532
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value(text: str) -> str:
    """`text` as a label value: itself when it is one (<= 63 characters, alphanumeric at both ends), else a prefix
    and a hash of the whole, so two long names never share a value. Kubernetes' rule:
    https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set"""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    prefix = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[:52].strip("-_.")
    return f"{prefix}-{digest}" if prefix else digest


def restricted(pod_spec: dict[str, Any], *, api_access: bool = False) -> dict[str, Any]:
    """`pod_spec` made to pass Pod Security `restricted` (https://kubernetes.io/docs/concepts/security/
    pod-security-standards/#restricted): non-root with an explicit user (runAsNonRoot, runAsUser), seccomp
    RuntimeDefault, and in every container no privilege escalation and every capability dropped. No pod Quantrol
    creates talks to the Kubernetes API, so none mounts a ServiceAccount token unless `api_access`."""
    container_context = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    out = {
        **pod_spec,
        "securityContext": {"runAsNonRoot": True, "runAsUser": POD_USER, "runAsGroup": POD_USER,
                            "fsGroup": POD_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": api_access,
    }
    for key in ("initContainers", "containers"):
        if key in out:
            out[key] = [{**c, "securityContext": dict(container_context)} for c in out[key]]
    return out


class Placement(Protocol):
    """Where a pod may run and how its images are pulled: the calibration Job's and the serving template's fields."""

    @property
    def node_selector(self) -> Mapping[str, str]: ...
    @property
    def tolerations(self) -> Sequence[Toleration]: ...
    @property
    def affinity(self) -> Mapping[str, Any] | None: ...
    @property
    def image_pull_secrets(self) -> Sequence[LocalObjectReference]: ...


def placed(pod_spec: dict[str, Any], placement: Placement) -> dict[str, Any]:
    """`pod_spec` with the placement the spec sets (each field only when set, so an unset one never shows as an empty
    value that a re-read would compare unequal to)."""
    if placement.node_selector:
        pod_spec["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in placement.tolerations]
    if placement.affinity:
        pod_spec["affinity"] = dict(placement.affinity)
    if placement.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [s.to_wire() for s in placement.image_pull_secrets]
    return pod_spec


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """The controller reference that lets a cluster's garbage collector remove a child with its owner."""
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_name(owner_name: str, suffix: str, limit: int = 63) -> str:
    """`<owner>-<suffix>`, shortened with a stable hash when a DNS label would overflow."""
    name = f"{owner_name}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{owner_name[: limit - len(suffix) - 10].rstrip('-')}-{digest}-{suffix}"


_DECIMAL_SUFFIXES = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E"}
_BINARY_SUFFIXES = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]


def canonical_quantity(value: int | float | str) -> str:
    """A resource quantity in the form the API server stores it (apimachinery's `Quantity.String()`), so that a
    re-read compares equal to what Quantrol sent: `0.5` → `500m`, `1.5Gi` → `1536Mi`, `1000m` → `1`. Parsed by the
    kubernetes client (`parse_quantity`); a binary suffix stays binary while the value is a whole number >= 1024."""
    text = str(value).strip()
    amount = parse_quantity(text)  # type: ignore[no-untyped-call]
    if amount == 0:
        return "0"
    binary = text.endswith("i")
    if binary and abs(amount) >= 1024 and amount == amount.to_integral_value():
        number, power = int(amount), 0
        while number % 1024 == 0 and power < len(_BINARY_SUFFIXES) - 1:
            number, power = number // 1024, power + 1
        return f"{number}{_BINARY_SUFFIXES[power]}"
    sign, digits, exponent = amount.normalize().as_tuple()
    mantissa, exponent = int("".join(map(str, digits))), int(exponent)
    mantissa, exponent = mantissa * 10 ** (exponent % 3), exponent - exponent % 3  # exponent: a multiple of 3
    suffix = _DECIMAL_SUFFIXES.get(exponent)
    if re.search(r"\d[eE]", text):  # written with an exponent: it keeps that form (`1e3`)
        suffix = f"e{exponent}" if exponent else ""
    if suffix is None:  # beyond E or below n: the exponent form
        return f"{'-' if sign else ''}{mantissa}e{exponent}"
    return f"{'-' if sign else ''}{mantissa}{suffix}"


def quantities(resources: dict[str, dict[str, int | str]]) -> dict[str, dict[str, str]]:
    """Requests and limits in the API server's canonical form (canonical_quantity)."""
    return {section: {name: canonical_quantity(v) for name, v in values.items()}
            for section, values in resources.items()}
