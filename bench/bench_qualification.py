"""Qualification's three regimes per scheme, side by side in one run: bf16, W8A8, W4A16, FP8_DYNAMIC on vLLM's CPU
build, each measured by `quantrol-worker qualify` (GuideLLM through Quantrol's router with admission bounds).

Prints one table: per scheme and regime the offered rate, TTFT and inter-token latency (p50/p99), output tokens per
second, goodput (output tokens of requests within the SLOs per engine-second), the 429 share, the admission queue's
p99 wait and the time to recover floor latency after overload. Figures only, never pass/fail.

    source .venvs/env.sh && flock /tmp/quantrol-heavy.lock .venvs/dev/bin/python bench/bench_qualification.py [--quick]

One engine at a time (≈3 GB each, 2 cores). The tiny model (vocabulary 4096: vLLM CPU needs it) is built once in
QUANTROL_CACHE_DIR (default ~/.cache/quantrol); the schemes are quantized round-to-nearest with llm-compressor.
Every arm is measured as a stable arm would be (all three regimes, no early refusal), with the demo's SLOs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from quantrol_dev.tinyquant import QUANTIZE

REPO = Path(__file__).resolve().parents[1]
SCHEMES = ("bf16", "W8A8", "W4A16", "FP8_DYNAMIC")
COLUMNS = (("rateRps", "rate/s"), ("requests", "reqs"), ("ttftP50Seconds", "TTFT p50"), ("ttftP99Seconds", "TTFT p99"),
           ("itlP50Seconds", "ITL p50"), ("itlP99Seconds", "ITL p99"), ("outputTokensPerSecond", "tok/s"),
           ("goodputTokensPerEngineSecond", "goodput"), ("rejectedFraction", "429"),
           ("queueWaitP99Seconds", "queue p99"), ("recoverySeconds", "recovery"))


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "worker"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"), "VLLM_CPU_KVCACHE_SPACE": "1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def models(calibrate: str, cache: Path, tmp: Path) -> dict[str, Path]:
    build = subprocess.run([calibrate, "-m", "quantrol_worker.tinymodel", "--out", str(cache), "--vocab-size", "4096"],
                           capture_output=True, text=True, env=env(tmp), timeout=1800, check=True)
    base = Path(json.loads(build.stdout.strip().splitlines()[-1])["model_dir"])
    subprocess.run([calibrate, "-c", QUANTIZE, str(base), str(tmp), *SCHEMES[1:]], capture_output=True, text=True,
                   env=env(tmp), timeout=1800, check=True)
    return {"bf16": base, **{s: tmp / s for s in SCHEMES[1:]}}


def serve(serve_python: str, model: Path, tmp: Path, scheme: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = (tmp / f"{scheme}.log").open("wb")
    proc = subprocess.Popen([serve_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                             "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4"],
                            stdout=log, stderr=subprocess.STDOUT, env=env(tmp))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{scheme}: vLLM exited {proc.returncode} (log {tmp / f'{scheme}.log'})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{scheme}: vLLM not up after 600 s")


def qualify(serve_python: str, model: Path, port: int, tmp: Path, scheme: str, quick: bool) -> dict[str, Any]:
    work = tmp / f"qualify-{scheme}"
    regimes = {"floorRequests": 3, "floorMaxSeconds": 30, "sweepRates": 2 if quick else 4,
               "secondsPerRate": 8 if quick else 20, "overloadFactor": 1.5, "overloadSeconds": 8 if quick else 20,
               "recoverySeconds": 30}
    config = {"model": "tiny", "promptsArtifact": f"file://{model}", "outputTokens": 8,
              "arms": [{"arm": "stable", "url": f"http://127.0.0.1:{port}", "artifact": scheme}],
              "regimes": regimes, "limits": {"ttftSeconds": 5.0, "itlSeconds": 1.2, "queueWaitSeconds": 5.0},
              "admission": {"maxInFlight": 8, "maxQueue": 16, "maxQueueWaitSeconds": 10},
              "workDir": str(work), "terminationMessagePath": str(tmp / f"{scheme}.term")}
    (tmp / f"{scheme}.json").write_text(json.dumps(config))
    subprocess.run([serve_python, "-m", "quantrol_worker.cli", "qualify", "--config", str(tmp / f"{scheme}.json")],
                   capture_output=True, text=True, env=env(tmp), timeout=1800, check=False)
    report: dict[str, Any] = json.loads((tmp / f"{scheme}.term").read_text())
    return report


def table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'scheme':<12} {'regime':<12}" + "".join(f"{h:>10}" for _, h in COLUMNS)
    lines = [head, "-" * len(head)]
    for scheme, report in results.items():
        regimes = (report.get("arms") or [{}])[0].get("regimes") or []
        if not regimes:
            lines.append(f"{scheme:<12} {report.get('reason')}: {report.get('message', '')[:100]}")
        for r in regimes:
            cells = "".join(f"{r[k]:>10.3g}" if isinstance(r.get(k), (int, float)) else f"{'—':>10}"
                            for k, _ in COLUMNS)
            lines.append(f"{scheme:<12} {r['regime']:<12}{cells}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two rates of 8 s, 8 s of overload (about 8 minutes)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, of {', '.join(SCHEMES)}")
    args = parser.parse_args()
    schemes = [s for s in args.schemes.split(",") if s in SCHEMES]
    calibrate, serve_python = os.environ.get("QUANTROL_CALIBRATE_PYTHON"), os.environ.get("QUANTROL_SERVE_PYTHON")
    if not (calibrate and serve_python):
        print("QUANTROL_CALIBRATE_PYTHON and QUANTROL_SERVE_PYTHON must be set (source .venvs/env.sh)", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("QUANTROL_CACHE_DIR") or Path.home() / ".cache" / "quantrol") / "tiny-model"
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="quantrol-bench-qualify-") as name:
        tmp = Path(name)
        folders = models(calibrate, cache, tmp)
        for scheme in schemes:
            began = time.monotonic()
            proc, port = serve(serve_python, folders[scheme], tmp, scheme)
            try:
                results[scheme] = qualify(serve_python, folders[scheme], port, tmp, scheme, args.quick)
            finally:
                proc.terminate()
                proc.wait(120)
            print(f"[bench] {scheme}: measured in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    tool = next((r.get("tool") for r in results.values() if r.get("tool")), "?")
    print(f"\nQualification regimes per scheme ({tool}; seconds, requests/s, tokens/s; goodput in output tokens per "
          "engine-second within TTFT ≤ 5 s and ITL ≤ 1.2 s):\n")
    print(table(results))
    for scheme, report in results.items():
        if report.get("reason") != "Qualified":  # each arm is measured as a stable arm: this is what it missed
            print(f"{scheme}: {report.get('reason')}: {report.get('message', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
