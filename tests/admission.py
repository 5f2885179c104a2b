"""What a real API server's admission would say about a custom object, evaluated offline.

KMock validates nothing, so tests use this to check the generated CRD schema the way the API server
does: the OpenAPI schema with strict field validation (kubectl's default: unknown fields are errors),
then every `x-kubernetes-validations` CEL rule, evaluated with cel-python. cel-python lacks Kubernetes'
CEL list extensions; the one our rules use (`isSorted`) is supplied here with Kubernetes' semantics.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parent.parent / "crds"


@dataclass(frozen=True)
class AdmissionError:
    path: str
    message: str
    layer: str  # "schema" or "cel"


def load_crds() -> dict[str, dict[str, Any]]:
    """kind → CRD manifest, from the committed crds/ folder."""
    crds = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


def open_api_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Unknown fields become errors, as with kubectl's default --validate=strict."""
    out = copy.deepcopy(schema)

    def visit(node: dict[str, Any]) -> None:
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for sub in node.get("properties", {}).values():
            visit(sub)
        if isinstance(node.get("items"), dict):
            visit(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            visit(node["additionalProperties"])

    visit(out)
    return out


def _format(location: Iterator[Any] | Any) -> str:
    out = ""
    for part in location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[AdmissionError]:
    validator = jsonschema.Draft4Validator(_strict(schema))
    errors = []
    for error in validator.iter_errors(obj):
        path = _format(error.absolute_path)
        if error.validator == "additionalProperties":
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            path = _format([*error.absolute_path, extra[0]]) if extra else path
        elif error.validator == "required":
            missing = [name for name in error.validator_value if name not in error.instance]
            path = _format([*error.absolute_path, missing[0]]) if missing else path
        errors.append(AdmissionError(path, error.message, "schema"))
    return errors


def _is_sorted(values: Any) -> celpy.celtypes.BoolType:
    items = list(values)
    return celpy.celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(items)))


_CEL = celpy.Environment()


def compile_cel(rule: str) -> Any:
    return _CEL.compile(rule)


def evaluate_cel(rule: str, value: Any) -> bool:
    program = _CEL.program(compile_cel(rule), functions={"isSorted": _is_sorted})
    return bool(program.evaluate({"self": celpy.json_to_cel(value)}))


def _walk(schema: dict[str, Any], value: Any, path: list[Any]) -> Iterator[tuple[dict[str, Any], Any, list[Any]]]:
    yield schema, value, path
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                yield from _walk(sub, value[name], [*path, name])
        if isinstance(schema.get("additionalProperties"), dict):
            for name, item in value.items():
                yield from _walk(schema["additionalProperties"], item, [*path, name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _walk(schema["items"], item, [*path, index])


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting, as the API server does before validation: a property with a `default` is filled in
    where its parent object exists and it is absent (a parent that is absent stays absent)."""
    if isinstance(value, dict):
        out = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for name in out:
                out[name] = apply_defaults(schema["additionalProperties"], out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _cel_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[AdmissionError]:
    errors = []
    for node, value, path in _walk(schema, apply_defaults(schema, obj), []):
        for validation in node.get("x-kubernetes-validations", []):
            where = _format(path) + validation.get("fieldPath", "")
            try:
                ok = evaluate_cel(validation["rule"], value)
            except celpy.evaluation.CELEvalError as exc:
                # The API server refuses the object when a rule cannot be evaluated, e.g. it reads a field
                # that is absent ("no such key"): a rule on an optional field must guard it with has().
                errors.append(AdmissionError(where, f"{validation['message']} (rule not evaluable: {exc.args[0]})",
                                             "cel"))
                continue
            if not ok:
                errors.append(AdmissionError(where, validation["message"], "cel"))
    return errors


def admit(obj: dict[str, Any], crds: dict[str, dict[str, Any]] | None = None) -> list[AdmissionError]:
    """Errors the API server would return for `obj` (empty when it would accept it).

    Like the API server, CEL rules run only once the schema accepts the object.
    """
    crds = crds or load_crds()
    schema = open_api_schema(crds[obj["kind"]])
    return _schema_errors(schema, obj) or _cel_errors(schema, obj)


def all_cel_rules(crds: dict[str, dict[str, Any]] | None = None) -> list[tuple[str, str, str]]:
    """(kind, rule, message) for every CEL rule in the CRDs."""
    crds = crds or load_crds()
    found = []
    for kind, crd in crds.items():
        for node, _value, _path in _walk_schema(open_api_schema(crd)):
            for validation in node.get("x-kubernetes-validations", []):
                found.append((kind, validation["rule"], validation["message"]))
    return found


def _walk_schema(schema: dict[str, Any]) -> Iterator[tuple[dict[str, Any], None, None]]:
    yield schema, None, None
    for sub in schema.get("properties", {}).values():
        yield from _walk_schema(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _walk_schema(schema[key])
