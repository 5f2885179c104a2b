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
from quantrol_operator.api.common import API_VERSION

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


def field_error(error: ErrorDetails) -> FieldError:
    path = _path(error["loc"])
    # A cross-field rule names the field it is about, as its CEL twin's fieldPath does.
    field_path = str((error.get("ctx") or {}).get("field_path", ""))
    return FieldError(path + field_path, error["msg"])
