"""`quantrol-worker qualify` for real: GuideLLM (the serve environment's) drives ENGINE STAND-INS (not vLLM; the
real-engine golden check is in tests/test_real_engines.py) through the Quantrol router the Job starts with the
policy's admission bounds; the evaluation prompts and the tokenizer come from a real OCI registry by digest.

What is played here: the calibration that would have written the golden record. The stable stand-in's own
`prompt_logprobs` are recorded as the baseline's golden log-probabilities (a stand-in has no weights to calibrate),
so a candidate stand-in that answers like it reproduces the reference, and one with `deviation` does not.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quantrol_dev.localstack.registry import RegistryServer
from quantrol_dev.standin import VOCAB, standin_process, tokenize
from quantrol_worker import contracts as c
from quantrol_worker import oci
from quantrol_worker.golden import GoldenTally
from quantrol_worker.qualify import golden_check

SERVE_PYTHON = os.environ.get("QUANTROL_SERVE_PYTHON")
REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"
# A word-level tokenizer over the stand-in's vocabulary: GuideLLM counts prompt tokens with it (offline, local).
MAKE_TOKENIZER = r"""
import sys
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
words = sys.argv[2].split()
vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *words])}
tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(sys.argv[1])
"""


CONSTANT_RUN = r"""
import sys
from pathlib import Path
from quantrol_worker.qualify import load
if __name__ == "__main__":
    run = load.run(sys.argv[1], Path(sys.argv[2]), ["ka lo mi"], 4, Path(sys.argv[3]), rate=0.2, seconds=3)
    print(len(run.requests), run.requests[0].ok, run.requests[0].ttft)
"""


@pytest.fixture(scope="module")
def stable() -> Iterator[str]:
    with standin_process(MODEL, token_latency=0.01) as url:
        yield url


@pytest.fixture(scope="module")
def artifact(stable: str, oci_registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An artifact holding a tokenizer and evaluation prompts whose golden record is the stable stand-in's."""
    if not SERVE_PYTHON:
        pytest.skip("QUANTROL_SERVE_PYTHON is unset: GuideLLM lives in the serve environment (.ci/setup makes it)")
    folder = tmp_path_factory.mktemp("artifact")
    proc = subprocess.run([SERVE_PYTHON, "-c", MAKE_TOKENIZER, str(folder), " ".join(VOCAB)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    slices = []
    for name, offset in (("prose", 0), ("code", 200)):
        prompts, tally = [], GoldenTally()
        for i in range(4):
            text = " ".join(VOCAB[(offset + 7 * i + j) % 256] for j in range(24))
            ids = tokenize(text)
            answer = golden_check.post_json(f"{stable}/v1/completions", {
                "model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": c.GOLDEN_TOP_K})
            positions = golden_check.engine_positions(answer, ids, c.GOLDEN_TOP_K)
            ranked = [sorted(p.top.items(), key=lambda kv: -kv[1]) for p in positions]
            golden = c.GoldenLogprobs(target_logprobs=[p.target_logprob for p in positions],
                                      top_ids=[[t for t, _ in r] for r in ranked],
                                      top_logprobs=[[lp for _, lp in r] for r in ranked])
            tally.add(golden, positions)
            prompts.append(c.EvaluationPrompt(text=text, token_ids=ids, baseline=golden))
        slices.append(c.SlicePrompts(slice=name, prompts=prompts, reference=tally.figures(name)))
    doc = c.EvaluationPrompts(slices=slices)
    (folder / c.EVALUATION_PROMPTS_FILE).write_text(doc.model_dump_json(by_alias=True, exclude_none=True))
    ref = oci.push(folder, f"{oci_registry.address}/tests/qualify", insecure=True, tag=None, annotations={})
    return f"oci://{ref}"


def qualify(tmp_path: Path, artifact: str, arms: dict[str, str], **overrides: Any) -> dict[str, Any]:
    assert SERVE_PYTHON
    config: dict[str, Any] = {
        "model": MODEL,
        "arms": [{"arm": role, "url": url, "artifact": artifact} for role, url in arms.items()],
        "promptsArtifact": artifact,
        # The test registry speaks plain HTTP: the install policy's list, as the operator passes it.
        "registries": {"plainHttp": [artifact.removeprefix("oci://").split("/", 1)[0]]}, "outputTokens": 8,
        "regimes": {"floorRequests": 4, "floorMaxSeconds": 10, "sweepRates": 2, "secondsPerRate": 2,
                    "overloadFactor": 1.5, "overloadSeconds": 2, "recoverySeconds": 5},
        # Generous: two shared cores carry this test beside others; the refusals below set their own limits.
        "limits": {"ttftSeconds": 2.0, "itlSeconds": 0.5, "queueWaitSeconds": 1.0},
        "admission": {"maxInFlight": 4, "maxQueue": 4, "maxQueueWaitSeconds": 0.5},
        "minGoodputRatio": 0.3,  # two stand-ins of one speed: the ratio's rule has its own unit tests
        "workDir": str(tmp_path / "work"), "terminationMessagePath": str(tmp_path / "termination-log"),
        **overrides,
    }
    c.QualificationConfig.model_validate(config)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(REPO / "worker"), "HF_HUB_OFFLINE": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.run([SERVE_PYTHON, "-m", "quantrol_worker.cli", "qualify", "--config", str(path)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    message = (tmp_path / "termination-log").read_text() if (tmp_path / "termination-log").exists() else ""
    assert message, proc.stderr[-4000:]
    assert len(message.encode()) <= c.TERMINATION_MESSAGE_LIMIT
    report: dict[str, Any] = json.loads(message)
    return report


@pytest.mark.serve
def test_a_healthy_candidate_is_qualified_with_every_regime_measured(stable: str, artifact: str,
                                                                     tmp_path: Path) -> None:
    with standin_process(MODEL, token_latency=0.01) as url:
        report = qualify(tmp_path, artifact, {"candidate": url, "stable": stable})
    assert report["reason"] == "Qualified", report["message"]
    assert report["tool"] == "guidellm 0.8.1"
    assert [g["slice"] for g in report["golden"]] == ["prose", "code"] and all(g["passed"] for g in report["golden"])
    assert report["goldenSource"] == "artifact"
    for arm in report["arms"]:
        regimes = {r["regime"]: r for r in arm["regimes"]}
        assert set(regimes) == {"floor", "sustainable", "overload"}, arm
        floor, sustainable, overload = regimes["floor"], regimes["sustainable"], regimes["overload"]
        assert floor["requests"] == 4 and floor["ttftP50Seconds"] > 0 and floor["itlP99Seconds"] > 0
        assert sustainable["rateRps"] > 0 and sustainable["goodputTokensPerEngineSecond"] > 0
        assert "queueWaitP99Seconds" in sustainable and "rejectedFraction" in sustainable
        assert overload["rateRps"] > sustainable["rateRps"] * 1.4 and overload["recoverySeconds"] is not None
    assert report["goodputRatio"] > 0 and report["requiredGoodputRatio"] == 0.3


@pytest.mark.serve
def test_a_candidate_over_its_ttft_slo_one_request_at_a_time_is_refused(stable: str, artifact: str,
                                                                       tmp_path: Path) -> None:
    # fault: every first token 1.2 s, limit 0.5 s
    with standin_process(MODEL, token_latency=0.01, prefill_latency=1.2) as url:
        report = qualify(tmp_path, artifact, {"candidate": url, "stable": stable},
                         limits={"ttftSeconds": 0.5, "itlSeconds": 0.5})
    assert report["reason"] == "QualificationFailed"
    assert report["message"].startswith("regime floor") and "ttftP99" in report["message"], report["message"]
    (arm,) = report["arms"]
    assert arm["arm"] == "candidate" and [r["regime"] for r in arm["regimes"]] == ["floor"], "nothing after the floor"
    assert arm["regimes"][0]["ttftP99Seconds"] > 1.0


@pytest.mark.serve
def test_a_candidate_without_one_first_token_in_the_floor_bound_is_refused_naming_ttft(stable: str, artifact: str,
                                                                                      tmp_path: Path) -> None:
    """FP8_DYNAMIC on a CPU, played by a stand-in: nothing comes back within the floor's bound at all (GuideLLM then
    compiles no benchmark); that is a TTFT breach to name, not a failed measurement."""
    with standin_process(MODEL, prefill_latency=8.0) as url:
        report = qualify(tmp_path, artifact, {"candidate": url, "stable": stable},
                         regimes={"floorRequests": 2, "floorMaxSeconds": 3}, limits={"ttftSeconds": 0.5})
        # At a constant rate nothing finishes either: GuideLLM compiles no benchmark, the run says so.
        assert SERVE_PYTHON
        tokenizer = tmp_path / "work" / "artifact"  # what the Job pulled from the artifact
        constant = subprocess.run([SERVE_PYTHON, "-c", CONSTANT_RUN, url, str(tokenizer), str(tmp_path)],
                                  capture_output=True,
                                  text=True, timeout=120, check=False,
                                  env={**os.environ, "PYTHONPATH": str(REPO / "worker"), "HF_HUB_OFFLINE": "1"})
    assert constant.stdout.strip().splitlines()[-1:] == ["1 False None"], constant.stderr[-2000:]
    assert report["reason"] == "QualificationFailed", report["message"]
    assert report["message"] == "regime floor (one request at a time): ttftP99: no first token within the run's " \
                                "3 s > 0.5 s"


@pytest.mark.serve
def test_a_candidate_that_computes_something_else_is_refused_by_the_golden_check(stable: str, artifact: str,
                                                                                  tmp_path: Path) -> None:
    # fault: its greedy token differs at half the positions
    with standin_process(MODEL, token_latency=0.01, deviation=0.5) as url:
        report = qualify(tmp_path, artifact, {"candidate": url, "stable": stable})
    assert report["reason"] == "GoldenOutputMismatch", report["message"]
    assert "slice prose" in report["message"] and "top1" in report["message"]
    (arm,) = report["arms"]  # the floor (bounded) comes first; nothing after the golden check refused it
    assert [r["regime"] for r in arm["regimes"]] == ["floor"] and arm["regimes"][0]["passed"], arm
    golden = {g["slice"]: g for g in report["golden"]}
    assert golden["prose"]["top1"] < golden["prose"]["referenceTop1"] - 0.2 and not golden["code"]["passed"]


def test_the_golden_check_is_bounded_and_no_scored_prompt_never_passes() -> None:
    """Pure: a golden check out of time scores nothing more, and a slice with nothing scored fails (no data never
    reads as pass). `post` stands for the engine and counts what it was asked."""
    golden = c.GoldenLogprobs(target_logprobs=[-0.1], top_ids=[[5]], top_logprobs=[[-0.1]])
    prompts = c.EvaluationPrompts(slices=[
        c.SlicePrompts(slice=name, reference=c.SliceQuality(slice=name, mean_kl_divergence=0.0, top1_agreement=1.0,
                                                            perplexity_ratio=1.0),
                       prompts=[c.EvaluationPrompt(text="a b", token_ids=[1, 5], baseline=golden)] * 3)
        for name in ("prose", "code")])
    asked: list[Any] = []

    def post(url: str, body: dict[str, Any]) -> Any:
        asked.append(body)
        return {"choices": [{"prompt_logprobs": [None, {"5": {"logprob": -0.1, "rank": 1}}]}]}

    assert all(g.passed for g in golden_check.check("http://engine", MODEL, prompts, c.GoldenTolerance(), post))
    assert len(asked) == 6 and asked[0]["prompt"] == [1, 5] and asked[0]["temperature"] == 0
    out_of_time = golden_check.check("http://engine", MODEL, prompts, c.GoldenTolerance(), post, max_seconds=0)
    assert len(asked) == 6 and [g.passed for g in out_of_time] == [False, False]
    assert out_of_time[0].failed == ["no reference or no scored tokens"]


def test_regime_figures_and_judgements() -> None:
    """Pure: goodput counts only requests within both deadlines; each breach is named with its unit; the floor is
    judged on latency alone; a rate refusing more than 1 % is not sustainable; no first token is a TTFT breach."""
    from quantrol_worker.qualify import regimes as rg

    limits = c.LatencyLimits(ttft_seconds=1.0, itl_seconds=0.1, queue_wait_seconds=0.5)
    samples = [rg.RequestSample(start=0, ok=True, ttft=0.5, itl=0.05, output_tokens=10),
               rg.RequestSample(start=1, ok=True, ttft=2.0, itl=0.05, output_tokens=10),  # late first token
               rg.RequestSample(start=2, ok=True, ttft=0.5, itl=0.3, output_tokens=10),  # slow tokens
               rg.RequestSample(start=3, ok=False, rejected=True)]
    fig = rg.figures(c.Regime.SUSTAINABLE, rg.LoadRun(samples, seconds=5.0, rate_rps=0.8, queue_wait_p99=0.9),
                     limits, engines=2)
    assert fig.goodput_tokens_per_engine_second == 1.0 and fig.output_tokens_per_second == 6.0  # 10 / (5 s × 2)
    assert fig.rejected_fraction == 0.25 and fig.ttft_p99_seconds == 2.0
    judged = rg.judge(fig, limits, 5.0)
    assert not judged.passed and judged.failed == ["ttftP99: 2 s > 1 s", "interTokenLatencyP99: 0.3 s > 0.1 s",
                                                   "queueTimeP99: 0.9 s > 0.5 s", "rejected: 0.25 > 0.01 answered 429"]
    floor = rg.judge(fig.model_copy(update={"regime": c.Regime.FLOOR}), limits, 5.0)
    assert [f.split(":")[0] for f in floor.failed] == ["ttftP99", "interTokenLatencyP99"]
    silent = rg.figures(c.Regime.FLOOR, rg.LoadRun([rg.RequestSample(start=0, ok=False)], seconds=20.0), limits, 1)
    assert rg.judge(silent, limits, 20.0).failed == ["ttftP99: no first token within the run's 20 s > 1 s"]
    assert rg.next_rate([], [], 2.0) == 2.0 and rg.next_rate([2.0], [], 2.0) == 4.0
    assert rg.next_rate([2.0, 4.0], [8.0], 2.0) == 6.0
    after = [rg.RequestSample(start=0, ok=True, ttft=3.0), rg.RequestSample(start=3.5, ok=True, ttft=0.1)]
    assert rg.recovery_seconds(after, floor_ttft_p50=0.1) == 3.6 and rg.recovery_seconds(after[:1], 0.1) is None


def _ladder(capacity: float, start: float, rungs: int) -> tuple[list[float], list[float]]:
    """The rates an arm that sustains up to `capacity` req/s runs, passed and failed."""
    from quantrol_worker.qualify import regimes as rg

    passed: list[float] = []
    failed: list[float] = []
    while (rate := rg.next_rung(passed, failed, start, rungs)) is not None:
        (passed if rate <= capacity else failed).append(rate)
    return passed, failed


def test_the_sweep_measures_each_arm_at_a_rate_it_sustained_when_the_ladder_starts_too_high() -> None:
    """CI on 2 cores once had both arms fail the first rate (36.2 req/s) and the stable arm alone pass the bisected
    second (27.1): with two rates and no more, the candidate's sustainable goodput read 0 and the ratio 0 ×."""
    from quantrol_worker.qualify import regimes as rg

    assert rg.next_rate([], [2.0, 1.5], 2.0) == 1.125  # no pass yet: halfway to half the lowest failure
    assert _ladder(100.0, 36.2, 2) == ([36.2, 72.4], [])  # climbing: sweepRates rates, no more
    assert _ladder(30.0, 36.2, 2) == ([27.15], [36.2])
    passed, failed = _ladder(22.0, 36.2, 2)  # one bisection further down: the extra rungs find it
    assert failed == [36.2, 27.15] and passed == [20.362]
    assert _ladder(5.0, 36.2, 2) == ([], [36.2, 27.15, 20.362, 15.271])  # bounded: 2 × sweepRates at most
    assert _ladder(50.0, 36.2, 1) == ([36.2], [])
