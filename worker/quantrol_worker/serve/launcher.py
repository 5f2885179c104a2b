"""Start vLLM as a child, stream its log through, verify its kernels, forward SIGTERM, report how it ended.

Exit codes: vLLM's own when it fails for another reason; EXIT_KERNEL_UNAVAILABLE (3) when vLLM found no kernel
for a layer (the termination message then names the layer and every kernel's reason, and the operator refuses the
candidate as KernelUnavailable instead of waiting for a readiness timeout); 0 after a forwarded SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import IO

from pydantic import Field

from quantrol_worker.contracts import (
    REPORT_FILE,
    TERMINATION_MESSAGE_LIMIT,
    ContractModel,
    KvCacheScheme,
    Scheme,
    Target,
)
from quantrol_worker.serve.logparse import EventKind, parse_line
from quantrol_worker.serve.verify import UNQUANTIZED, Assessment, KernelObserver

log = logging.getLogger("quantrol.serve")

EXIT_KERNEL_UNAVAILABLE = 3
DEFAULT_ENGINE = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")  # the console script breaks on CPU
TAIL_LINES = 20


class ServeReason(StrEnum):
    """Termination reasons of the serving container (CamelCase, as condition reasons)."""

    KERNEL_UNAVAILABLE = "KernelUnavailable"
    ENGINE_FAILED = "EngineFailed"
    ENGINE_EXITED = "EngineExited"


class ServeTermination(ContractModel):
    """What `quantrol-worker serve` writes to the termination-message path when vLLM ends (≤ 4096 bytes)."""

    phase: str = "Failed"
    reason: ServeReason
    message: str
    scheme: str
    target: str
    verdict: str | None = None
    layer: str | None = None
    kernels: list[str] = Field(default_factory=list)
    exit_code: int | None = None

    def to_message(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        text = self.to_json()
        excess = len(text.encode()) - limit
        if excess > 0:
            keep = max(0, len(self.message.encode()) - excess - 8)
            text = self.model_copy(update={"message": self.message.encode()[:keep].decode(errors="ignore") + "…"}
                                   ).to_json()
        return text


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _artifact_facts(model: str | None) -> tuple[str | None, str | None, bool | None]:
    """(scheme, kv scheme, quantized?) from the model directory: the report first, else config.json."""
    if not model or not Path(model).is_dir():
        return None, None, None
    report = Path(model) / REPORT_FILE
    if report.is_file():
        data = json.loads(report.read_text())
        return data.get("scheme"), data.get("kvCacheScheme"), data.get("scheme") is not None
    config = Path(model) / "config.json"
    if config.is_file():
        quantized = "quantization_config" in json.loads(config.read_text())
        return (None if quantized else UNQUANTIZED), None, quantized
    return None, None, None


def build_observer(ns: argparse.Namespace, engine_args: list[str]) -> KernelObserver:
    scheme_name, kv_name, quantized = _artifact_facts(_flag(engine_args, "--model"))
    scheme_name = ns.scheme or scheme_name
    kv = ns.kv_cache_scheme or kv_name or KvCacheScheme.NONE.value
    known = scheme_name is not None
    scheme = None if scheme_name in (None, UNQUANTIZED) else Scheme(scheme_name)
    if not known and quantized is False:
        known = True  # an unquantized config.json needs no scheme
    return KernelObserver(
        scheme=scheme,
        target=Target(ns.target),
        kv_cache_dtype=_flag(engine_args, "--kv-cache-dtype") or "auto",
        kv_scales_promised=kv == KvCacheScheme.FP8.value,
        scheme_known=known,
        flags=tuple(engine_args),
    )


class Launcher:
    def __init__(self, command: list[str], observer: KernelObserver, termination_log: Path,
                 no_kernel_grace: float, out: IO[bytes]) -> None:
        self.command = command
        self.observer = observer
        self.termination_log = termination_log
        self.no_kernel_grace = no_kernel_grace
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self._lock = threading.Lock()
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._announced: tuple[object, ...] | None = None

    def assessment(self) -> Assessment:
        with self._lock:
            return self.observer.assess()

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            log.info("received %s: forwarding to vLLM (pid %d)", signal.Signals(signum).name, self.proc.pid)
            self.proc.send_signal(signum)

    def _reap_after_no_kernel(self) -> None:
        """vLLM exits on its own after a failed load; if it hangs, do not let the pod sit until a probe kills it."""
        proc = self.proc
        if proc is None:
            return
        try:
            proc.wait(self.no_kernel_grace)
        except subprocess.TimeoutExpired:
            log.error("vLLM still running %.0f s after 'Failed to find a kernel': terminating it", self.no_kernel_grace)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def run(self) -> int:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # log lines must reach the parser as they happen
        log.info("starting engine: %s", shlex.join(self.command))
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._forward)
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.out.write(raw)
            self.out.flush()
            self._observe(raw.decode("utf-8", errors="replace"))
        code = self.proc.wait()
        with self._lock:
            self.observer.exit_code = code
        return self._finish(code)

    def _observe(self, line: str) -> None:
        event = parse_line(line)
        self._tail.append(line.rstrip())
        with self._lock:
            first = self.observer.no_kernel is None
            first_no_kernel = first and event is not None and event.kind is EventKind.NO_KERNEL
            self.observer.feed(line, event)
        if first_no_kernel:
            log.error("vLLM reports no kernel for a quantized layer: it will not serve; collecting its reasons")
            threading.Thread(target=self._reap_after_no_kernel, name="quantrol-reap", daemon=True).start()
        if event is not None and event.kind in (EventKind.READY, EventKind.SELECTED, EventKind.MIXED_PRECISION,
                                                 EventKind.FP8_WEIGHT_ONLY, EventKind.KV_SCALE_DEFAULT):
            self._announce()

    def _announce(self) -> None:
        """Log the verdict whenever it changes, in words an operator can act on."""
        a = self.assessment()
        key = (a.verdict, a.family, a.mismatches, a.phase)
        if a.verdict is None or key == self._announced:
            return
        self._announced = key
        kernels = ", ".join(f"{k.kernel} for {k.subject}" for k in a.kernels) or a.family
        level = logging.INFO if a.verified else logging.WARNING
        log.log(level, "kernel verification (%s): verdict=%s scheme=%s target=%s kv_cache_dtype=%s kernels=[%s] %s",
                a.phase, a.verdict, a.scheme, a.target, a.kv_cache_dtype, kernels, a.message)

    def _finish(self, code: int) -> int:
        a = self.assessment()
        if self.observer.no_kernel is not None:
            message = (f"{a.message}. Kernel verification verdict: none. Re-quantize with a scheme the kernel table "
                       f"marks native on {a.target}, or serve this artifact on a target that has the kernel.")
            log.error("%s", message)
            self._terminate(ServeReason.KERNEL_UNAVAILABLE, message, a, code)
            return EXIT_KERNEL_UNAVAILABLE
        if self.stopping:
            log.info("vLLM stopped after a forwarded signal (exit code %d)", code)
            return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else _shell_code(code)
        if code != 0:
            errors = [t for t in self._tail if "Error" in t or "ERROR" in t] or list(self._tail)
            message = f"vLLM exited with code {code} (verdict {a.verdict or 'undecided'}): " + " | ".join(errors[-6:])
            log.error("%s", message)
            self._terminate(ServeReason.ENGINE_FAILED, message, a, code)
            return _shell_code(code)
        self._terminate(ServeReason.ENGINE_EXITED, "vLLM exited with code 0 without being asked to stop", a, code)
        return 1

    def _terminate(self, reason: ServeReason, message: str, a: Assessment, code: int) -> None:
        result = ServeTermination(
            reason=reason,
            message=message,
            scheme=a.scheme,
            target=a.target,
            verdict=a.verdict.value if a.verdict else None,
            layer=self.observer.layer or None,
            kernels=[k.kernel for k in a.kernels] or self.observer.no_kernel_reasons,
            exit_code=code,
        )
        try:
            self.termination_log.parent.mkdir(parents=True, exist_ok=True)
            self.termination_log.write_text(result.to_message())
        except OSError as exc:  # the message also went to the log; a read-only path must not hide the exit code
            log.error("cannot write termination message to %s: %s", self.termination_log, exc)


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code
