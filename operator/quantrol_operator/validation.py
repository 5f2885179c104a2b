"""Validate user YAML the way the API server would, with messages that name the field.

The API server checks the generated schema and the CEL rules; here the same rules run through the
pydantic models (which generated that schema), so `quantrol validate` and admission agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from quantrol_operator.api import QuantizedModel, ServingPolicy
from quantrol_operator.api.common import (
    API_VERSION,
    BASE_MODEL_URI_PATTERN,
    DATA_URI_PATTERN,
    IMAGE_PATTERN,
    PINNED_ARTIFACT_PATTERN,
)

MODELS_BY_KIND: dict[str, type[BaseModel]] = {"QuantizedModel": QuantizedModel, "ServingPolicy": ServingPolicy}


@dataclass(frozen=True)
class FieldError:
    path: str  # e.g. spec.rollout.canarySteps[1].weight
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _path(location: Iterable[int | str]) -> str:
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validate_object(obj: dict[str, Any]) -> list[FieldError]:
    """Errors for one custom object (empty when valid). Unknown kinds are an error, not a skip."""
    kind = obj.get("kind")
    model = MODELS_BY_KIND.get(str(kind))
    if model is None:
        return [FieldError("kind", f"expected one of {sorted(MODELS_BY_KIND)}, got {kind!r}")]
    if obj.get("apiVersion") != API_VERSION:
        return [FieldError("apiVersion", f"expected {API_VERSION!r}, got {obj.get('apiVersion')!r}")]
    body = {key: value for key, value in obj.items() if key != "status"}
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return [field_error(error) for error in exc.errors()]
    return []


# What a pattern means, in the user's words (pydantic would quote the regular expression).
PATTERN_MEANINGS = {
    PINNED_ARTIFACT_PATTERN: "must be an OCI artifact pinned by digest, oci://repo@sha256:<64 hex digits> (a tag "
    "can move under you)",
    BASE_MODEL_URI_PATTERN: "must be hf://org/name@revision (with a revision: a branch moves), oci://, pvc:// or "
    "file:// (what the calibration worker reads)",
    DATA_URI_PATTERN: "must be pvc://claim/path, oci://repo@sha256:… or file:// (what the calibration worker reads)",
    IMAGE_PATTERN: "must be an image reference without spaces",
}


def field_error(error: ErrorDetails) -> FieldError:
    path = _path(error["loc"])
    # A cross-field rule names the field it is about, as its CEL twin's fieldPath does.
    ctx = error.get("ctx") or {}
    field_path = str(ctx.get("field_path", ""))
    meaning = PATTERN_MEANINGS.get(str(ctx.get("pattern"))) if error["type"] == "string_pattern_mismatch" else None
    return FieldError(path + field_path, meaning or error["msg"])
