"""Desired-state builders, one module per child kind: plain dicts in, plain manifests out."""

from __future__ import annotations

import hashlib
from typing import Any

MANAGED_BY = {"app.kubernetes.io/managed-by": "quantrol", "app.kubernetes.io/part-of": "quantrol"}


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
