"""Types both custom resources share: the Kubernetes Condition shape, artifact references, job settings."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints
from pydantic.alias_generators import to_snake
from pydantic.config import JsonDict

from quantrol_operator.api.base import ApiModel, CrossFieldRule, StatusModel

GROUP = "quantrol.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# `repo@sha256:<64 hex>`: the only form of artifact reference that is ever served.
DIGEST_PINNED_PATTERN = r"^[^\s@]+@sha256:[0-9a-f]{64}$"
# Each URI field admits exactly the schemes the code that consumes it serves (a scheme that passes admission and
# fails later is a bug): the base model hf://org/name@revision (a mounted cache; the revision is required: a branch
# name moves, and what was qualified would not be what is served), oci:// (by digest), pvc://claim/path, file://;
# the calibration data oci:// (by digest), pvc://claim/path, file://; what serves (baseline, pinned candidate) an
# OCI artifact pinned by digest, never a tag. Cross-field rules (`uri_rules`) check a digest for oci:// and a claim
# for pvc:// with messages that say so.
BASE_MODEL_URI_PATTERN = r"^(hf://[^\s@]+@[^\s@]+|(oci|pvc|file)://\S+)$"
DATA_URI_PATTERN = r"^(oci|pvc|file)://\S+$"
PINNED_ARTIFACT_PATTERN = r"^oci://[^\s@]+@sha256:[0-9a-f]{64}$"
# No backslashes: these go into CEL string literals too (the base patterns already exclude whitespace).
OCI_PINNED_PATTERN = "^oci://[^@ ]+@sha256:[0-9a-f]{64}$"
PVC_URI_PATTERN = "^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+$"
# A container image reference: no whitespace, not empty (an empty image is a pod no kubelet can start).
IMAGE_PATTERN = r"^[^\s]+$"

BaseModelUri = Annotated[str, StringConstraints(pattern=BASE_MODEL_URI_PATTERN, max_length=1024)]
DataUri = Annotated[str, StringConstraints(pattern=DATA_URI_PATTERN, max_length=1024)]
PinnedArtifact = Annotated[str, StringConstraints(pattern=PINNED_ARTIFACT_PATTERN, max_length=1024)]
ImageRef = Annotated[str, StringConstraints(pattern=IMAGE_PATTERN, min_length=1, max_length=512)]
DigestPinnedRef = Annotated[str, StringConstraints(pattern=DIGEST_PINNED_PATTERN, max_length=1024)]
DnsLabel = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
K8sQuantity = int | Annotated[str, StringConstraints(pattern=r"^[0-9.]+[a-zA-Z]*$", max_length=64)]
GPU_RESOURCE = "nvidia.com/gpu"


# The longest name a QuantizedModel or ServingPolicy may have: its children are `<name>-<suffix>` with suffixes up to
# 13 characters (`-router-admin`, `-<12 hex digest>`), and those must stay DNS labels (<= 63).
MAX_NAME_LENGTH = 50
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035 label: a Service may carry it


def name_fits_children(metadata: Mapping[str, Any]) -> bool:
    """Whether `metadata.name` can name every child (see NAME_RULE); no name yet (generateName) cannot be judged."""
    name = metadata.get("name")
    return not isinstance(name, str) or (len(name) <= MAX_NAME_LENGTH and re.match(NAME_PATTERN, name) is not None)


# On both kinds' root: the router Service and the PodMonitor carry the policy's own name, arm Services and Jobs
# `<name>-<suffix>`, labels the name itself. A real API server accepts `8b-chat` or `llama-3.1-8b` as resource
# names; neither can name a Service (DNS-1035: https://kubernetes.io/docs/concepts/overview/working-with-objects/
# names/#rfc-1035-label-names).
NAME_RULE = CrossFieldRule(
    cel=f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{NAME_PATTERN}')",
    message=f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters (lowercase letters, "
    "digits and '-', starting with a letter): it names the Services, Jobs and labels Quantrol creates",
    check=lambda obj: name_fits_children(obj.metadata),
)


def uri_rules(field: str, optional: bool = False) -> tuple[CrossFieldRule, ...]:
    """The cross-field rules of a URI field `field` (camelCase): oci:// pinned by digest, pvc:// naming a claim."""
    attribute = to_snake(field)

    def value(obj: object) -> str:
        return str(getattr(obj, attribute) or "")

    guard = f"!has(self.{field}) || " if optional else ""
    return (
        CrossFieldRule(
            cel=f"{guard}!self.{field}.startsWith('oci://') || self.{field}.matches('{OCI_PINNED_PATTERN}')",
            message=f"{field}: an oci:// reference must be pinned by digest (oci://REPO@sha256:…): a tag can move",
            check=lambda o: not value(o).startswith("oci://") or re.match(OCI_PINNED_PATTERN, value(o)) is not None,
            field_path=f".{field}",
        ),
        CrossFieldRule(
            cel=f"{guard}!self.{field}.startsWith('pvc://') || self.{field}.matches('{PVC_URI_PATTERN}')",
            message=f"{field}: a pvc:// location is pvc://CLAIM/PATH (a PersistentVolumeClaim in this namespace)",
            check=lambda o: not value(o).startswith("pvc://") or re.match(PVC_URI_PATTERN, value(o)) is not None,
            field_path=f".{field}",
        ),
    )


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

