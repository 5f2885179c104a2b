"""Generate the CustomResourceDefinitions from the pydantic API models (the only source of the schema).

Pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3.0 schema: no `$ref`,
no `anyOf` with null, every node typed, numeric exclusive bounds as booleans. This module does that
translation and nothing else; `crds/*.yaml` is its output and is never edited by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from quantrol_operator.api.common import GROUP, VERSION
from quantrol_operator.api.kinds import QUANTIZED_MODEL, SERVING_POLICY, ResourceKind

Schema = dict[str, Any]

# Keys pydantic emits that a structural schema either forbids or does not need.
_DROPPED_KEYS = {"title", "$defs", "discriminator"}


@dataclass(frozen=True)
class CrdKind:
    """A resource kind (api.kinds) with what its CRD adds for people: a description and printer columns."""

    resource: ResourceKind
    description: str
    printer_columns: tuple[dict[str, Any], ...]

    @property
    def kind(self) -> str:
        return self.resource.kind

    @property
    def plural(self) -> str:
        return self.resource.plural

    @property
    def short_name(self) -> str:
        return self.resource.short_name

    @property
    def spec_model(self) -> type[BaseModel]:
        return self.resource.spec_model

    @property
    def status_model(self) -> type[BaseModel]:
        return self.resource.status_model

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def filename(self) -> str:
        return f"{self.name}.yaml"


_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

KINDS: tuple[CrdKind, ...] = (
    CrdKind(
        resource=QUANTIZED_MODEL,
        description="A lower-precision version of a model: calibrated, quality-gated per slice against the "
        "baseline, and published as a digest-pinned artifact.",
        printer_columns=(
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Scheme", "type": "string", "jsonPath": ".spec.quantization.scheme"},
            {"name": "Digest", "type": "string", "jsonPath": ".status.artifact.shortDigest"},
            _AGE,
        ),
    ),
    CrdKind(
        resource=SERVING_POLICY,
        description="How a model is served and how fast the quantized candidate may replace the stable "
        "(higher-precision) arm: shadow, canary steps, SLO analysis, automatic rollback.",
        printer_columns=(
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
            {"name": "Weight", "type": "integer", "jsonPath": ".status.weights.candidate",
             "description": "Percent of live traffic on the candidate arm."},
            {"name": "Stable", "type": "string", "jsonPath": ".status.stableShortDigest"},
            {"name": "Candidate", "type": "string", "jsonPath": ".status.candidateShortDigest"},
            _AGE,
        ),
    ),
)


def structural_schema(model: type[BaseModel]) -> Schema:
    """The model's JSON schema, translated to a structural OpenAPI v3.0 schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions: dict[str, Schema] = raw.get("$defs", {})
    return _translate(raw, definitions)


def _translate(node: Schema, definitions: dict[str, Schema]) -> Schema:
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _translate(merged, definitions)
    if "anyOf" in node:
        return _translate_any_of(node, definitions)

    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _translate(sub, definitions) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _translate(value, definitions)
        elif key == "additionalProperties" and value is False:
            # A structural schema may not combine properties with additionalProperties; unknown
            # fields are pruned by the API server instead (the models refuse them on our side).
            continue
        elif key == "additionalProperties" and value is True:
            # A free-form object (e.g. a pod's affinity, passed through as it is): the structural form.
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "default":
            # Only scalar defaults: the API server applies them, and a scalar is easy to read in
            # `kubectl explain`. Object defaults stay with the models (applied when the operator reads).
            if isinstance(value, str | int | float | bool):
                out[key] = value
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return _readable_order(out)


def _readable_order(node: Schema) -> Schema:
    """description and type first, then the rest as pydantic ordered them (fields in declaration order)."""
    first: Schema = {key: node[key] for key in ("description", "type") if key in node}
    return {**first, **{key: value for key, value in node.items() if key not in first}}


def _translate_any_of(node: Schema, definitions: dict[str, Schema]) -> Schema:
    """`X | None` becomes X (absence means None); `int | str` becomes int-or-string."""
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    options = [option for option in node["anyOf"] if option.get("type") != "null"]
    types = {option.get("type") for option in options}
    if len(options) == 1:
        inner = _translate(options[0], definitions)
        extra = _translate(outer, definitions)
        return {**inner, **extra}
    if types == {"integer", "string"}:
        extra = _translate(outer, definitions)
        return {**extra, "x-kubernetes-int-or-string": True}
    raise ValueError(f"no structural form for anyOf with types {sorted(map(str, types))}: {node}")


def crd_manifest(kind: CrdKind) -> Schema:
    spec_schema = structural_schema(kind.spec_model)
    status_schema = structural_schema(kind.status_model)
    spec_schema.pop("description", None)
    status_schema.pop("description", None)
    root: Schema = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {**spec_schema, "description": f"Desired state of the {kind.kind}; written by users."},
            "status": {**status_schema, "description": "Observed state; written only by the operator."},
        },
    }
    rules = getattr(kind.resource.object_model, "cross_field_rules", ())
    if rules:  # CEL at the root may read metadata.name (and generateName), nothing else of metadata
        root["x-kubernetes-validations"] = [rule.as_validation() for rule in rules]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.name, "labels": {"app.kubernetes.io/part-of": "quantrol"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": [kind.short_name],
                "categories": ["quantrol"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(kind.printer_columns),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


_HEADER = (
    "# Generated by `quantrol crds --write crds` from the pydantic models in operator/quantrol_operator/api.\n"
    "# Do not edit by hand: a test fails when this file and the models disagree.\n"
)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated sub-schemas out in full: anchors and aliases are unreadable in a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(kind: CrdKind) -> str:
    body = yaml.dump(
        crd_manifest(kind), Dumper=_NoAliasDumper, sort_keys=False, width=100, allow_unicode=True
    )
    return _HEADER + body


def render_all() -> dict[str, str]:
    """File name → YAML text, for every CRD."""
    return {kind.filename: render(kind) for kind in KINDS}


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in render_all().items():
        path = directory / filename
        path.write_text(text)
        written.append(path)
    return written


def drifted(directory: Path) -> list[str]:
    """Names of CRD files in `directory` that are missing or differ from what the models generate."""
    return [
        filename
        for filename, text in render_all().items()
        if not (directory / filename).is_file() or (directory / filename).read_text() != text
    ]
