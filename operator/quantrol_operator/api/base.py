"""The base every API model stands on: camelCase on the wire, and cross-field rules written once.

A cross-field rule is a CEL expression for the API server (`x-kubernetes-validations`) and a Python
predicate for everything that reads the same YAML without an API server (`quantrol` commands, the operator,
tests). Both carry the same message, so a user sees the same words whichever path caught the mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class CrossFieldRule:
    """One rule, two evaluators: `cel` runs in the API server, `check` in Python; they must agree."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str = ""  # CEL `fieldPath` (relative to the object the rule sits on), e.g. ".canarySteps"

    def as_validation(self) -> dict[str, str]:
        validation = {"rule": self.cel, "message": self.message}
        if self.field_path:
            validation["fieldPath"] = self.field_path
        return validation


def _add_cross_field_rules(schema: dict[str, Any], model: type[BaseModel]) -> None:
    rules: tuple[CrossFieldRule, ...] = getattr(model, "cross_field_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.as_validation() for rule in rules]


class ApiModel(BaseModel):
    """Base of every spec/status model: camelCase aliases, unknown fields refused, rules enforced."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
        json_schema_extra=_add_cross_field_rules,
    )

    # Cross-field rules of this model, emitted as x-kubernetes-validations on its schema.
    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> Self:
        for rule in type(self).cross_field_rules:
            if not rule.check(self):
                raise PydanticCustomError(
                    "cross_field_rule", rule.message, {"field_path": rule.field_path}
                )
        return self

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict as the API server stores it: camelCase, no unset optionals."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Status written by the operator: tolerant of fields a newer operator version may have added."""

    model_config = ConfigDict(extra="ignore")
