"""No dead API fields: every spec field of both CRDs is read by code that acts on it — a child builder, a planner, the
worker's config, the analysis — after validation.

How: the specs are validated first (cross-field rules read fields too, and must not count), then every attribute read
of a spec model's field is recorded while the product's own code paths run on them: the QuantizedModel planner (its
Job, ConfigMap and worker config) for both data sources, and the ServingPolicy observer and planner through a
rollout's phases, with a metric source that answers every query (so every SLO is queried and judged) and windows
that pass, fail, cannot judge and cannot be read (so every analysis limit is consulted). A field nothing reads is
reported by name.
"""

from __future__ import annotations

import copy
import types
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from quantrol_operator.api.quantizedmodel import QuantizedModelSpec
from quantrol_operator.api.servingpolicy import ServingPolicySpec
from quantrol_operator.planning import quantizedmodel as qm_planning
from quantrol_operator.planning import servingpolicy as sp_planning
from quantrol_operator.rollout.queries import QueryError, Scope, observe
from quantrol_worker.contracts import QualificationReason, QualificationReport

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
IMAGES = sp_planning.Images("serve:test", "router:test", "tools:test")


def spec_fields(root: type[BaseModel]) -> set[tuple[str, str]]:
    """(model, field) of every field reachable from `root` through its annotations."""
    found: set[tuple[str, str]] = set()
    todo: list[Any] = [root]
    seen: set[type[BaseModel]] = set()
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                continue
            seen.add(tp)
            for name, info in tp.model_fields.items():
                found.add((tp.__name__, name))
                todo.append(info.annotation)
        else:
            todo.extend(typing.get_args(tp))
            if isinstance(tp, types.UnionType):
                todo.extend(tp.__args__)
    return found


def _track(monkeypatch: pytest.MonkeyPatch, recorded: set[tuple[str, str]]) -> None:
    """Record every read of a model field, and count a model serialized into a child (to_wire, model_dump) as every
    one of its fields read: a builder that copies `resources` or a toleration into a pod spec uses all of it."""
    def tracking(self: BaseModel, name: str) -> Any:
        if name in type(self).__pydantic_fields__:
            recorded.add((type(self).__name__, name))
        return object.__getattribute__(self, name)

    def dumped(model: BaseModel) -> None:
        for name in type(model).__pydantic_fields__:
            recorded.add((type(model).__name__, name))
            value = object.__getattribute__(model, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, BaseModel):
                    dumped(item)

    original = BaseModel.model_dump

    def model_dump(self: BaseModel, *args: Any, **kwargs: Any) -> Any:
        dumped(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BaseModel, "__getattribute__", tracking)
    monkeypatch.setattr(BaseModel, "model_dump", model_dump)


class AnswersEverything:
    """A metric source that answers every query, its newest sample at `newest`: with `value` for every SLO, or (no
    value) with figures that pass every SLO of the sample policy; or it fails every query."""

    def __init__(self, newest: datetime, value: float | None = None, fail: bool = False,
                 overload: bool = False) -> None:
        self.newest, self.value, self.fail, self.overload = newest, value, fail, overload

    def scalar(self, promql: str) -> float | None:
        if self.fail:
            raise QueryError("unreachable")
        if "timestamp(" in promql:
            return self.newest.timestamp()
        if "increase(" in promql or "(up{" in promql:
            return 100.0  # requests and comparisons in the window, router targets up
        if self.overload and "compare_" not in promql:
            return 50.0  # both arms break every absolute limit alike; the comparison is fine
        if self.value is not None:
            return self.value
        floors = ("top1_matches", "deadline_output_tokens", "x{")  # more is better: agreement, goodput, hit-rate
        return 1.0 if any(k in promql for k in floors) else 0.001

    def by_label(self, promql: str, label: str) -> dict[str, float]:
        value = self.scalar(promql)
        return {} if value is None else {"code": value}


def _quantized_model() -> dict[str, Any]:
    obj = yaml.safe_load((ROOT / "e2e/samples/quantizedmodel-llama-8b-w4a16.yaml").read_text())
    obj["metadata"].update(uid="uid-qm", generation=1)
    obj["spec"]["job"].update(image="registry.example.com/worker:1", serviceAccountName="calibrator",
                              nodeSelector={"pool": "gpu"}, activeDeadlineSeconds=7200, backoffLimit=1,
                              tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule",
                                            "tolerationSeconds": 60, "value": None}])
    return obj


def _serving_policy() -> dict[str, Any]:
    obj = yaml.safe_load((ROOT / "e2e/samples/servingpolicy-llama-8b.yaml").read_text())
    obj["metadata"].update(uid="uid-sp", generation=1, annotations={})
    obj["spec"]["serving"].update(nodeSelector={"pool": "gpu"}, target="cuda-sm90")
    obj["spec"]["qualification"].update(probePrompts={"name": "probes", "key": "prompts.jsonl"},
                                        image="registry.example.com/serve:1")
    obj["spec"]["slos"]["custom"] = [{"name": "kv-usage", "query": "max(vllm:kv_cache_usage_perc{arm=\"$arm\"})",
                                      "max": 0.9}, {"name": "hit-rate", "query": "avg(x{arm=\"$arm\"})", "min": 0.1}]
    return obj


def _run_quantized_model() -> None:
    for data in ({"uri": "file:///data/calibration.jsonl"}, {"configMapRef": {"name": "calib", "key": "d.jsonl"}}):
        obj = _quantized_model()
        calibration = {k: v for k, v in obj["spec"]["calibration"].items() if k not in ("uri", "configMapRef")}
        obj["spec"]["calibration"] = {**calibration, **data}
        qm_planning.plan(qm_planning.QmObserved(obj=obj, now=T0), "worker:test")


def _run_serving_policy(recorded: set[tuple[str, str]]) -> None:
    from quantrol_operator.api.servingpolicy import KernelReport
    from quantrol_worker.contracts import KernelVerdict

    obj = _serving_policy()
    qm = {"metadata": {"name": "llama-3-1-8b-w4a16", "generation": 1},
          "status": {"phase": "Ready", "observedGeneration": 1,
                     "artifact": {"ref": "registry.example.com/m@sha256:" + "c" * 64},
                     "conditions": [{"type": "QualityQualified", "status": "True", "reason": "Succeeded"}]}}
    spec = sp_planning.read_spec(obj)
    assert spec.spec is not None, spec.error
    kernels = KernelReport(verdict=KernelVerdict.NATIVE)
    now = T0

    def one(observed_obj: dict[str, Any], **kw: Any) -> dict[str, Any]:
        result = sp_planning.plan(sp_planning.SpObserved(obj=observed_obj, spec=sp_planning.read_spec(observed_obj),
                                                         quantized_model=qm, candidate_kernels=kernels, now=now,
                                                         **kw), IMAGES, {"release": "p"})
        nxt = copy.deepcopy(observed_obj)
        nxt["status"] = result.status
        ready = []
        for d in result.apply:
            if d["kind"] == "Deployment":
                d = copy.deepcopy(d)
                d["metadata"]["generation"] = 1
                n = d["spec"]["replicas"]
                d["status"] = {"observedGeneration": 1, "readyReplicas": n, "updatedReplicas": n}
                ready.append(d)
        nxt["_ready"] = ready
        return nxt

    obj = one(obj)
    obj = one(obj, deployments=obj.pop("_ready"))  # → Qualifying: the Job is built from spec.qualification
    assert obj["status"]["phase"] == "Qualifying", obj["status"].get("message")
    deployments = obj.pop("_ready")
    job = {"metadata": {"name": obj["status"]["qualification"]["jobName"]}, "status": {}}
    report = QualificationReport(reason=QualificationReason.QUALIFIED, message="qualified")
    pod = {"metadata": {"creationTimestamp": "2026-12-01T12:00:00Z"}, "status": {"containerStatuses": [
        {"name": "qualify", "state": {"terminated": {"exitCode": 0, "message": report.to_message()}}}]}}
    obj = one(obj, deployments=deployments, qualification_job=job, qualification_pods=[pod])  # → Shadow
    assert obj["status"]["phase"] == "Shadow", obj["status"].get("message")
    obj.pop("_ready")
    scope = Scope("llm-serving", "llama-3-1-8b", "60s", "mirror")
    assert spec.spec is not None
    # Windows that pass, fail (every value 50), cannot be read, hold no data (NaN), and overload both arms (twice,
    # past the hold limit): every limit consulted.
    verdicts: list[str] = []
    for value, fail, overload in ((None, False, False), (50.0, False, False), (None, True, False),
                                  (float("nan"), False, False), (None, False, True), (None, False, True)):
        now += timedelta(minutes=30)
        window = observe(AnswersEverything(now, value, fail, overload), scope, spec.spec.slos)
        obj = one(obj, deployments=deployments, window=window)
        obj.pop("_ready")
        verdicts.append(obj["status"]["lastAnalysis"]["verdict"])
    assert verdicts == ["pass", "fail", "error", "inconclusive", "overload", "overload"], verdicts
    # The last canary step passes: a promotion, guarded for promotionGraceSeconds.
    last = copy.deepcopy(obj)
    last["status"].update(phase="Canary", step=len(spec.spec.rollout.canary_steps) - 1,
                          phaseSince="2026-01-01T00:00:00Z",
                          counters={"consecutiveSuccesses": spec.spec.analysis.success_streak - 1})
    now += timedelta(minutes=30)
    last = one(last, deployments=deployments, window=observe(AnswersEverything(now), scope, spec.spec.slos))
    assert last["status"]["phase"] == "Promoted" and last["status"]["guardUntil"], last["status"].get("message")
    # After a promotion the previous stable arm is kept warm for promotionGraceSeconds.
    promoted = copy.deepcopy(obj)
    promoted["status"].update(phase="Promoted", rollbackTarget=obj["spec"]["baseline"]["artifact"],
                              stableArtifact="oci://registry.example.com/m@sha256:" + "c" * 64)
    one(promoted, deployments=deployments)
    sp_planning.orphaned_on_delete(spec.spec)
    from quantrol_operator.observe import analysis

    analysis.due({"phase": "Shadow", "lastAnalysis": {"time": "2026-12-01T12:00:00Z"}}, spec.spec, now)
    analysis.source_for(spec.spec, "http://default:9090")
    _ = recorded


def test_every_spec_field_reaches_code(monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = spec_fields(QuantizedModelSpec) | spec_fields(ServingPolicySpec)
    # Validation reads fields too (cross-field rules): parse first, track only what the product does afterwards.
    QuantizedModelSpec.model_validate(_quantized_model()["spec"])
    recorded: set[tuple[str, str]] = set()
    _track(monkeypatch, recorded)
    _run_quantized_model()
    _run_serving_policy(recorded)
    monkeypatch.undo()
    unread = sorted(f"{model}.{field}" for model, field in wanted - recorded - REFUSED_UNTIL_BUILT)
    assert unread == [], f"spec fields no code reads: {unread}"


# Fields declared in the API but not built yet: refused at admission (CRD CEL and `quantrol validate` alike), so no
# spec that sets them is ever accepted and silently ignored.
REFUSED_UNTIL_BUILT = {("Quantization", "sensitivity_scan")}


@pytest.mark.parametrize(("path", "value", "words"), [
    (("quantization", "sensitivityScan"), True, "not built yet"),
])
def test_fields_not_built_yet_are_refused_at_admission(path: tuple[str, str], value: Any, words: str) -> None:
    from quantrol_operator.validation import validate_object

    obj = _quantized_model()
    obj["spec"][path[0]][path[1]] = value
    errors = [str(e) for e in validate_object(obj)]
    assert any(words in e and path[1] in e for e in errors), errors


def test_the_walk_finds_nested_fields() -> None:
    """The check above is only as good as the walk: it must see fields several models deep, in lists and unions."""
    fields = spec_fields(ServingPolicySpec)
    assert {("CanaryStep", "min_dwell_seconds"), ("CustomSlo", "query"), ("PrometheusEndpoint", "address"),
            ("BatchBudget", "max_num_seqs"), ("SloFloor", "min_relative_to_stable")} <= fields
    assert ("Toleration", "toleration_seconds") in spec_fields(QuantizedModelSpec)
