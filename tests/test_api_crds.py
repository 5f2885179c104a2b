"""The CRDs are generated from the API models, structural, and agree with the models on every input."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from quantrol_operator import crdgen
from quantrol_operator.api.servingpolicy import BatchBudget, Rollout
from quantrol_operator.validation import validate_object
from tests.admission import admit, all_cel_rules, compile_cel, evaluate_cel, load_crds, open_api_schema

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "e2e" / "samples").glob("*.yaml"))


def test_committed_crds_match_the_models() -> None:
    assert crdgen.drifted(ROOT / "crds") == [], "run `quantrol crds --write crds` and commit the result"


def _nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += _nodes(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += _nodes(schema[key], f"{path}[{key}]")
    return found


@pytest.mark.parametrize("kind", crdgen.KINDS, ids=lambda k: k.kind)
def test_crd_is_structural(kind: crdgen.CrdKind) -> None:
    schema = crdgen.crd_manifest(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    assert "$ref" not in text and "anyOf" not in text and "$defs" not in text
    for path, node in _nodes(schema):
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{kind.kind}{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{kind.kind}{path}"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, f"{kind.kind}{path}"
        if node.get("type") == "array":
            # The API server refuses CEL over lists without a bound (cost estimation).
            assert "maxItems" in node or "x-kubernetes-list-type" in node, f"{kind.kind}{path} needs maxItems"


@pytest.mark.parametrize("kind", crdgen.KINDS, ids=lambda k: k.kind)
def test_crd_names_columns_and_status_subresource(kind: crdgen.CrdKind) -> None:
    crd = crdgen.crd_manifest(kind)
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == f"{kind.plural}.quantrol.io"
    assert names["shortNames"] == [kind.short_name] and names["categories"] == ["quantrol"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata"):
            continue
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]  # a column must point at a field the schema declares
        assert node["type"] == column["type"]


def test_printer_columns_show_what_an_operator_looks_for() -> None:
    columns = {k.kind: [c["name"] for c in k.printer_columns] for k in crdgen.KINDS}
    assert columns["QuantizedModel"] == ["Phase", "Scheme", "Digest", "Age"]
    assert columns["ServingPolicy"] == ["Phase", "Step", "Weight", "Stable", "Candidate", "Age"]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_are_accepted_by_schema_cel_and_models(sample: Path) -> None:
    obj = yaml.safe_load(sample.read_text())
    assert admit(obj) == []
    assert validate_object(obj) == []


def test_sample_policy_has_shadow_then_the_four_canary_steps() -> None:
    obj = yaml.safe_load((ROOT / "e2e/samples/servingpolicy-llama-8b.yaml").read_text())
    assert [step["weight"] for step in obj["spec"]["rollout"]["canarySteps"]] == [5, 25, 50, 100]
    assert obj["spec"]["rollout"]["shadow"]["mirrorFraction"] > 0
    qm = yaml.safe_load((ROOT / "e2e/samples/quantizedmodel-llama-8b-w4a16.yaml").read_text())
    assert len(qm["spec"]["calibration"]["slices"]) == 3


def _set(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()
_QM = "quantizedmodel-llama-8b-w4a16.yaml"
_SP = "servingpolicy-llama-8b.yaml"

# (sample, edits, field path named in the error, layer that must catch it: schema or cel)
INVALID = {
    "canary-weights-decreasing": (
        _SP, {"spec.rollout.canarySteps": [{"weight": 50}, {"weight": 25}, {"weight": 100}]},
        "spec.rollout.canarySteps", "cel"),
    "canary-weights-repeated": (
        _SP, {"spec.rollout.canarySteps": [{"weight": 5}, {"weight": 5}, {"weight": 100}]},
        "spec.rollout.canarySteps", "cel"),
    "canary-weight-zero": (_SP, {"spec.rollout.canarySteps.0.weight": 0}, "spec.rollout.canarySteps[0].weight",
                           "schema"),
    "canary-weight-over-100": (_SP, {"spec.rollout.canarySteps.3.weight": 150},
                               "spec.rollout.canarySteps[3].weight", "schema"),
    "mirror-fraction-above-1": (_SP, {"spec.rollout.shadow.mirrorFraction": 1.5},
                                "spec.rollout.shadow.mirrorFraction", "schema"),
    "mirror-fraction-negative": (_SP, {"spec.rollout.shadow.mirrorFraction": -0.1},
                                 "spec.rollout.shadow.mirrorFraction", "schema"),
    "candidate-both": (_SP, {"spec.candidate.artifact": "oci://r.example.com/m@sha256:" + "a" * 64},
                       "spec.candidate", "cel"),
    "candidate-neither": (_SP, {"spec.candidate.quantizedModelRef": _DELETE}, "spec.candidate", "cel"),
    "budget-zero-seqs": (_SP, {"spec.serving.batchBudget.maxNumSeqs": 0}, "spec.serving.batchBudget.maxNumSeqs",
                         "schema"),
    "budget-tokens-below-seqs": (_SP, {"spec.serving.batchBudget.maxNumBatchedTokens": 32},
                                 "spec.serving.batchBudget.maxNumBatchedTokens", "cel"),
    "admission-wait-zero": (_SP, {"spec.serving.admission.maxQueueWaitSeconds": 0},
                            "spec.serving.admission.maxQueueWaitSeconds", "schema"),
    "slo-without-limit": (_SP, {"spec.slos.ttftP99": {}}, "spec.slos.ttftP99", "cel"),
    "unknown-kernel-policy": (_SP, {"spec.kernelPolicy": "ignore"}, "spec.kernelPolicy", "schema"),
    "group-size-on-w8a8": (_QM, {"spec.quantization.scheme": "W8A8", "spec.quantization.method": "gptq"},
                           "spec.quantization.groupSize", "cel"),
    "awq-for-w8a8": (_QM, {"spec.quantization.scheme": "W8A8", "spec.quantization.groupSize": _DELETE,
                           "spec.quantization.method": "awq"}, "spec.quantization.method", "cel"),
    "unknown-scheme": (_QM, {"spec.quantization.scheme": "INT3"}, "spec.quantization.scheme", "schema"),
    "base-model-http-url": (_QM, {"spec.baseModel.uri": "https://huggingface.co/meta-llama/x"},
                            "spec.baseModel.uri", "schema"),
    "duplicate-slices": (_QM, {"spec.calibration.slices.1.name": "chat"}, "spec.calibration.slices", "cel"),
    "no-slices": (_QM, {"spec.calibration.slices": []}, "spec.calibration.slices", "schema"),
    "data-uri-and-configmap": (_QM, {"spec.calibration.configMapRef": {"name": "calib", "key": "d.jsonl"}},
                               "spec.calibration", "cel"),
    # Every URI scheme admitted is served by the code that reads the field; the rest are refused here (issue 14).
    "base-model-s3": (_QM, {"spec.baseModel.uri": "s3://bucket/llama"}, "spec.baseModel.uri", "schema"),
    "base-model-oci-tag": (_QM, {"spec.baseModel": {"uri": "oci://r.example.com/llama:v1"}}, "spec.baseModel.uri",
                           "cel"),
    "hf-without-cache": (_QM, {"spec.baseModel.huggingFaceCache": _DELETE}, "spec.baseModel.huggingFaceCache",
                         "cel"),
    "hf-cache-escapes-claim": (_QM, {"spec.baseModel.huggingFaceCache.subPath": "hub/../../etc"},
                               "spec.baseModel.huggingFaceCache.subPath", "cel"),
    "data-hf": (_QM, {"spec.calibration.uri": "hf://datasets/x"}, "spec.calibration.uri", "schema"),
    "data-pvc-without-path": (_QM, {"spec.calibration.uri": "pvc://claim"}, "spec.calibration.uri", "cel"),
    "data-oci-tag": (_QM, {"spec.calibration.uri": "oci://r.example.com/data:v1"}, "spec.calibration.uri", "cel"),
    "job-gpus-disagree": (_QM, {"spec.job.gpus": 2}, "spec.job.gpus", "cel"),
    "baseline-hf": (_SP, {"spec.baseline.artifact": "hf://meta-llama/x"}, "spec.baseline.artifact", "schema"),
    "baseline-pvc": (_SP, {"spec.baseline.artifact": "pvc://claim/x"}, "spec.baseline.artifact", "schema"),
    "baseline-oci-tag": (_SP, {"spec.baseline.artifact": "oci://r.example.com/m:v1"}, "spec.baseline.artifact",
                         "schema"),
    "unknown-field": (_QM, {"spec.quantization.bits": 3}, "spec.quantization.bits", "schema"),
    "missing-artifact-repository": (_QM, {"spec.artifact": _DELETE}, "spec.artifact", "schema"),
    "agreement-above-1": (_QM, {"spec.qualityGate.minTop1Agreement": 1.2}, "spec.qualityGate.minTop1Agreement",
                          "schema"),
    # Names every child can carry (issue 15): a Service name is a DNS-1035 label; children add up to 13 characters.
    "policy-name-starts-with-a-digit": (_SP, {"metadata.name": "8b-chat"}, "", "cel"),
    "policy-name-with-a-dot": (_SP, {"metadata.name": "llama-3.1-8b"}, "", "cel"),
    "model-name-too-long-for-its-children": (_QM, {"metadata.name": "m" * 51}, "", "cel"),
    "hf-without-revision": (_QM, {"spec.baseModel.uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}, "spec.baseModel.uri",
                            "schema"),
    "baseline-by-tag": (_SP, {"spec.baseline.artifact": "oci://registry.example.com/models/llama:bf16"},
                        "spec.baseline.artifact", "schema"),
    "baseline-not-oci": (_SP, {"spec.baseline.artifact": "pvc://models/llama"}, "spec.baseline.artifact", "schema"),
    "candidate-by-tag": (_SP, {"spec.candidate.quantizedModelRef": _DELETE,
                               "spec.candidate.artifact": "oci://registry.example.com/models/llama:w4"},
                         "spec.candidate.artifact", "schema"),
    "empty-serving-image": (_SP, {"spec.serving.image": ""}, "spec.serving.image", "schema"),
    "empty-job-image": (_QM, {"spec.job.image": ""}, "spec.job.image", "schema"),
}


# Valid objects a real API server must accept as they are: optional parents present with their lists left out.
VALID = {
    "shadow-only-rollout": (_SP, {"spec.rollout": {"shadow": {"durationSeconds": 60}}}),
    "empty-rollout": (_SP, {"spec.rollout": {}}),
    "empty-batch-budget": (_SP, {"spec.serving.batchBudget": {}}),
    "longest-name": (_SP, {"metadata.name": "a" * 50}),
    # An oci:// base model is pulled by digest (a tag is refused: base-model-oci-tag), from a claim or a local path.
    "oci-base-model-by-digest": (_QM, {"spec.baseModel": {"uri": "oci://registry.example.com/models/llama@sha256:"
                                                                 + "b" * 64}}),
    "pvc-base-model": (_QM, {"spec.baseModel": {"uri": "pvc://models/llama-8b"}}),
    "oci-calibration-data": (_QM, {"spec.calibration.uri": "oci://r.example.com/data@sha256:" + "c" * 64}),
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_input_is_accepted_by_the_server_and_the_models(case: str) -> None:
    sample, edits = VALID[case]
    obj = yaml.safe_load((ROOT / "e2e" / "samples" / sample).read_text())
    for dotted, value in edits.items():
        _set(obj, dotted, value)
    assert admit(obj) == []
    assert validate_object(obj) == []


_NAME_RULE = next(v["rule"] for v in open_api_schema(load_crds()["ServingPolicy"])["x-kubernetes-validations"])


@given(st.text(alphabet="abcz019-.A_", min_size=1, max_size=70))
def test_name_rule_cel_and_pydantic_agree(name: str) -> None:
    obj = yaml.safe_load((ROOT / "e2e" / "samples" / _SP).read_text())
    obj["metadata"]["name"] = name
    cel_ok = evaluate_cel(_NAME_RULE, {"metadata": {"name": name}})
    model_ok = validate_object(obj) == []
    dns_1035 = len(name) <= 50 and name[0].isalpha() and name[0].islower() and name[-1].isalnum() and all(
        c.islower() or c.isdigit() or c == "-" for c in name)
    assert cel_ok == model_ok == dns_1035


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_input_is_rejected_naming_the_field(case: str) -> None:
    sample, edits, field, layer = INVALID[case]
    obj = yaml.safe_load((ROOT / "e2e" / "samples" / sample).read_text())
    for dotted, value in edits.items():
        _set(obj, dotted, value)

    server_errors = admit(obj)
    assert server_errors, f"{case}: the API server would accept it"
    assert field in [e.path for e in server_errors], server_errors
    assert {e.layer for e in server_errors} == {layer}

    model_errors = validate_object(obj)
    assert field in [e.path for e in model_errors], model_errors
    if layer == "cel":
        # A CEL rule and its pydantic twin say the same words.
        assert {e.message for e in server_errors} <= {e.message for e in model_errors}


def test_every_cel_rule_compiles_and_has_a_pydantic_twin() -> None:
    crds = load_crds()
    rules = all_cel_rules(crds)
    assert len(rules) >= 8
    twins = {
        rule.cel: rule.message
        for model in _api_models()
        for rule in model.cross_field_rules
    }
    for _kind, cel, message in rules:
        assert twins.get(cel) == message
        compile_cel(cel)  # raises on a syntax cel-python (and so, likely, the API server) cannot parse


def _api_models() -> list[Any]:
    from quantrol_operator.api.base import ApiModel

    seen: list[Any] = []
    stack = list(ApiModel.__subclasses__())
    while stack:
        model = stack.pop()
        seen.append(model)
        stack.extend(model.__subclasses__())
    return seen


_ROLLOUT_SCHEMA_RULE = next(
    v["rule"]
    for v in open_api_schema(load_crds()["ServingPolicy"])["properties"]["spec"]["properties"]["rollout"][
        "x-kubernetes-validations"
    ]
)


# No deadline: on a shared 2-core machine one CEL evaluation can take 0.7 s; agreement is the property, not speed.
@settings(deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=20))
def test_canary_rule_cel_and_pydantic_agree(weights: list[int]) -> None:
    steps = [{"weight": w} for w in weights]
    cel_ok = evaluate_cel(_ROLLOUT_SCHEMA_RULE, {"canarySteps": steps})
    try:
        Rollout.model_validate({"canarySteps": steps})
        model_ok = True
    except ValueError:
        model_ok = False
    assert cel_ok == model_ok == all(a < b for a, b in itertools.pairwise(weights))


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=4096), st.integers(min_value=1, max_value=1_048_576))
def test_batch_budget_rule_cel_and_pydantic_agree(seqs: int, tokens: int) -> None:
    rule = BatchBudget.cross_field_rules[0].cel
    cel_ok = evaluate_cel(rule, {"maxNumSeqs": seqs, "maxNumBatchedTokens": tokens})
    try:
        BatchBudget.model_validate({"maxNumSeqs": seqs, "maxNumBatchedTokens": tokens})
        model_ok = True
    except ValueError:
        model_ok = False
    assert cel_ok == model_ok == (tokens >= seqs)


def test_defaults_are_sensible_for_an_interactive_service() -> None:
    obj = copy.deepcopy(yaml.safe_load((ROOT / "e2e/samples" / _SP).read_text()))
    obj["spec"] = {"baseline": obj["spec"]["baseline"], "candidate": obj["spec"]["candidate"]}
    from quantrol_operator.api import ServingPolicy

    policy = ServingPolicy.model_validate(obj)
    assert [s.weight for s in policy.spec.rollout.canary_steps] == [5, 25, 50, 100]
    assert policy.spec.kernel_policy.value == "enforce" and policy.spec.deletion_policy.value == "Delete"
    assert policy.spec.analysis.interval_seconds == 5
    assert policy.spec.slos.goodput is not None and policy.spec.slos.goodput.min_relative_to_stable == 1.0
