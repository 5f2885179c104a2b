"""Kernel verification on real engines: vLLM's CPU build under `quantrol-worker serve`, tiny Llama models.

W8A8 must be verified `native` (CPUInt8ScaledMMLinearKernel), the bf16 baseline `native` (dense), and W8A16 refused
as `none` with exit code 3 and a KernelUnavailable termination message naming the layer, well before any readiness
timeout. Four vLLM starts in all, never more than two at once (≈3 GB each on 2 cores): W8A16 alone first, then
bf16 and W8A8 side by side (the router's teacher-forced comparison on sampled traffic, with its control), then, once
bf16 stopped, a corrupted copy of the model beside W8A8 (the comparison must see it).

Needs two environments (their pins conflict, ARCHITECTURE.md): QUANTROL_CALIBRATE_PYTHON builds the tiny model and
quantizes it with llm-compressor (round-to-nearest, no calibration data: kernel choice depends on the scheme, not
on the scales); QUANTROL_SERVE_PYTHON runs the launcher and vLLM. The tiny model is deliberately undertrained (four
steps, ≈15 s to build: quality is not what is tested here) and has a 4096-token vocabulary: with tinymodel's default
of 2048, vLLM CPU 0.32's worker dies with SIGILL (exit -4) at the first request on this machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quantrol_dev.tinyquant import QUANTIZE

pytestmark = pytest.mark.serve

SERVE_PYTHON = os.environ.get("QUANTROL_SERVE_PYTHON")
CALIBRATE_PYTHON = os.environ.get("QUANTROL_CALIBRATE_PYTHON")
SKIP_REASON = (
    "REAL-ENGINE TIER SKIPPED: set QUANTROL_SERVE_PYTHON (vLLM CPU) and QUANTROL_CALIBRATE_PYTHON (llm-compressor), "
    "e.g. `. /tmp/fresh-venvs/env.sh` after .ci/setup"
)
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300.0  # ≈25 s on an idle 2-core machine; several times that when other suites share the cores

BUILD = """
import json, sys
from pathlib import Path
from quantrol_worker.tinymodel import TinySpec, build
spec = TinySpec(vocab_size=4096, steps=4, prose_chars=200_000, code_chars=200_000)
print(json.dumps(build(Path(sys.argv[1]), spec)))
"""
# A damaged artifact: the bf16 model with Gaussian noise of each Linear weight's own spread added (seeded), and its
# final norm scaled ten-fold: the four-step model's next-token distributions are nearly flat, and noise alone leaves
# them so (a KL of 0.001 over the full vocabulary, measured), while a corrupted scale makes them confidently wrong.
CORRUPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
with torch.no_grad():
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight
            w.add_(torch.randn_like(w) * w.float().std().to(w.dtype))
    model.model.norm.weight.mul_(10)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
"""


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO / "worker"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not (SERVE_PYTHON and CALIBRATE_PYTHON):
        pytest.skip(SKIP_REASON)
    assert CALIBRATE_PYTHON
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("real-engines")
    build = subprocess.run([CALIBRATE_PYTHON, "-c", BUILD, str(tmp / "tiny")],
                           capture_output=True, text=True, env=_env(tmp), timeout=900, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    base = Path(json.loads(build.stdout.strip().splitlines()[-1])["model_dir"])
    quant = subprocess.run([CALIBRATE_PYTHON, "-c", QUANTIZE, str(base), str(tmp), "W8A8", "W8A16"],
                           capture_output=True, text=True, env=_env(tmp), timeout=600, check=False)
    assert quant.returncode == 0, quant.stderr[-3000:]
    corrupt = subprocess.run([CALIBRATE_PYTHON, "-c", CORRUPT, str(base), str(tmp / "corrupted")],
                             capture_output=True, text=True, env=_env(tmp), timeout=600, check=False)
    assert corrupt.returncode == 0, corrupt.stderr[-3000:]
    print(f"\n[real-engines] tiny model + W8A8/W8A16/corrupted ready in {time.monotonic() - started:.1f}s",
          file=sys.stderr)
    data = Path(json.loads(build.stdout.strip().splitlines()[-1])["calibration_jsonl"])
    return {"bf16": base, "W8A8": tmp / "W8A8", "W8A16": tmp / "W8A16", "corrupted": tmp / "corrupted", "data": data}


class Served:
    """One `quantrol-worker serve` around one vLLM, on free ports; its output goes to a log file."""

    def __init__(self, tmp: Path, name: str, model: Path, scheme: str) -> None:
        assert SERVE_PYTHON
        self.name, self.status_port, self.port = name, _free_port(), _free_port()
        self.termination = tmp / f"{name}.termination"
        self.log_path = tmp / f"{name}.log"
        self.started = time.monotonic()
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [SERVE_PYTHON, "-m", "quantrol_worker.cli", "serve", "--target", "cpu-x86", "--scheme", scheme,
             "--status-host", "127.0.0.1", "--status-port", str(self.status_port),
             "--termination-log", str(self.termination), "--",
             "--model", str(model), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(self.port),
             "--enforce-eager",
             "--max-model-len", "256", "--max-num-seqs", "4"],
            stdout=self._log, stderr=subprocess.STDOUT, env=_env(tmp),
        )

    def kernels(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/kernels", timeout=5) as r:
            return dict(json.loads(r.read()))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def wait_serving(self) -> float:
        deadline = self.started + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.kernels()["phase"] == "serving":
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not serving after {START_TIMEOUT:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def test_w8a16_is_refused_as_kernel_unavailable(models: dict[str, Path], tmp_path: Path) -> None:
    """Runs first and alone: vLLM dies at load; the launcher says why and exits 3 instead of hanging."""
    served = Served(tmp_path, "w8a16", models["W8A16"], "W8A16")
    try:
        code = served.proc.wait(START_TIMEOUT)
    finally:
        served.stop()
    elapsed = time.monotonic() - served.started
    print(f"\n[real-engines] W8A16 refused after {elapsed:.1f}s", file=sys.stderr)
    assert code == 3, served.tail()
    message = json.loads(served.termination.read_text())
    assert (message["reason"], message["verdict"], message["scheme"]) == ("KernelUnavailable", "none", "W8A16")
    assert message["layer"], message  # the Linear vLLM was building when it gave up
    assert any("CPUWNA16LinearKernel" in k for k in message["kernels"]), message
    assert "Failed to find a kernel that can implement the WNA16 linear layer" in served.log_path.read_text()


@pytest.fixture(scope="module")
def engines(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    tmp = tmp_path_factory.mktemp("engines")
    served = {"bf16": Served(tmp, "bf16", models["bf16"], "unquantized"),
              "W8A8": Served(tmp, "w8a8", models["W8A8"], "W8A8")}
    try:
        for name, s in served.items():
            print(f"\n[real-engines] {name} serving after {s.wait_serving():.1f}s", file=sys.stderr)
        yield served
    finally:
        for s in served.values():
            s.stop()


def _complete(port: int) -> str:
    body = json.dumps({"model": "m", "prompt": "The licence", "max_tokens": 4, "temperature": 0}).encode()
    models_url = f"http://127.0.0.1:{port}/v1/models"
    with urllib.request.urlopen(models_url, timeout=10) as r:
        name = json.loads(r.read())["data"][0]["id"]
    body = body.replace(b'"model": "m"', json.dumps({"model": name})[1:-1].encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(json.loads(r.read())["choices"][0]["text"])


def test_w8a8_kernels_verified_native(engines: dict[str, Served]) -> None:
    w8a8 = engines["W8A8"]
    status = w8a8.kernels()
    assert (status["verdict"], status["verified"], status["family"]) == ("native", True, "CPUInt8ScaledMMLinearKernel")
    assert status["kernels"][0]["subject"] == "CompressedTensorsW8A8Int8"
    assert (
        'quantrol_engine_kernel_info{family="CPUInt8ScaledMMLinearKernel",kernel="CPUInt8ScaledMMLinearKernel",'
        'kv_cache_dtype="auto",scheme="W8A8",verdict="native"} 1.0'
    ) in w8a8.metrics()
    assert isinstance(_complete(w8a8.port), str)  # verified and actually answering


def test_bf16_baseline_is_native_dense(engines: dict[str, Served]) -> None:
    status = engines["bf16"].kernels()
    assert (status["scheme"], status["verdict"], status["family"], status["kernels"]) == (
        "unquantized", "native", "dense", [])


class RouterRun:
    """`quantrol-worker route` in front of two real engines, everything mirrored and compared teacher-forced."""

    def __init__(self, tmp: Path, stable_port: int, candidate_port: int) -> None:
        self.tmp, self.port = tmp, _free_port()
        config = {"version": 1, "mirror_fraction": 1.0, "arms": {
            "stable": {"url": f"http://127.0.0.1:{stable_port}", "weight": 100},
            "candidate": {"url": f"http://127.0.0.1:{candidate_port}", "weight": 0}}}
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "router.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen([sys.executable, "-m", "quantrol_worker.cli", "route", "--config",
                                      str(tmp / "router.json"), "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=(tmp / "router.log").open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)

    def send(self, n: int, temperature: float) -> list[dict[str, Any]]:
        answers = []
        for i in range(n):
            body = json.dumps({"model": "tiny", "prompt": f"The licence {i} grants", "max_tokens": 8,
                               "temperature": temperature, "stream": i % 2 == 1}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                answers.append({"stream": i % 2 == 1, "body": r.read().decode()})
        return answers

    def compared(self, n: int) -> dict[str, float]:
        """The comparison's sums once `n` requests are compared (mirrors and scorings run after the answers)."""
        figures: dict[str, float] = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            figures = {name: sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                 if line.startswith(f"quantrol_router_{name}") and (match in line))
                       for name, match in (("compare_positions_total", ""), ("compare_kl_nats_total", ""),
                                           ("compare_top1_matches_total", ""),
                                           ("compared_total", 'result="accepted"'),
                                           ("compared_total{", 'result="rejected"'))}
            figures["rejected"] = figures.pop("compared_total{")
            if figures["compared_total"] + figures["rejected"] >= n:
                break
            time.sleep(1)
        return figures

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(30)
        return (self.tmp / "router.log").read_text()[-3000:]


def test_router_in_front_of_real_engines_compares_sampled_traffic(engines: dict[str, Served], tmp_path: Path) -> None:
    """The router over real HTTP against real vLLM CPU servers, traffic sampled at temperature 0.8 (half streamed,
    half not: the router streams those from the engine and assembles the answer).

    The control: the bf16 arm compared with itself scores KL ≈ 0 and top-1 agreement ≈ 1 although every answer was
    sampled (vLLM's decode-time and prefill-time log-probabilities agree). W8A8 against bf16: close, and accepted.
    Checks what only real engines can tell: vLLM's token ids, top-k log-probabilities keyed `token_id:<id>` and prompt
    log-probabilities have the shapes the comparison expects.
    """
    bf16, w8a8 = engines["bf16"].port, engines["W8A8"].port
    results: dict[str, dict[str, float]] = {}
    for name, candidate in (("control", bf16), ("W8A8", w8a8)):
        router = RouterRun(tmp_path / name, bf16, candidate)
        try:
            for answer in router.send(6, temperature=0.8):
                if not answer["stream"]:
                    # The client gets exactly what it asked for: no token ids or log-probabilities it did not ask.
                    choice = json.loads(answer["body"])["choices"][0]
                    assert choice["text"] and choice.get("token_ids") is None and choice.get("logprobs") is None
            results[name] = router.compared(6)
        finally:
            log = router.stop()
        # Every request compared (an end-of-sequence token may end an answer before its 8 tokens).
        figures = results[name]
        assert figures["compared_total"] + figures["rejected"] == 6 and figures["compare_positions_total"] >= 6, (
            results, log)
    for name, figures in results.items():
        positions = figures["compare_positions_total"]
        results[name] = {"kl": figures["compare_kl_nats_total"] / positions,
                         "agreement": figures["compare_top1_matches_total"] / positions,
                         "accepted": figures["compared_total"], "rejected": figures["rejected"]}
    print(f"\n[real-engines] teacher-forced at temperature 0.8: {results}", file=sys.stderr)
    assert results["control"]["kl"] < 1e-3 and results["control"]["agreement"] >= 0.99, results
    assert results["W8A8"]["kl"] < 0.05 and results["W8A8"]["agreement"] >= 0.9, results
    assert results["W8A8"]["rejected"] == 0, results


def test_sigterm_is_forwarded_and_vllm_stops(engines: dict[str, Served]) -> None:
    bf16 = engines["bf16"]
    started = time.monotonic()
    code = bf16.stop()
    print(f"\n[real-engines] bf16 stopped in {time.monotonic() - started:.1f}s", file=sys.stderr)
    assert code == 0, bf16.tail()
    assert "forwarding to vLLM" in bf16.log_path.read_text()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", bf16.port)) != 0  # vLLM's port is closed: the engine is gone too


def test_a_corrupted_arm_shows_clearly_on_sampled_traffic(models: dict[str, Path], engines: dict[str, Served],
                                                          tmp_path: Path) -> None:
    """After bf16 stopped (the previous test), a corrupted arm starts beside W8A8 (never more than two engines): its
    answers to the same sampled traffic, scored teacher-forced, are far from W8A8's."""
    corrupted = Served(tmp_path, "corrupted", models["corrupted"], "unquantized")
    try:
        corrupted.wait_serving()
        router = RouterRun(tmp_path / "router", engines["W8A8"].port, corrupted.port)
        try:
            router.send(6, temperature=0.8)
            figures = router.compared(6)
        finally:
            log = router.stop()
    finally:
        corrupted.stop()
    positions = figures["compare_positions_total"]
    kl, agreement = figures["compare_kl_nats_total"] / positions, figures["compare_top1_matches_total"] / positions
    print(f"\n[real-engines] corrupted vs W8A8 at temperature 0.8: KL {kl:.3f}, agreement {agreement:.2f}",
          file=sys.stderr)
    # Clearly: whole nats per token (W8A8 and the control sit below 1e-3) and no request quality-accepted.
    assert positions > 0 and kl > 0.5, (figures, log)
    assert figures["rejected"] >= 4 and figures["compared_total"] == 0, figures


# --- the golden-output check on a real engine (issue 18) ---------------------------------------------------------

GOLDEN = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
from quantrol_worker.calibrate.data import load_slices
from quantrol_worker.calibrate.evaluate import evaluation_prompts, load_model
from quantrol_worker.contracts import DataConfig, EvaluationPrompts, EvaluationPromptsPolicy, SliceConfig
base, candidate, data, out = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(base)
config = DataConfig(uri=data, max_sequence_length=64,
                    slices=[SliceConfig(name=n, samples=2, eval_samples=6) for n in ("prose", "code")])
slices, _ = load_slices(config, tok)
b, c = load_model(Path(base)), load_model(Path(candidate))
policy = EvaluationPromptsPolicy(max_per_slice=6, max_tokens=64)
doc = EvaluationPrompts(slices=[evaluation_prompts(b, c, tok, s, policy, 64) for s in slices])
Path(out).write_text(doc.model_dump_json(by_alias=True, exclude_none=True))
"""
# After calibration, someone rescales the MLP output of every layer: a different model under a valid digest.
ALTER = """
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:3]
shutil.copytree(src, dst)
path = Path(dst) / "model.safetensors"
tensors = load_file(str(path))
for key in [k for k in tensors if k.endswith("mlp.down_proj.weight_scale")]:
    tensors[key] = tensors[key] * 4
save_file(tensors, str(path), metadata={"format": "pt"})
"""


@pytest.fixture(scope="module")
def golden_prompts(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What calibration ships with the W8A8 artifact: held-out prompts, the bf16 baseline's golden record and the
    W8A8 checkpoint's reference figures on them (quantrol_worker.calibrate.evaluate, as the calibration Job runs it)."""
    assert CALIBRATE_PYTHON
    tmp = tmp_path_factory.mktemp("golden")
    out = tmp / "quantrol-evaluation-prompts.json"
    proc = subprocess.run([CALIBRATE_PYTHON, "-c", GOLDEN, str(models["bf16"]), str(models["W8A8"]),
                           str(models["data"]), str(out)], capture_output=True, text=True, env=_env(tmp),
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_w8a8_engine_reproduces_calibrations_golden_figures(engines: dict[str, Served],
                                                                golden_prompts: Path) -> None:
    """The healthy case of the golden-output check: vLLM's W8A8 kernel, teacher-forced on the artifact's prompts,
    agrees with what transformers measured for the same checkpoint, within the default tolerance."""
    from quantrol_worker.contracts import EvaluationPrompts, GoldenTolerance
    from quantrol_worker.qualify import golden_check

    prompts = EvaluationPrompts.read(golden_prompts)
    result = golden_check.check(f"http://127.0.0.1:{engines['W8A8'].port}", "tiny", prompts, GoldenTolerance())
    print(f"\n[real-engines] golden W8A8: {[g.model_dump(exclude_none=True) for g in result]}", file=sys.stderr)
    assert [g.slice for g in result] == ["prose", "code"]
    assert all(g.passed for g in result), result


def test_weights_altered_after_calibration_are_refused_as_golden_output_mismatch(
        models: dict[str, Path], engines: dict[str, Served], golden_prompts: Path, oci_registry: Any,
        tmp_path: Path) -> None:
    """Runs last: bf16 is stopped by then, so the altered engine is the second one running. The altered checkpoint
    is published with its own (valid) digest, fetched and verified as a serving pod does, served by vLLM, and the
    qualification Job refuses it by the golden check, naming the slice: one request at a time it answers in time,
    so only what it computes gives it away."""
    assert CALIBRATE_PYTHON and SERVE_PYTHON
    altered = tmp_path / "altered"
    proc = subprocess.run([CALIBRATE_PYTHON, "-c", ALTER, str(models["W8A8"]), str(altered)], capture_output=True,
                          text=True, env=_env(tmp_path), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (altered / golden_prompts.name).write_bytes(golden_prompts.read_bytes())
    from quantrol_worker import oci

    ref = "oci://" + oci.push(altered, f"{oci_registry.address}/tests/w8a8-altered", insecure=True, tag=None,
                              annotations={})
    fetched = tmp_path / "fetched"
    fetch = subprocess.run([SERVE_PYTHON, "-m", "quantrol_worker.cli", "fetch", "--ref", ref, "--dest", str(fetched),
                            "--termination-log", str(tmp_path / "fetch.termination"), "--insecure"],
                           capture_output=True, text=True, env=_env(tmp_path), timeout=300, check=False)
    assert fetch.returncode == 0, fetch.stderr[-3000:]  # every byte verified against the digest: nothing to see
    served = Served(tmp_path, "w8a8-altered", fetched, "W8A8")
    try:
        served.wait_serving()
        config = {"model": "tiny", "promptsArtifact": ref, "registries": {"plainHttp": [oci_registry.address]},
                  "arms": [{"arm": "candidate", "url": f"http://127.0.0.1:{served.port}", "artifact": ref}],
                  "workDir": str(tmp_path / "qualify"), "terminationMessagePath": str(tmp_path / "qualify.term")}
        (tmp_path / "qualify.json").write_text(json.dumps(config))
        proc = subprocess.run([SERVE_PYTHON, "-m", "quantrol_worker.cli", "qualify", "--config",
                               str(tmp_path / "qualify.json")], capture_output=True, text=True,
                              env=_env(tmp_path), timeout=600, check=False)
    finally:
        served.stop()
    assert (tmp_path / "qualify.term").is_file(), (proc.returncode, proc.stderr[-3000:])
    report = json.loads((tmp_path / "qualify.term").read_text())
    print(f"\n[real-engines] altered: {report['message']}", file=sys.stderr)
    assert report["reason"] == "GoldenOutputMismatch", (report, proc.stderr[-3000:])
    assert "slice prose" in report["message"] or "slice code" in report["message"]
    (arm,) = report["arms"]  # the floor answered in time (no SLO set here); nothing ran after the golden check
    assert [r["regime"] for r in arm["regimes"]] == ["floor"], arm
    bad = [g for g in report["golden"] if not g["passed"]]
    assert bad and all(g["meanKl"] > g["referenceMeanKl"] for g in bad)
