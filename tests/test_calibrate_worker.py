"""The calibration worker end to end, for real: torch on the CPU, a tiny Llama the session trains, llm-compressor.

The worker runs in its own environment (llm-compressor pins conflict with the serving engine's and with this dev
environment, which has no torch): set QUANTROL_CALIBRATE_PYTHON to that environment's python
(`.ci/setup` creates `.venvs/calibrate`). Every worker call is a subprocess of that python; these tests only read
what it writes (termination message, quantrol-report.json, checkpoint files, registry blobs).

QUANTROL_TINY_CACHE (optional) keeps the trained tiny model between sessions; by default it is trained once per
session in a temp dir (about a minute on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantrol_dev.localstack.registry import RegistryServer
from quantrol_worker import contracts as c

CALIBRATE_PYTHON = os.environ.get("QUANTROL_CALIBRATE_PYTHON")
SKIP_REASON = (
    "QUANTROL_CALIBRATE_PYTHON is unset: the calibration worker tests need the calibrate environment "
    "(torch CPU + llm-compressor), e.g. QUANTROL_CALIBRATE_PYTHON=.venvs/calibrate/bin/python"
)
REPO = Path(__file__).resolve().parents[1]

# Small on purpose: the whole file must stay within a few minutes on 2 shared cores.
SLICES = [{"name": "prose", "samples": 8, "evalSamples": 12}, {"name": "code", "samples": 8, "evalSamples": 12}]
GATE = {"maxMeanKlDivergence": 0.02, "minTop1Agreement": 0.9, "maxPerplexityIncrease": 0.05}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "worker")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def calib(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    assert CALIBRATE_PYTHON
    return subprocess.run(
        [CALIBRATE_PYTHON, *args], capture_output=True, text=True, env=_env(), timeout=timeout, check=False
    )


def _last_json(stdout: str) -> Any:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not CALIBRATE_PYTHON:
        pytest.skip(SKIP_REASON)
    cache = Path(os.environ.get("QUANTROL_TINY_CACHE") or tmp_path_factory.mktemp("tiny-model"))
    proc = calib("-m", "quantrol_worker.tinymodel", "--out", str(cache), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info: dict[str, Any] = _last_json(proc.stdout)
    return info


def run_worker(tmp: Path, tiny: dict[str, Any], **overrides: Any) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Run `quantrol-worker calibrate`; returns (exit code, termination message, report)."""
    config: dict[str, Any] = {
        "baseModel": f"file://{tiny['model_dir']}",
        "quantization": {"scheme": "W8A8", "method": "rtn", "target": "cpu-x86"},
        "calibration": {"uri": tiny["calibration_jsonl"], "maxSequenceLength": 96, "slices": SLICES},
        "evaluation": {"sampleGenerations": 1, "maxNewTokens": 8, "promptTokens": 16},
        "qualityGate": GATE,
        "workDir": str(tmp / "work"),
        "terminationMessagePath": str(tmp / "termination-log"),
    }
    config.update(overrides)
    c.CalibrationConfig.model_validate(config)  # the contract accepts what the test writes
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = calib("-m", "quantrol_worker.cli", "calibrate", "--config", str(path))
    term_path = tmp / "termination-log"
    assert term_path.exists(), proc.stderr[-3000:]
    message = term_path.read_text()
    assert len(message.encode()) <= c.TERMINATION_MESSAGE_LIMIT
    report = json.loads((tmp / "work" / c.REPORT_FILE).read_text())
    return proc.returncode, json.loads(message), report


SECRET = "jane.doe@example.com"  # planted in every prose line: it must never leave the calibration Job


def with_secret(jsonl: str, out: Path) -> str:
    """The tiny model's calibration data with an e-mail address in every prose line."""
    lines = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    for line in lines:
        if line["slice"] == "prose":
            line["text"] = f"Write to {SECRET} about this. " + line["text"]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(out)


@pytest.fixture(scope="session")
def w8a8(tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("w8a8")
    data = with_secret(tiny["calibration_jsonl"], tmp / "calibration.jsonl")
    rc, term, report = run_worker(
        tmp, tiny, calibration={"uri": data, "maxSequenceLength": 96, "slices": SLICES})
    assert rc == 0, term
    return {"dir": tmp, "term": term, "report": report, "checkpoint": tmp / "work" / "checkpoint"}


def by_slice(quality: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {q["slice"]: q for q in quality}


# --- torch-free contract tests (run everywhere) ---


def test_enums_share_values_with_the_operator_api() -> None:
    """The operator's API speaks the worker's vocabulary (it re-exports these from quantrol_worker.contracts)."""
    from quantrol_operator.api import quantizedmodel

    api: dict[str, Any] = vars(quantizedmodel)
    for ours in (c.Scheme, c.Method, c.Target, c.KvCacheScheme):
        assert {e.value for e in ours} == {e.value for e in api[ours.__name__]}, ours.__name__
    assert {s.value: {m.value for m in ms} for s, ms in c.METHODS_BY_SCHEME.items()} == {
        s.value: {m.value for m in ms} for s, ms in api["METHODS_BY_SCHEME"].items()
    }
    assert {p.value for p in c.WorkerPhase} <= {p.value for p in api["QuantizedModelPhase"]}
    assert set(c.QualityLimits.model_fields) == set(api["QualityLimits"].model_fields)


def test_termination_message_fits_4k_whatever_the_input() -> None:
    result = c.TerminationResult(
        phase=c.WorkerPhase.REJECTED,
        reason=c.CalibrationReason.QUALITY_GATE_FAILED,
        message="x" * 10_000,
        artifact_ref="registry.example.com/models/m@sha256:" + "a" * 64,
        quality=[
            c.SliceHeadline(slice=f"slice-{i:02d}", mean_kl=0.123456789, top1=0.9, failed=["maxMeanKlDivergence"])
            for i in range(64)
        ],
    )
    text = result.to_message()
    assert len(text.encode()) <= 4096
    back = c.TerminationResult.from_message(text)
    assert back.phase is c.WorkerPhase.REJECTED and back.artifact_ref == result.artifact_ref
    assert back.quality, "some slices survive the cut"


def test_one_redaction_vocabulary_and_bounded_prompts_file(tmp_path: Path) -> None:
    """The router's diff samples and the artifact's prompts redact with the same default patterns; a pattern that
    does not compile is refused naming it; a prompts file over the limit is refused before it is parsed."""
    from quantrol_worker.router.config import DiffsConfig

    defaults = list(c.DEFAULT_REDACT_PATTERNS)
    assert DiffsConfig().redact_patterns == defaults == c.EvaluationPromptsPolicy().redact_patterns
    with pytest.raises(ValueError, match=r"redact pattern '\(unclosed' does not compile"):
        c.EvaluationPromptsPolicy(redact_patterns=["(unclosed"])
    import re

    text, n = c.redact("mail jane@example.com, card 4111 1111 1111 1111", [re.compile(p) for p in defaults])
    assert n == 2 and "jane" not in text and "4111" not in text
    path = tmp_path / c.EVALUATION_PROMPTS_FILE
    path.write_text(c.EvaluationPrompts(slices=[c.SlicePrompts(slice="a")]).model_dump_json(by_alias=True))
    assert c.EvaluationPrompts.read(path).for_slice("a") is not None
    with pytest.raises(ValueError, match="over the 16-byte limit"):
        c.EvaluationPrompts.read(path, max_bytes=16)


def test_golden_score_is_zero_for_the_same_distribution_and_grows_with_damage() -> None:
    from quantrol_worker.golden import CandidatePosition, GoldenTally

    golden = c.GoldenLogprobs(target_logprobs=[-0.5, -1.0], top_ids=[[1, 2], [3, 4]],
                              top_logprobs=[[-0.5, -1.2], [-0.3, -1.0]])
    same = GoldenTally()
    same.add(golden, [CandidatePosition({1: -0.5, 2: -1.2}, -0.5), CandidatePosition({3: -0.3, 4: -1.0}, -1.0)])
    figures = same.figures("s")
    assert figures.mean_kl_divergence == 0 and figures.top1_agreement == 1 and figures.perplexity_ratio == 1
    worse = GoldenTally()
    worse.add(golden, [CandidatePosition({2: -0.2, 7: -2.0}, -2.0), CandidatePosition({3: -0.9, 4: -0.6}, -1.5)])
    figures = worse.figures("s")
    assert (figures.mean_kl_divergence or 0) > 0.3 and figures.top1_agreement == 0
    assert (figures.perplexity_ratio or 0) > 2


def test_config_refuses_what_admission_refuses() -> None:
    base = {"baseModel": "file:///m", "calibration": {"uri": "/d.jsonl", "slices": [{"name": "a"}]}}
    with pytest.raises(ValueError, match="does not fit scheme"):
        c.CalibrationConfig.model_validate({**base, "quantization": {"scheme": "FP8_DYNAMIC", "method": "gptq"}})
    with pytest.raises(ValueError, match="groupSize"):
        c.CalibrationConfig.model_validate({**base, "quantization": {"scheme": "W8A8", "groupSize": 64}})
    cfg = c.CalibrationConfig.model_validate({**base, "quantization": {"scheme": "W4A16"}})
    assert cfg.quantization.effective_group_size == 128
    assert cfg.quantization.ignore == ["lm_head"]
    gate = cfg.quality_gate.merged(c.QualityLimits(min_top1_agreement=0.5))
    assert gate.min_top1_agreement == 0.5 and gate.max_mean_kl_divergence == 0.05


# --- the worker for real ---


@pytest.mark.calibrate
def test_hf_models_come_from_the_mounted_cache_offline_as_the_job_sets_it(tmp_path: Path) -> None:
    """The Job mounts spec.baseModel.huggingFaceCache and sets HF_HUB_CACHE and HF_HUB_OFFLINE
    (children/calibration.py); the worker then finds the pinned revision there, and refuses without offline mode."""
    if not CALIBRATE_PYTHON:
        pytest.skip(SKIP_REASON)
    from quantrol_operator.api.quantizedmodel import QuantizedModelSpec
    from quantrol_operator.children.calibration import job as calibration_job

    sample = yaml.safe_load((REPO / "e2e/samples/quantizedmodel-llama-8b-w4a16.yaml").read_text())
    owner = {**sample, "metadata": {**sample["metadata"], "uid": "u", "generation": 1}}
    container = calibration_job(owner, QuantizedModelSpec.model_validate(sample["spec"]), "w")["spec"]["template"][
        "spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "hf-cache")
    uri = sample["spec"]["baseModel"]["uri"]
    repo, revision = uri.removeprefix("hf://").split("@")
    claim = tmp_path / "claim"  # the claim's contents: a hub cache under subPath `hub`
    snapshot = claim / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    local = {k: v.replace(mount, str(claim)) for k, v in env.items()}  # the mount, as the local runner maps it
    code = ("import sys; from pathlib import Path; from quantrol_worker.calibrate.sources import resolve_model; "
            "from quantrol_worker.calibrate import WorkerError\n"
            "try: print(resolve_model(sys.argv[1], Path(sys.argv[2])))\n"
            "except WorkerError as e: print('refused', e.reason.value, e.message)")
    found = subprocess.run([CALIBRATE_PYTHON or "", "-c", code, uri, str(tmp_path)], capture_output=True, text=True,
                           env={**_env(), **local}, timeout=120, check=False)
    assert found.stdout.strip() == str(snapshot), found.stderr[-2000:]
    online = subprocess.run([CALIBRATE_PYTHON or "", "-c", code, uri, str(tmp_path)], capture_output=True, text=True,
                            env={**_env(), **local, "HF_HUB_OFFLINE": "0"}, timeout=120, check=False)
    assert online.stdout.startswith("refused BaseModelUnavailable") and "huggingFaceCache" in online.stdout


@pytest.mark.calibrate
def test_tiny_model_really_learnt(tiny: dict[str, Any]) -> None:
    for name, m in tiny["slices"].items():
        # A model that learnt nothing sits at (or above) the unigram perplexity.
        assert m["heldout_perplexity"] < 0.6 * m["unigram_perplexity"], (name, m)


@pytest.mark.calibrate
def test_w8a8_is_ready_with_a_full_report(w8a8: dict[str, Any]) -> None:
    term, report = w8a8["term"], w8a8["report"]
    assert term["phase"] == "Ready" and term["reason"] == "Succeeded" and term["gatePassed"] is True
    assert {q["slice"] for q in term["quality"]} == {"prose", "code"}
    env = report["envelope"]
    for key in ("baseModelDigest", "tokenizerDigest", "calibrationDataDigest", "recipe", "hardware"):
        assert env.get(key), key
    assert env["seed"] == 0
    assert {"torch", "transformers", "llmcompressor", "compressed-tensors"} <= set(env["toolVersions"])
    assert report["kernelCheck"]["family"] == "CPUInt8ScaledMMLinearKernel"
    assert all(check["passed"] for check in report["integrity"])
    assert len([s for s in report["scaleStats"] if s["kind"] == "weight"]) == 28  # 4 layers x 7 Linear, lm_head kept
    assert {s["slice"] for s in report["samples"]} == {"prose", "code"}
    assert report["checkpointBytes"] < report["baselineBf16Bytes"]
    ckpt = json.loads((w8a8["checkpoint"] / "config.json").read_text())
    assert ckpt["quantization_config"]["quant_method"] == "compressed-tensors"
    assert ckpt["quantization_config"]["ignore"] == ["lm_head"]


@pytest.mark.calibrate
def test_the_artifact_carries_its_evaluation_prompts_redacted(w8a8: dict[str, Any]) -> None:
    """Issue 17 item 2 (worker side): per slice, the held-out prompts the gate was measured on, redacted, with the
    baseline's golden log-probabilities and the candidate's reference figures on exactly those prompts."""
    term, report = w8a8["term"], w8a8["report"]
    path = w8a8["checkpoint"] / c.EVALUATION_PROMPTS_FILE
    summary = report["evaluationPrompts"]
    assert summary["published"] and summary["file"] == c.EVALUATION_PROMPTS_FILE
    from quantrol_worker.oci import sha256_file

    assert summary["digest"] == sha256_file(path)
    prompts = c.EvaluationPrompts.read(path)
    quality = by_slice(report["quality"])
    assert {s.slice for s in prompts.slices} == {"prose", "code"}
    assert summary["prompts"] == {s.slice: len(s.prompts) for s in prompts.slices}
    assert term["evaluationPrompts"] == sum(summary["prompts"].values())
    for shipped in prompts.slices:
        assert len(shipped.prompts) == quality[shipped.slice]["samples"], "every held-out prompt is shipped"
        for prompt in shipped.prompts:
            assert prompt.baseline is not None
            assert len(prompt.baseline.target_logprobs) == len(prompt.token_ids) - 1
            assert all(len(top) == prompts.top_k for top in prompt.baseline.top_ids)
        ref = shipped.reference
        assert ref is not None and ref.tokens and ref.top1_agreement is not None
        # The reference is the gate's own measurement, on the same prompts (top-k KL is a lower bound of the full).
        assert abs(ref.top1_agreement - quality[shipped.slice]["top1Agreement"]) < 0.05, (ref, quality)
        assert abs((ref.perplexity_ratio or 0) - quality[shipped.slice]["perplexityRatio"]) < 0.02, (ref, quality)
    prose = prompts.for_slice("prose")
    assert prose is not None and all(p.redactions >= 1 and c.REDACTED in p.text for p in prose.prompts)
    assert summary["redactedPrompts"] >= len(prose.prompts)
    assert summary["redactPatterns"] == len(c.DEFAULT_REDACT_PATTERNS)
    everything = path.read_text() + json.dumps(report)
    assert SECRET not in everything and "jane.doe" not in everything, "the planted address left the Job"


@pytest.mark.calibrate
def test_w4a16_rtn_measures_worse_than_w8a8(w8a8: dict[str, Any], tiny: dict[str, Any], tmp_path: Path) -> None:
    _rc, term, report = run_worker(
        tmp_path, tiny, quantization={"scheme": "W4A16", "method": "rtn", "target": "cpu-x86"}
    )
    assert term["reason"] in ("Succeeded", "QualityGateFailed"), term
    w4, w8 = by_slice(report["quality"]), by_slice(w8a8["report"]["quality"])
    for name in ("prose", "code"):
        assert w4[name]["meanKlDivergence"] > 3 * w8[name]["meanKlDivergence"], (w4[name], w8[name])
        assert w4[name]["top1Agreement"] < w8[name]["top1Agreement"]
    assert report["kernelCheck"]["family"] == "CPUWNA16LinearKernel"
    assert report["checkpointBytes"] < w8a8["report"]["checkpointBytes"]


@pytest.mark.calibrate
def test_kernel_precheck_fails_fast_naming_layer_and_rule(tiny: dict[str, Any], tmp_path: Path) -> None:
    rc, term, report = run_worker(
        tmp_path, tiny, quantization={"scheme": "W8A16", "method": "rtn", "target": "cpu-x86"}
    )
    assert rc == 0, "a rejection is a result, not a crash (no Job retry)"
    assert term["phase"] == "Rejected" and term["reason"] == "KernelIncompatible" and term["stage"] == "precheck"
    assert "model.layers.0.self_attn.q_proj" in term["message"]
    assert "WNA16" in term["message"]
    assert "calibrate" not in report["timings"], "no compute was spent"

    rc, term, _ = run_worker(
        tmp_path / "tp",
        tiny,
        quantization={"scheme": "W4A16", "method": "rtn", "target": "cuda-sm90", "tensorParallelSize": 4},
    )
    assert term["reason"] == "KernelIncompatible", term
    # k_proj has 2 KV heads x 64 = 128 outputs: 32 per shard at TP 4, below Machete's 128 and Marlin's 64
    assert term["message"].startswith("model.layers.0.self_attn.k_proj: MacheteLinearKernel"), term["message"]
    assert "out_features per partition = 32" in term["message"]


DAMAGE = r"""
import json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

base, src, dst, data, target, other, frac, factor = sys.argv[1:9]
frac, factor = float(frac), float(factor)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(base)
lines = [json.loads(line) for line in open(data)]
acts = {}

def hook(i, name):
    def record(_module, args):
        acts.setdefault((name, i), []).append(args[0][0].abs().mean(0))
    return record

# mean |activation| of every MLP intermediate channel (down_proj's input), per slice
for name in (target, other):
    handles = [l.mlp.down_proj.register_forward_pre_hook(hook(i, name)) for i, l in enumerate(model.model.layers)]
    for line in [x for x in lines if x["slice"] == name][:24]:
        ids = tok(line["text"], truncation=True, max_length=96, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            model(input_ids=ids)
    for h in handles:
        h.remove()
shutil.copytree(src, dst, dirs_exist_ok=True)
path = Path(dst) / "model.safetensors"
tensors = load_file(str(path))
shrunk = {}
for i in range(len(model.model.layers)):
    mine = torch.stack(acts[(target, i)]).mean(0)
    theirs = torch.stack(acts[(other, i)]).mean(0)
    idx = torch.topk(mine / (theirs + 1e-6), int(frac * mine.numel())).indices
    key = f"model.layers.{i}.mlp.up_proj.weight_scale"
    tensors[key][idx] *= factor  # small, positive, finite: every integrity check still passes
    shrunk[key] = int(idx.numel())
save_file(tensors, str(path), metadata={"format": "pt"})
print(json.dumps(shrunk))
"""


@pytest.mark.calibrate
def test_per_slice_gate_rejects_damage_to_one_slice_only(
    w8a8: dict[str, Any], tiny: dict[str, Any], tmp_path: Path
) -> None:
    damaged = tmp_path / "damaged"
    proc = calib(
        "-c", DAMAGE, tiny["model_dir"], str(w8a8["checkpoint"]), str(damaged), tiny["calibration_jsonl"],
        "code", "prose", "0.1", "0.05",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(n > 0 for n in _last_json(proc.stdout).values())
    proc = calib(
        "-m", "quantrol_worker.calibrate", "evaluate", "--config", str(w8a8["dir"] / "config.yaml"),
        "--candidate", str(damaged),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _last_json(proc.stdout)
    assert all(check["passed"] for check in out["integrity"]), out["integrity"]
    quality = by_slice(out["quality"])
    undamaged = by_slice(w8a8["report"]["quality"])
    assert undamaged["code"]["passed"] and undamaged["prose"]["passed"]
    assert quality["prose"]["passed"] is True, quality["prose"]
    assert quality["code"]["passed"] is False, quality["code"]
    assert quality["code"]["failedLimits"]
    assert quality["code"]["meanKlDivergence"] > 3 * quality["prose"]["meanKlDivergence"]


@pytest.mark.calibrate
def test_fp8_dynamic_with_calibrated_kv_cache_scales(tiny: dict[str, Any], tmp_path: Path) -> None:
    _rc, term, report = run_worker(
        tmp_path,
        tiny,
        quantization={"scheme": "FP8_DYNAMIC", "method": "rtn", "target": "cuda-sm90", "kvCacheScheme": "fp8"},
        qualityGate={"maxMeanKlDivergence": 0.5},
    )
    assert term["phase"] == "Ready", term
    checks = {check["name"]: check for check in report["integrity"]}
    assert checks["kv-scales-present"]["passed"], checks
    kv = [s for s in report["scaleStats"] if s["kind"] in ("k", "v")]
    assert len(kv) == 8 and all(s["minScale"] > 0 for s in kv)
    assert report["kernelCheck"]["family"] == "CutlassFP8ScaledMMLinearKernel"
    ckpt = json.loads((tmp_path / "work" / "checkpoint" / "config.json").read_text())
    assert ckpt["quantization_config"]["kv_cache_scheme"]["type"] == "float"


def _push(registry: RegistryServer, folder: str | Path, repository: str, credentials: Path) -> str:
    """Publish `folder` with the worker's own push, as a user would publish a base model or a dataset."""
    code = ("import sys; from pathlib import Path; from quantrol_worker import oci; "
            "print(oci.push(Path(sys.argv[1]), sys.argv[2], insecure=False, tag='v1', annotations={}, "
            "credentials=Path(sys.argv[3])))")
    proc = calib("-c", code, str(folder), f"{registry.address}/{repository}", str(credentials))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = proc.stdout.strip().splitlines()[-1]
    assert "@sha256:" in ref
    return ref


@pytest.mark.calibrate
def test_private_registry_base_model_and_data_in_artifact_out_and_corruption_detected(
    secure_registry: RegistryServer, tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry that refuses anonymous clients (htpasswd over TLS): the base model and the calibration data come
    from it by digest and the artifact goes to it, all with one docker config; without it nothing is calibrated."""
    registry = secure_registry
    assert registry.login is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(registry.login.ca_path))  # the worker's pod trusts the CA
    credentials = registry.write_docker_config(tmp_path / "docker" / "config.json")
    base_ref = _push(registry, tiny["model_dir"], "models/tiny-base", credentials)
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "calibration.jsonl").write_bytes(Path(tiny["calibration_jsonl"]).read_bytes())
    data_ref = _push(registry, tmp_path / "dataset", "datasets/tiny-calibration", credentials)

    rc, term, _report = run_worker(tmp_path / "anonymous", tiny, artifact={
        "repository": f"{registry.address}/models/tiny-w8a8"})
    assert rc == 1 and term["reason"] == "RegistryUnauthorized" and term["stage"] == "publish", term
    assert registry.address in term["message"] and "401" in term["message"], term
    assert "nothing was calibrated" in term["message"] and not (tmp_path / "anonymous" / "work" / "checkpoint").exists()

    _rc, term, report = run_worker(
        tmp_path,
        tiny,
        baseModel=f"oci://{base_ref}",
        calibration={"uri": f"oci://{data_ref}", "maxSequenceLength": 96, "slices": SLICES},
        artifact={"repository": f"{registry.address}/models/tiny-w8a8"},
        registries={"credentialsFile": str(credentials)},
    )
    assert term["phase"] == "Ready", term
    ref = term["artifactRef"]
    assert ref.startswith(f"{registry.address}/models/tiny-w8a8@sha256:") and term["digest"] == ref.split("@")[1]
    assert report["envelope"]["baseModelUri"] == f"oci://{base_ref}"
    assert report["envelope"]["calibrationDataDigest"], report["envelope"]

    pull = ("-m", "quantrol_worker.calibrate", "pull", ref, "--registry-config", str(credentials))
    proc = calib(*pull, "--out", str(tmp_path / "pulled"))
    pulled = _last_json(proc.stdout)
    assert pulled["ok"], pulled
    assert {"model.safetensors", "config.json", c.REPORT_FILE, c.EVALUATION_PROMPTS_FILE} <= set(pulled["files"])
    assert json.loads((tmp_path / "pulled" / c.REPORT_FILE).read_text())["phase"] == "Ready"
    # A reader of the prompts (qualification, the router's probes) brings that one file, verified, and no weights.
    only = (
        "import sys; from pathlib import Path; from quantrol_worker import oci, contracts as c; "
        "oci.pull(sys.argv[1], Path(sys.argv[2]), insecure=False, credentials=Path(sys.argv[3]), "
        "titles=frozenset({c.EVALUATION_PROMPTS_FILE})); "
        "print(len(c.EvaluationPrompts.read(Path(sys.argv[2]) / c.EVALUATION_PROMPTS_FILE).slices))"
    )
    proc = calib("-c", only, ref, str(tmp_path / "prompts-only"), str(credentials))
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr[-2000:]
    assert {p.name for p in (tmp_path / "prompts-only").iterdir()} == {c.EVALUATION_PROMPTS_FILE}

    # Corrupt the weights blob inside the registry's storage (same size, one byte flipped).
    manifest = json.loads((tmp_path / "pulled" / "config.json").read_text())  # sanity: the pull wrote real files
    assert manifest["model_type"] == "llama"
    weights = next(p for p in (tmp_path / "pulled").iterdir() if p.name == "model.safetensors").read_bytes()
    hexdigest = hashlib.sha256(weights).hexdigest()
    blob = registry.storage_dir / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    proc = calib(*pull, "--out", str(tmp_path / "again"))
    result = _last_json(proc.stdout)
    assert proc.returncode == 1 and not result["ok"], result
    assert result["reason"] == "DigestMismatch" and "model.safetensors" in result["message"], result
    assert not (tmp_path / "again" / "model.safetensors").exists(), "a corrupted blob is never left to be loaded"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))


@pytest.mark.calibrate
def test_w4a8_is_served_on_cpu_and_qualified(tiny: dict[str, Any], tmp_path: Path) -> None:
    rc, term, report = run_worker(tmp_path, tiny,
                                  quantization={"scheme": "W4A8", "method": "rtn", "target": "cpu-x86"})
    assert rc == 0 and term["phase"] == "Ready", term
    assert report["kernelCheck"]["verdict"] in ("native", "fallback")
    assert {q["slice"] for q in report["quality"]} == {s["name"] for s in SLICES}


@pytest.mark.calibrate
def test_a_rejected_calibration_still_publishes_its_evidence(
    oci_registry: RegistryServer, tiny: dict[str, Any], tmp_path: Path
) -> None:
    registry = oci_registry
    impossible = {"minTop1Agreement": 1.0, "maxMeanKlDivergence": 0.0}  # no 4-bit model meets these
    rc, term, _report = run_worker(
        tmp_path, tiny, quantization={"scheme": "W4A16", "method": "rtn", "target": "cpu-x86"},
        qualityGate=impossible, artifact={"repository": f"{registry.address}/models/tiny-w4a16"},
        registries={"plainHttp": [registry.address]},  # the install policy lists this plain-HTTP registry
    )
    assert rc == 0 and term["phase"] == "Rejected" and term["reason"] == "QualityGateFailed", term
    assert "artifactRef" not in term  # nothing servable was published
    ref = term["reportRef"]
    assert ref.startswith(f"{registry.address}/models/tiny-w4a16@sha256:"), term
    proc = calib("-m", "quantrol_worker.calibrate", "pull", ref, "--out", str(tmp_path / "evidence"), "--insecure")
    assert _last_json(proc.stdout)["ok"]
    evidence = json.loads((tmp_path / "evidence" / c.REPORT_FILE).read_text())
    assert evidence["phase"] == "Rejected" and all(q["passed"] is False for q in evidence["quality"])
    assert not (tmp_path / "evidence" / "model.safetensors").exists()
