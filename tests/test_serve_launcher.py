"""`quantrol-worker serve`: kernel-line parsing, verification against the shared table, and the launcher process.

The log lines below are copied from real vLLM CPU 0.32.0 start-ups on this machine (tiny Llama, `--enforce-eager`),
except where a constant says "from vLLM's source": those paths did not occur on this CPU and are replayed as the
source formats them. The launcher tests run the real launcher as a subprocess around a fake engine script that the
test owns (it prints captured lines, exits as told, and records the signals it receives): a stand-in for vLLM's
process behaviour, not for its kernels. Real engines are in tests/test_real_engines.py.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from quantrol_worker.contracts import KernelVerdict, Scheme, Target
from quantrol_worker.serve import main as serve_main
from quantrol_worker.serve.http import assessment_json
from quantrol_worker.serve.logparse import EventKind, parse_line
from quantrol_worker.serve.verify import KernelObserver, Mismatch, engine_facts

REPO = Path(__file__).resolve().parents[1]

# --- captured on this machine ---
W8A8_SELECTED = (
    "(Worker pid=4823) INFO 11-23 11:12:23 [__init__.py:846] "
    "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"
)
FP8_DYNAMIC_SELECTED = (
    "(Worker pid=5693) INFO 11-23 11:13:57 [__init__.py:797] "
    "Selected ChannelWiseTorchFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8"
)
READY = "INFO:     Application startup complete."
FP8_KV_INFO = (
    "(APIServer pid=5291) INFO 11-23 11:13:14 [cache.py:361] Using fp8 data type to store kv cache. It reduces the "
    "GPU memory footprint and boosts the performance. Meanwhile, it may cause accuracy drop without a proper scaling "
    "factor"
)
W4A16_MIXED = (
    "(Worker pid=8424) INFO 11-23 11:17:20 [__init__.py:923] Using CPUWNA16LinearKernel for mixed-precision linear"
)
_E = "(Worker pid=4822) ERROR 11-23 11:12:23 [multiproc_executor.py:953] "
W8A16_FAILURE = [
    _E + "    self.qkv_proj = QKVParallelLinear(",
    _E + "                    ^^^^^^^^^^^^^^^^^^",
    _E + '  File "/venv/lib/python3.11/site-packages/vllm/model_executor/layers/linear.py", line 519, in __init__',
    _E + "    self.quant_method.create_weights(",
    _E + '  File "/venv/lib/python3.11/site-packages/vllm/model_executor/layers/quantization/compressed_tensors/'
    'schemes/compressed_tensors_wNa16.py", line 135, in create_weights',
    _E + "    kernel_type = choose_mp_linear_kernel(mp_linear_kernel_config)",
    _E + "ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons: ",
    _E + " Dynamic4bitLinearKernel cannot implement due to: Unsupported quant type uint8b128",
    _E + " ZentorchWNA16LinearKernel cannot implement due to: ZentorchWNA16 requires an AMD Zen CPU.",
    _E + " CPUWNA16LinearKernel cannot implement due to: Quant type (uint8b128) not supported by CPUWNA16, "
    "supported types are: (ScalarType.uint4, ScalarType.uint4b8)",
    "(EngineCore pid=4590) ERROR 11-23 11:12:28 [core.py:1510] EngineCore failed to start.",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}",
]
# --- from vLLM's source (did not occur on this CPU) ---
MIXED_FROM_SOURCE = (
    "(Worker pid=1) INFO 01-01 00:00:00 [__init__.py:923] Using MarlinLinearKernel for mixed-precision linear"
)
FP8_MARLIN_FROM_SOURCE = (
    "(Worker pid=1) WARNING 01-01 00:00:00 [marlin_utils_fp8.py:109] Your GPU does not have native support for FP8 "
    "computation but FP8 quantization is being used. Weight-only FP8 compression will be used leveraging the Marlin "
    "kernel. This may degrade performance for compute-heavy workloads."
)
KV_SCALE_FROM_SOURCE = (
    "(Worker pid=1) WARNING 01-01 00:00:00 [kv_cache.py:163] Using KV cache scaling factor 1.0 for fp8_e4m3. If this "
    "is unintended, verify that k/v_scale scaling factors are properly set in the checkpoint."
)


def observe(observer: KernelObserver, lines: list[str]) -> KernelObserver:
    for line in lines:
        observer.feed(line, parse_line(line))
    return observer


# --- parsing ---


@pytest.mark.parametrize(
    ("line", "kind", "kernel", "subject"),
    [
        (W8A8_SELECTED, EventKind.SELECTED, "CPUInt8ScaledMMLinearKernel", "CompressedTensorsW8A8Int8"),
        (FP8_DYNAMIC_SELECTED, EventKind.SELECTED, "ChannelWiseTorchFP8ScaledMMLinearKernel",
         "CompressedTensorsW8A8Fp8"),
        (W4A16_MIXED, EventKind.MIXED_PRECISION, "CPUWNA16LinearKernel", "mixed-precision"),
        (MIXED_FROM_SOURCE, EventKind.MIXED_PRECISION, "MarlinLinearKernel", "mixed-precision"),
        (FP8_MARLIN_FROM_SOURCE, EventKind.FP8_WEIGHT_ONLY, "MarlinFP8", "fp8-weight-only"),
        (KV_SCALE_FROM_SOURCE, EventKind.KV_SCALE_DEFAULT, "", "fp8_e4m3"),
        (W8A16_FAILURE[6], EventKind.NO_KERNEL, "", "WNA16"),
        (READY, EventKind.READY, "", ""),
    ],
)
def test_kernel_lines_parse(line: str, kind: EventKind, kernel: str, subject: str) -> None:
    event = parse_line(line + "\n")
    assert event is not None
    assert (event.kind, event.kernel, event.subject) == (kind, kernel, subject)


def test_no_kernel_reasons_parse() -> None:
    event = parse_line(W8A16_FAILURE[9])
    assert event is not None and event.kind is EventKind.NO_KERNEL_REASON
    assert event.kernel == "CPUWNA16LinearKernel"
    assert event.detail.startswith("Quant type (uint8b128) not supported by CPUWNA16")


@pytest.mark.parametrize("line", [FP8_KV_INFO, W8A16_FAILURE[0], W8A16_FAILURE[-1], "", "Selected CPU core number (2)"])
def test_other_lines_are_not_kernel_events(line: str) -> None:
    assert parse_line(line) is None


# --- verification against the shared table ---


def test_w8a8_on_cpu_is_native() -> None:
    o = observe(KernelObserver(Scheme.W8A8, Target.CPU_X86), [W8A8_SELECTED, READY])
    a = o.assess()
    assert (a.verdict, a.family, a.phase) == (KernelVerdict.NATIVE, "CPUInt8ScaledMMLinearKernel", "serving")
    assert a.verified
    assert [k.kernel for k in a.kernels] == ["CPUInt8ScaledMMLinearKernel"]


def test_fp8_dynamic_on_cpu_is_a_fallback() -> None:
    a = observe(KernelObserver(Scheme.FP8_DYNAMIC, Target.CPU_X86), [FP8_DYNAMIC_SELECTED, READY]).assess()
    # verified: kernelPolicy decides whether fallback may serve
    assert a.verdict is KernelVerdict.FALLBACK and a.verified
    assert a.family.startswith("TorchFP8ScaledMM")


def test_w8a16_on_cpu_is_none_with_the_layer_and_reasons() -> None:
    o = observe(KernelObserver(Scheme.W8A16, Target.CPU_X86), W8A16_FAILURE)
    o.exit_code = 1
    a = o.assess()
    assert a.verdict is KernelVerdict.NONE and not a.verified and a.phase == "failed"
    assert a.mismatches[0][0] is Mismatch.KERNEL_UNAVAILABLE
    assert "qkv_proj (QKVParallelLinear)" in a.message and "compressed_tensors_wNa16.py" in a.message
    assert "CPUWNA16LinearKernel: Quant type (uint8b128)" in a.message
    assert len(o.no_kernel_reasons) == 3


def test_w4a16_on_cpu_is_native() -> None:
    a = observe(KernelObserver(Scheme.W4A16, Target.CPU_X86), [W4A16_MIXED, READY]).assess()
    assert (a.verdict, a.family, a.verified) == (KernelVerdict.NATIVE, "CPUWNA16LinearKernel", True)


def test_the_table_says_none_even_when_vllm_loads() -> None:
    """Static FP8 on CPU loads and fails at the first request: the table's `none` stands."""
    a = observe(KernelObserver(Scheme.FP8, Target.CPU_X86), [FP8_DYNAMIC_SELECTED, READY]).assess()
    assert a.verdict is KernelVerdict.NONE and a.mismatches[0][0] is Mismatch.KERNEL_UNAVAILABLE


def test_unexpected_kernel_is_unknown() -> None:
    a = observe(KernelObserver(Scheme.W8A8, Target.CPU_X86), [FP8_DYNAMIC_SELECTED, READY]).assess()
    assert a.verdict is KernelVerdict.UNKNOWN and [m for m, _ in a.mismatches] == [Mismatch.KERNEL_NOT_EXPECTED]


def test_fp8_weight_only_marlin_is_a_fallback_on_ampere() -> None:
    a = observe(KernelObserver(Scheme.FP8_DYNAMIC, Target.CUDA_SM80), [FP8_MARLIN_FROM_SOURCE, READY]).assess()
    assert a.verdict is KernelVerdict.FALLBACK


def test_wna16_kernel_matches_the_table_on_ampere() -> None:
    a = observe(KernelObserver(Scheme.W4A16, Target.CUDA_SM80), [MIXED_FROM_SOURCE, READY]).assess()
    assert (a.verdict, a.family) == (KernelVerdict.NATIVE, "MarlinLinearKernel")


def test_verdict_waits_for_load_and_unknown_when_nothing_was_logged() -> None:
    o = KernelObserver(Scheme.W8A8, Target.CPU_X86)
    assert o.assess().verdict is None and o.assess().phase == "starting"
    a = observe(o, [READY]).assess()
    assert a.verdict is KernelVerdict.UNKNOWN and a.mismatches[0][0] is Mismatch.NO_KERNEL_LOGGED


def test_unquantized_baseline_is_native() -> None:
    a = observe(KernelObserver(None, Target.CPU_X86), [READY]).assess()
    assert (a.scheme, a.verdict, a.family, a.verified) == ("unquantized", KernelVerdict.NATIVE, "dense", True)


def test_default_kv_scale_breaks_a_calibrated_kv_promise() -> None:
    promised = KernelObserver(Scheme.W8A8, Target.CPU_X86, kv_cache_dtype="fp8", kv_scales_promised=True)
    a = observe(promised, [W8A8_SELECTED, KV_SCALE_FROM_SOURCE, READY]).assess()
    assert a.verdict is KernelVerdict.NATIVE and not a.verified
    assert [m for m, _ in a.mismatches] == [Mismatch.KV_CACHE_SCALE_DEFAULT]
    # Not promised: the same line is vLLM's business, not a mismatch.
    plain = KernelObserver(Scheme.W8A8, Target.CPU_X86, kv_cache_dtype="fp8")
    assert observe(plain, [W8A8_SELECTED, KV_SCALE_FROM_SOURCE, READY]).assess().verified


def test_calibrated_kv_served_without_fp8_cache_is_a_mismatch() -> None:
    o = KernelObserver(Scheme.W8A8, Target.CPU_X86, kv_cache_dtype="auto", kv_scales_promised=True)
    a = observe(o, [W8A8_SELECTED, READY]).assess()
    assert [m for m, _ in a.mismatches] == [Mismatch.KV_CACHE_NOT_QUANTIZED]


def test_serve_cli_lists_match_the_contracts() -> None:
    """main.py keeps its choices stdlib-only; they must not drift from the enums."""
    assert tuple(s.value for s in Scheme) == serve_main.SCHEMES
    assert tuple(t.value for t in Target) == serve_main.TARGETS


# --- the launcher process around a fake engine ---

FAKE_ENGINE = textwrap.dedent(
    """
    import json, signal, sys, time
    lines, code, marker, linger = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    def stop(signum, frame):
        open(marker, "w").write(str(signum))
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    for line in lines:
        print(line, flush=True)
    time.sleep(linger)
    sys.exit(code)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launched:
    def __init__(self, tmp: Path, lines: list[str], *, code: int = 0, linger: float = 60.0, extra: list[str]) -> None:
        script, spec = tmp / "fake_engine.py", tmp / "lines.json"
        script.write_text(FAKE_ENGINE)
        spec.write_text(json.dumps(lines))
        self.marker = tmp / "signal"
        self.termination = tmp / "termination-log"
        self.port = _free_port()
        engine = f"{sys.executable} {script} {spec} {code} {self.marker} {linger}"
        env = {**os.environ, "PYTHONPATH": str(REPO / "worker")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quantrol_worker.cli", "serve", "--target", "cpu-x86", "--status-host",
             "127.0.0.1", "--status-port", str(self.port), "--termination-log", str(self.termination),
             "--engine", engine, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
            return str(r.read().decode())

    def kernels_when(self, phase: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = json.loads(self.get("/kernels"))
                if last["phase"] == phase:
                    return dict(last)
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"phase {phase!r} not reached; last {last}")

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def test_launcher_exposes_native_w8a8_and_forwards_sigterm(tmp_path: Path) -> None:
    run = Launched(tmp_path, ["engine booting", W8A8_SELECTED, READY], extra=["--scheme", "W8A8", "--", "--model", "x"])
    try:
        status = run.kernels_when("serving")
        assert (status["verdict"], status["verified"], status["scheme"]) == ("native", True, "W8A8")
        metrics = run.get("/metrics")
        assert (
            'quantrol_engine_kernel_info{family="CPUInt8ScaledMMLinearKernel",kernel="CPUInt8ScaledMMLinearKernel",'
            'kv_cache_dtype="auto",scheme="W8A8",verdict="native"} 1.0'
        ) in metrics
        assert "quantrol_engine_kernel_verified 1.0" in metrics
        run.proc.send_signal(signal.SIGTERM)
        code, out, err = run.finish()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert code == 0, err
    assert run.marker.read_text() == str(int(signal.SIGTERM))  # the engine got the signal, not just the launcher
    assert W8A8_SELECTED in out  # vLLM's log passes through untouched
    assert "verdict=native scheme=W8A8" in err
    assert not run.termination.exists()


class _Health(http.server.BaseHTTPRequestHandler):
    """A real HTTP server in vLLM's place for /health (the fake engine only prints log lines)."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _ready(run: Launched) -> tuple[int, str]:
    try:
        return 200, run.get("/ready")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_ready(run: Launched, code: int, timeout: float = 15) -> str:
    deadline, last = time.monotonic() + timeout, (0, "")
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # the status port is not up yet
            last = _ready(run)
        if last[0] == code:
            return last[1]
        time.sleep(0.1)
    raise AssertionError(f"/ready never answered {code}; last {last}")


def test_readiness_needs_the_engine_healthy_and_its_kernels_verified(tmp_path: Path) -> None:
    """The pod's readiness probe (children/serving.py) asks the launcher: vLLM's /health and a decided, not-none
    kernel verdict, so traffic never reaches an engine that is up but unverified."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    engine_port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run = Launched(tmp_path, ["engine booting"], extra=["--scheme", "W8A8", "--", "--model", "x",
                                                         "--port", str(engine_port)])
    try:
        assert "kernel verdict undecided" in _wait_ready(run, 503)  # healthy engine, kernels not seen yet
    finally:
        run.proc.kill()
        run.finish()
    (tmp_path / "ready").mkdir()
    ready = Launched(tmp_path / "ready", [W8A8_SELECTED, READY], extra=["--scheme", "W8A8", "--", "--model", "x",
                                                                       "--port", str(engine_port)])
    try:
        assert _wait_ready(ready, 200).strip() == "ready"
        server.shutdown()
        server.server_close()
        assert f"vLLM /health on port {engine_port}" in _wait_ready(ready, 503)  # the engine stopped answering
    finally:
        ready.proc.kill()
        ready.finish()


def test_launcher_refuses_when_vllm_finds_no_kernel(tmp_path: Path) -> None:
    run = Launched(tmp_path, W8A16_FAILURE, code=1, linger=0,
                   extra=["--scheme", "W8A16", "--", "--model", "x", "--kv-cache-dtype", "fp8"])
    code, _, err = run.finish()
    assert code == 3, err
    message = json.loads(run.termination.read_text())
    assert (message["reason"], message["verdict"], message["scheme"]) == ("KernelUnavailable", "none", "W8A16")
    assert message["layer"] == "qkv_proj (QKVParallelLinear)"
    assert any(k.startswith("CPUWNA16LinearKernel: Quant type (uint8b128)") for k in message["kernels"])
    assert "Re-quantize with a scheme the kernel table marks native on cpu-x86" in err
    assert len(run.termination.read_bytes()) <= 4096


def test_launcher_reaps_an_engine_that_hangs_after_no_kernel(tmp_path: Path) -> None:
    run = Launched(tmp_path, W8A16_FAILURE, linger=60,
                   extra=["--scheme", "W8A16", "--no-kernel-grace", "1", "--", "--model", "x"])
    started = time.monotonic()
    code, _, err = run.finish()
    assert code == 3 and time.monotonic() - started < 20, err
    assert "terminating it" in err


def test_launcher_reports_other_engine_failures(tmp_path: Path) -> None:
    lines = ["(APIServer pid=1) ERROR 01-01 00:00:00 [x.py:1] OSError: model directory /x is empty", "bye"]
    run = Launched(tmp_path, lines, code=7, linger=0, extra=["--scheme", "W8A8", "--", "--model", "x"])
    code, _, _ = run.finish()
    assert code == 7
    message = json.loads(run.termination.read_text())
    assert message["reason"] == "EngineFailed" and "model directory /x is empty" in message["message"]


def test_scheme_and_kv_promise_come_from_the_artifact_report(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "quantrol-report.json").write_text(json.dumps({"scheme": "W8A8", "kvCacheScheme": "fp8"}))
    run = Launched(tmp_path, [W8A8_SELECTED, READY], extra=["--", "--model", str(model)])
    try:
        status = run.kernels_when("serving")
    finally:
        run.proc.kill()
        run.finish()
    assert status["scheme"] == "W8A8" and status["verdict"] == "native" and not status["verified"]
    assert [m["reason"] for m in status["mismatches"]] == ["KvCacheNotQuantized"]


def test_unquantized_config_needs_no_scheme(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    run = Launched(tmp_path, [READY], extra=["--", "--model", str(model)])
    try:
        status = run.kernels_when("serving")
        metrics = run.get("/metrics")
    finally:
        run.proc.kill()
        run.finish()
    assert (status["scheme"], status["verdict"]) == ("unquantized", "native")
    assert 'family="dense"' in metrics


def test_assessment_json_shape() -> None:
    a = observe(KernelObserver(Scheme.W8A8, Target.CPU_X86), [W8A8_SELECTED, READY]).assess()
    body = assessment_json(a)
    assert body["kernels"] == [{"kernel": "CPUInt8ScaledMMLinearKernel", "subject": "CompressedTensorsW8A8Int8",
                                "family": "CPUInt8ScaledMMLinearKernel", "verdict": "native"}]
    assert body["mismatches"] == [] and body["verified"] is True


def test_the_engine_start_line_gives_version_device_and_settings_for_the_envelope() -> None:
    # vLLM CPU 0.32's own line (from a real engine's log, config shortened).
    line = ("(EngineCore pid=11516) INFO 12-05 03:46:09 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with "
            "config: model='/m', dtype=torch.bfloat16, max_seq_len=256, quantization=None, enforce_eager=True, "
            "kv_cache_dtype=auto, device_config=cpu, seed=0, served_model_name=tiny, enable_prefix_caching=True")
    facts = engine_facts(line)
    assert facts == {"version": "0.32.0", "device_config": "cpu", "dtype": "torch.bfloat16", "quantization": "None",
                     "kv_cache_dtype": "auto", "max_seq_len": "256", "enforce_eager": "True",
                     "enable_prefix_caching": "True"}
    assert engine_facts("INFO Starting vLLM API server 0 on http://127.0.0.1:8000") is None
    observer = KernelObserver(scheme=None, target=Target.CPU_X86, flags=("--max-num-seqs", "4"))
    observer.feed(line, None)
    shown = assessment_json(observer.assess())
    assert shown["engine"]["version"] == "0.32.0" and shown["flags"] == ["--max-num-seqs", "4"]
