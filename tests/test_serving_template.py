"""The serving arms for a real GPU pool, as the pure planner builds them: tensor parallelism, a tainted pool, shared
memory, probes sized for a 70B load, model storage, a KV cache per arm, registry credentials, and what the install
policy allows. The pod specs and vLLM flags are asserted as a kubelet and vLLM would read them."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantrol_operator.children import serving
from quantrol_operator.planning.servingpolicy import Images, SpObserved, SpPlan, plan, read_spec
from quantrol_operator.policy import InstallPolicy
from quantrol_operator.validation import validate_object

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
IMAGES = Images("serve:test", "router:test", "tools:test")
BASELINE = "oci://registry.example.com/models/llama-70b-bf16@sha256:" + "a" * 64
CANDIDATE = "oci://registry.example.com/models/llama-70b-w4a16@sha256:" + "c" * 64
GIB = 1 << 30


def policy_70b(**serving_edits: Any) -> dict[str, Any]:
    """The 8B sample reshaped for a 70B: bf16 baseline on 8 GPUs, its 4-bit candidate on 4, a tainted H100 pool."""
    obj = yaml.safe_load((ROOT / "e2e/samples/servingpolicy-llama-8b.yaml").read_text())
    obj["metadata"].update(name="llama-70b", uid="uid-sp", generation=1, annotations={})
    obj["spec"]["baseline"] = {"artifact": BASELINE, "tensorParallelSize": 8}
    obj["spec"]["candidate"] = {"quantizedModelRef": {"name": "llama-70b-w4a16"}}
    template = obj["spec"]["serving"]
    template.pop("tensorParallelSize")
    template["resources"] = {"requests": {"cpu": 16, "memory": "200Gi"}, "limits": {"memory": "320Gi"}}
    template["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                               {"key": "pool", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}]
    term = {"topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"quantrol.io/servingpolicy": "llama-70b"}}}
    template["affinity"] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": term}]}}
    template["maxLoadSeconds"] = 2700
    template["storage"] = {"medium": "EphemeralVolume", "size": "300Gi", "storageClassName": "fast-nvme"}
    template["engineArgs"] = ["--gpu-memory-utilization", "0.92", "--enable-prefix-caching"]
    template.update(serving_edits)
    return obj


def quantized_model(tp: int = 4, kv: str = "fp8", size: int = 38 * GIB, secret: str | None = "push-creds") -> dict:
    spec: dict[str, Any] = {"quantization": {"scheme": "W4A16", "tensorParallelSize": tp, "kvCacheScheme": kv},
                            "artifact": {"repository": "registry.example.com/models/llama-70b-w4a16"}}
    if secret:
        spec["artifact"]["credentialsSecretRef"] = {"name": secret}
    return {"metadata": {"name": "llama-70b-w4a16", "generation": 1}, "spec": spec,
            "status": {"phase": "Ready", "observedGeneration": 1,
                       "artifact": {"ref": CANDIDATE.removeprefix("oci://"), "sizeBytes": size},
                       "conditions": [{"type": "QualityQualified", "status": "True", "reason": "Succeeded"},
                                      {"type": "Ready", "status": "True", "reason": "Succeeded"}]}}


def run(obj: dict[str, Any], qm: dict[str, Any] | None = None, install: InstallPolicy | None = None) -> SpPlan:
    """One pass under `install` (the operator's built-in policy when None), its refusals read as the observer does."""
    install = install or InstallPolicy()
    observed = SpObserved(obj=obj, spec=read_spec(obj, install), quantized_model=qm or quantized_model(), now=T0)
    return plan(observed, IMAGES, None, install)


def arm(result: SpPlan, ref: str) -> dict[str, Any]:
    name = serving.arm_name("llama-70b", ref)
    return next(o for o in result.apply if o["kind"] == "Deployment" and o["metadata"]["name"] == name)


def pod(result: SpPlan, ref: str) -> dict[str, Any]:
    return dict(arm(result, ref)["spec"]["template"]["spec"])


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]] if c["name"] == name)


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_a_70b_candidate_on_a_tainted_pool_gets_tensor_parallel_gpus_tolerations_and_affinity() -> None:
    result = run(policy_70b())
    assert result.status["phase"] == "Pending", result.status.get("message")
    spec = pod(result, CANDIDATE)
    engine = container(spec, "engine")
    args = engine["command"]
    assert flag(args, "--tensor-parallel-size") == "4"  # from the QuantizedModel: the serving spec says nothing
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {t.get("value") for t in spec["tolerations"]} == {None, "h100"}
    assert spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 100
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert args[-3:] == ["--gpu-memory-utilization", "0.92", "--enable-prefix-caching"]


def test_the_baseline_arm_may_differ_and_keeps_the_higher_precision_configuration() -> None:
    result = run(policy_70b())
    base, cand = container(pod(result, BASELINE), "engine"), container(pod(result, CANDIDATE), "engine")
    assert flag(base["command"], "--tensor-parallel-size") == "8"
    assert base["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert flag(base["command"], "--kv-cache-dtype") is None  # the bf16 baseline's own: auto
    assert flag(cand["command"], "--kv-cache-dtype") == "fp8"  # the candidate's calibrated fp8 scales
    arms = {a["settings"]: a for a in result.status["arms"]}
    assert arms["baseline"]["tensorParallelSize"] == 8 and arms["baseline"]["kvCacheDtype"] == "auto"
    assert arms["candidate"]["kvCacheDtype"] == "fp8" and arms["candidate"]["gpus"] == 4
    assert arms["candidate"]["engineArgs"] == cand["command"][cand["command"].index("--") + 1:]
    explicit = run(policy_70b(kvCacheDtype="fp8_e5m2"))  # the spec overrides the QuantizedModel for the candidate
    assert flag(container(pod(explicit, CANDIDATE), "engine")["command"], "--kv-cache-dtype") == "fp8_e5m2"


def test_shared_memory_probes_and_readiness_are_sized_for_a_long_load() -> None:
    spec = pod(run(policy_70b()), CANDIDATE)
    engine = container(spec, "engine")
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "7Gi"}  # 1Gi + 2Gi per extra rank, TP 4
    assert {"name": "dshm", "mountPath": "/dev/shm"} in engine["volumeMounts"]
    startup = engine["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2700  # maxLoadSeconds
    assert "initialDelaySeconds" not in engine["livenessProbe"]  # liveness starts only after the startup probe
    assert engine["readinessProbe"]["httpGet"] == {"path": "/ready", "port": serving.LAUNCHER_PORT_NAME}
    default = pod(run(policy_70b(maxLoadSeconds=1800, sharedMemorySize=None)), CANDIDATE)
    assert container(default, "engine")["startupProbe"]["failureThreshold"] * 10 >= 1800


def test_model_storage_is_a_claim_per_pod_and_the_fetch_refuses_what_cannot_fit() -> None:
    spec = pod(run(policy_70b()), BASELINE)
    model = next(v for v in spec["volumes"] if v["name"] == "model")
    claim = model["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "300Gi" and claim["storageClassName"] == "fast-nvme"
    fetch = container(spec, "fetch")["command"]
    assert flag(fetch, "--max-bytes") == str(300 * GIB)


def test_an_empty_dir_is_sized_from_the_artifact_manifest_and_an_unknown_size_says_so() -> None:
    result = run(policy_70b(storage={"medium": "EmptyDir"}))
    cand = pod(result, CANDIDATE)
    wanted = -(-(38 * GIB * 11 // 10 + GIB) // (1 << 20))  # + 10% and 1 GiB, in MiB rounded up
    assert next(v for v in cand["volumes"] if v["name"] == "model")["emptyDir"] == {"sizeLimit": f"{wanted}Mi"}
    assert container(cand, "engine")["resources"]["requests"]["ephemeral-storage"] == f"{wanted}Mi"
    assert container(pod(result, BASELINE), "engine")["resources"]["requests"].get("ephemeral-storage") is None
    arms = {a["settings"]: a for a in result.status["arms"]}
    assert "unbounded" in arms["baseline"]["storage"] and "spec.serving.storage.size" in arms["baseline"]["storage"]


def test_the_arms_fetch_with_the_credentials_and_pull_images_with_the_pull_secrets() -> None:
    result = run(policy_70b(imagePullSecrets=[{"name": "ngc-pull"}]))
    for ref in (BASELINE, CANDIDATE):
        spec = pod(result, ref)
        fetch = container(spec, "fetch")
        config = flag(fetch["command"], "--registry-config")
        mount = next(m for m in fetch["volumeMounts"] if m["name"] == "registry-credentials")
        assert config == f"{mount['mountPath']}/config.json" and mount["readOnly"]
        secret = next(v for v in spec["volumes"] if v["name"] == "registry-credentials")["secret"]
        assert secret["secretName"] == "registry-credentials"  # the spec's, over the QuantizedModel's push Secret
        assert spec["imagePullSecrets"] == [{"name": "ngc-pull"}]
        assert "--insecure" not in fetch["command"]
    router = next(o for o in result.apply if o["kind"] == "Deployment" and o["metadata"]["name"] == "llama-70b-router")
    assert router["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "ngc-pull"}]
    inherited = policy_70b()
    del inherited["spec"]["serving"]["artifactCredentialsSecretRef"]
    spec = pod(run(inherited), CANDIDATE)
    assert next(v for v in spec["volumes"] if v["name"] == "registry-credentials")["secret"]["secretName"] == \
        "push-creds"  # the candidate QuantizedModel's
    anonymous = pod(run(inherited, quantized_model(secret=None)), CANDIDATE)
    assert flag(container(anonymous, "fetch")["command"], "--registry-config") is None


def test_the_stock_vllm_image_runs_the_launcher_the_tools_image_delivered() -> None:
    spec = pod(run(policy_70b()), CANDIDATE)
    launcher, fetch, engine = (container(spec, n) for n in ("launcher", "fetch", "engine"))
    assert [c["name"] for c in spec["initContainers"]] == ["launcher", "fetch"]
    assert launcher["image"] == fetch["image"] == "tools:test" and engine["image"] == "vllm/vllm-openai:v0.32.0"
    assert launcher["command"] == ["quantrol-worker", "install-launcher", "--dest", serving.LAUNCHER_DIR]
    assert engine["command"][:4] == ["python3", "-m", "quantrol_worker", "serve"]
    assert {"name": "PYTHONPATH", "value": serving.LAUNCHER_DIR} in engine["env"]


def test_plain_http_fetch_only_for_registries_the_install_policy_lists() -> None:
    local = "oci://registry.ci.svc:5000/models/bf16@sha256:" + "b" * 64
    obj = policy_70b()
    obj["spec"]["baseline"]["artifact"] = local
    refused = container(pod(run(obj), local), "fetch")["command"]
    listed = InstallPolicy.model_validate({"registries": {"plainHttp": ["registry.ci.svc"]}})
    allowed = container(pod(run(obj, install=listed), local), "fetch")["command"]
    assert "--insecure" not in refused and "--insecure" in allowed


def test_engine_flags_beyond_the_install_policy_change_nothing_and_name_the_entry() -> None:
    result = run(policy_70b(engineArgs=["--enforce-eager", "--trust-remote-code"]))
    assert result.apply == [] and "spec.serving.engineArgs[1]: vLLM flag --trust-remote-code" in \
        result.status["message"]
    wider = InstallPolicy.model_validate({"workloads": {"engineFlags": ["--enforce-eager", "--trust-remote-code"]}})
    assert run(policy_70b(engineArgs=["--enforce-eager", "--trust-remote-code"]), install=wider).apply


def test_a_gpu_limit_that_disagrees_with_the_derived_tensor_parallel_size_is_refused_in_status() -> None:
    obj = policy_70b()
    del obj["spec"]["baseline"]["tensorParallelSize"]
    obj["spec"]["serving"]["resources"]["limits"]["nvidia.com/gpu"] = 2
    result = run(obj)  # the QuantizedModel says tensor parallel 4: admission could not know
    assert result.apply == []
    assert "limits['nvidia.com/gpu'] is 2" in result.status["message"] and "tensor-parallel size is 4" in \
        result.status["message"]


@pytest.mark.parametrize(("edit", "field"), [
    ({"tensorParallelSize": 4, "resources": {"limits": {"nvidia.com/gpu": 2}}}, "spec.serving.tensorParallelSize"),
    ({"engineArgs": ["--port", "9000"]}, "spec.serving.engineArgs"),
    ({"engineArgs": ["--tensor-parallel-size=2"]}, "spec.serving.engineArgs"),
    ({"storage": {"medium": "EphemeralVolume"}}, "spec.serving.storage.size"),
    ({"storage": {"medium": "EmptyDir", "storageClassName": "fast"}}, "spec.serving.storage.storageClassName"),
])
def test_inconsistent_templates_are_refused_at_admission_naming_the_field(edit: dict[str, Any], field: str) -> None:
    obj = policy_70b()
    del obj["metadata"]["uid"], obj["metadata"]["generation"]
    obj["spec"]["serving"].update(edit)
    errors = [str(e) for e in validate_object(obj)]
    assert any(e.startswith(field) for e in errors), errors


def test_the_baseline_tensor_parallel_size_and_a_shared_gpu_limit_must_agree() -> None:
    obj = policy_70b()
    obj["spec"]["serving"]["resources"]["limits"]["nvidia.com/gpu"] = 4
    errors = [str(e) for e in validate_object(copy.deepcopy(obj))]
    assert any(e.startswith("spec.baseline.tensorParallelSize") for e in errors), errors


def test_a_promoted_candidate_keeps_its_flags_after_its_quantized_model_moves_on() -> None:
    first = run(policy_70b())
    promoted = policy_70b()
    promoted["status"] = {**first.status, "phase": "Promoted", "stableArtifact": CANDIDATE,
                          "rollbackTarget": BASELINE}
    newer = quantized_model(tp=2, kv="none")
    newer["status"]["artifact"]["ref"] = "registry.example.com/models/llama-70b-w4a16@sha256:" + "d" * 64
    again = run(promoted, newer)
    engine = container(pod(again, CANDIDATE), "engine")
    assert flag(engine["command"], "--tensor-parallel-size") == "4" and flag(engine["command"], "--kv-cache-dtype") == \
        "fp8"


def test_a_stable_arm_the_registry_refused_says_why_in_its_condition() -> None:
    obj = policy_70b()
    refused = ('{"phase":"Failed","reason":"RegistryUnauthorized","message":"manifest …: registry.example.com '
               'answered HTTP 401 Unauthorized: it refused the credentials given for registry.example.com"}')
    observed = SpObserved(obj=obj, spec=read_spec(obj), quantized_model=quantized_model(), now=T0,
                          stable_failed=refused)
    status = plan(observed, IMAGES).status
    stable = next(c for c in status["conditions"] if c["type"] == "StableReady")
    assert stable["status"] == "False" and stable["reason"] == "FetchFailed"
    assert "RegistryUnauthorized" in stable["message"] and "401" in stable["message"]


def test_quantrol_status_shows_each_arm_and_why_one_cannot_start() -> None:
    from quantrol_operator.cli.statusview import render_servingpolicy

    obj = policy_70b()
    from quantrol_operator.api.servingpolicy import EngineReport

    reported = {CANDIDATE: EngineReport(version="0.11.0", device="cuda", image="docker.io/vllm/vllm-openai@sha256:e")}
    observed = SpObserved(obj=obj, spec=read_spec(obj), quantized_model=quantized_model(), now=T0,
                          stable_failed='{"reason":"InsufficientStorage","message":"needs 150 GB"}',
                          engine_reports=reported)
    text = render_servingpolicy({**obj, "status": plan(observed, IMAGES).status})
    assert "arm aaaaaaaaaaaa (baseline settings, 2 replicas): tensor parallel 8, 8 GPU, KV cache auto" in text
    assert "arm cccccccccccc (candidate settings, 2 replicas): tensor parallel 4, 4 GPU, KV cache fp8" in text
    assert "StableReady: FetchFailed" in text and "InsufficientStorage" in text
    # What the candidate's engine reported, under its arm; the stable arm's engine has not reported.
    engines = [line.strip() for line in text.splitlines() if line.strip().startswith("engine ")]
    assert engines == ["engine 0.11.0 on cuda, image docker.io/vllm/vllm-openai@sha256:e"], text
