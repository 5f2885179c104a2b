"""`quantrol-worker serve`: arguments and entry point. The parser is stdlib-only so that the CLI stays cheap to
import; the launcher (pydantic, prometheus_client) is imported when the command runs."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPORT_FILE = "quantrol-report.json"  # quantrol_worker.contracts.REPORT_FILE, not imported to keep parsing cheap
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
SCHEMES = ("FP8_DYNAMIC", "FP8", "W8A8", "W4A16", "W4A16_ASYM", "W4A8", "W8A16")
TARGETS = ("cuda-sm90", "cuda-sm89", "cuda-sm80", "cpu-x86")
UNQUANTIZED = "unquantized"

log = logging.getLogger("quantrol.serve")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve", help="run vLLM's OpenAI server and verify the kernels it loads",
        description="quantrol-worker serve [options] -- <vLLM api_server arguments>",
    )
    parser.add_argument("--scheme", default=None,
                        help=f"the artifact's scheme ({', '.join(s for s in SCHEMES)} or {UNQUANTIZED}); "
                        f"default: from {REPORT_FILE} or config.json in the --model directory")
    parser.add_argument("--target", required=True, choices=list(TARGETS),
                        help="the hardware this pod serves on (the kernel table's column)")
    parser.add_argument("--kv-cache-scheme", default=None, choices=["none", "fp8"],
                        help=f"KV-cache scheme the artifact was calibrated with (default: from {REPORT_FILE})")
    parser.add_argument("--status-host", default="0.0.0.0", help="listen address of /metrics and /kernels")
    parser.add_argument("--status-port", type=int, default=9400, help="port of /metrics and /kernels (0: any)")
    parser.add_argument("--termination-log", type=Path, default=Path(TERMINATION_MESSAGE_PATH))
    parser.add_argument("--engine", default=None,
                        help="engine command line (default: this python -m vllm.entrypoints.openai.api_server)")
    parser.add_argument("--no-kernel-grace", type=float, default=30.0,
                        help="seconds vLLM gets to exit on its own after 'Failed to find a kernel' before SIGTERM")
    parser.add_argument("engine_args", nargs=argparse.REMAINDER, help="-- then vLLM's arguments")


def _engine_port(engine_args: list[str]) -> int:
    for i, arg in enumerate(engine_args):
        if arg == "--port" and i + 1 < len(engine_args) and engine_args[i + 1].isdigit():
            return int(engine_args[i + 1])
        if arg.startswith("--port=") and arg[7:].isdigit():
            return int(arg[7:])
    return 8000  # vLLM's own default


def readiness(assessment: Callable[[], Any], port: int) -> tuple[bool, str]:
    """Ready to take traffic: vLLM answers /health on this pod, and the kernels it loaded are decided and not
    `none` (a fallback still serves: the kernel policy decides about it, not readiness)."""
    verdict = assessment().verdict
    if verdict is None or verdict.value == "none":
        return False, f"kernel verdict {verdict.value if verdict else 'undecided'}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            healthy = response.status == 200
    except OSError as exc:
        return False, f"vLLM /health on port {port}: {exc}"
    return healthy, "ready" if healthy else f"vLLM /health on port {port} answered {response.status}"


def run(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_args = list(ns.engine_args)
    if engine_args[:1] == ["--"]:
        engine_args = engine_args[1:]
    from quantrol_worker.serve.http import StatusServer
    from quantrol_worker.serve.launcher import DEFAULT_ENGINE, Launcher, build_observer

    try:
        observer = build_observer(ns, engine_args)
    except ValueError as exc:
        log.error("bad serve arguments: %s", exc)
        return 2
    command = [*(shlex.split(ns.engine) if ns.engine else DEFAULT_ENGINE), *engine_args]
    launcher = Launcher(command, observer, ns.termination_log, ns.no_kernel_grace, sys.stdout.buffer)
    ready = partial(readiness, launcher.assessment, _engine_port(engine_args))
    status = StatusServer(ns.status_host, ns.status_port, launcher.assessment, ready).start()
    log.info("kernel status on http://%s:%d/metrics and /kernels (scheme %s, target %s)",
             ns.status_host, status.port, observer.scheme_label, observer.target)
    try:
        return launcher.run()
    finally:
        status.stop()
