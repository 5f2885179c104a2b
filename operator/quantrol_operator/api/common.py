"""Types both custom resources share: the Kubernetes Condition shape, artifact references, job settings."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints
from pydantic.config import JsonDict

from quantrol_operator.api.base import ApiModel, StatusModel

GROUP = "quantrol.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# `repo@sha256:<64 hex>`: the only form of artifact reference that is ever served.
DIGEST_PINNED_PATTERN = r"^[^\s@]+@sha256:[0-9a-f]{64}$"
# A model location: hf://org/name[@revision], oci://registry/repo[:tag|@sha256:…], pvc://claim/path,
# s3://bucket/key, file:///abs/path. The schema only checks the scheme; the worker checks the rest.
MODEL_URI_PATTERN = r"^(hf|oci|pvc|s3|file)://\S+$"

ModelUri = Annotated[str, StringConstraints(pattern=MODEL_URI_PATTERN, max_length=1024)]
DigestPinnedRef = Annotated[str, StringConstraints(pattern=DIGEST_PINNED_PATTERN, max_length=1024)]
DnsLabel = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
K8sQuantity = int | Annotated[str, StringConstraints(pattern=r"^[0-9.]+[a-zA-Z]*$", max_length=64)]


def is_digest_pinned(ref: str) -> bool:
    return re.match(DIGEST_PINNED_PATTERN, ref.removeprefix("oci://")) is not None


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """The Kubernetes `metav1.Condition` shape, so dashboards and `kubectl wait` understand it."""

    type: str = Field(description="CamelCase condition type, e.g. Ready.")
    status: ConditionStatus
    reason: str = Field(description="CamelCase machine-readable reason; one of the documented constants.")
    message: str = Field(default="", description="What happened, to which object, and what to do next.")
    last_transition_time: datetime | None = Field(
        default=None, description="When `status` last changed (not when the message did)."
    )
    observed_generation: int | None = Field(default=None, description="The spec generation this describes.")


# One condition per type, merged by type (as `kubectl` and server-side apply expect).
CONDITIONS_LIST_MAP: JsonDict = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class Toleration(ApiModel):
    key: str | None = None
    operator: str | None = Field(default=None, pattern="^(Exists|Equal)$")
    value: str | None = None
    effect: str | None = Field(default=None, pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$")
    toleration_seconds: int | None = None


class Resources(ApiModel):
    """Container requests and limits, as in a pod spec (e.g. `cpu: 4`, `memory: 32Gi`, `nvidia.com/gpu: 1`)."""

    requests: dict[str, K8sQuantity] = Field(default_factory=dict)
    limits: dict[str, K8sQuantity] = Field(default_factory=dict)


class LocalObjectReference(ApiModel):
    name: DnsLabel = Field(description="Name of an object in the same namespace.")

