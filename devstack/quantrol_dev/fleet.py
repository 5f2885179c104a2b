"""The client fleet (quantrol_worker.fleet: GuideLLM with the fleet's request mix) as a process of the serve
environment, where GuideLLM is installed, started from the development environment: the local demo, the
control-loop rig and the router bench all drive their load through it.

Bounded twice: the fleet's own `--seconds`, and `stop()` (SIGTERM: GuideLLM stops sending, finishes, and prints the
counts; after `grace` seconds the process group is killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from quantrol_worker.fleet import COUNTS, Answer, FleetResult, Mix, Prompt, write_prompts

STARTED = "): started"  # GuideLLM's progress line once its workers send: "Benchmark 1 (poisson@20.00): started"


def serve_python() -> str:
    python = os.environ.get("QUANTROL_SERVE_PYTHON")
    if not python:
        raise RuntimeError("QUANTROL_SERVE_PYTHON is unset: the fleet runs GuideLLM in the serve environment "
                           "(`bash .ci/setup` makes it; `source .venvs/env.sh` sets the variable)")
    return python


class FleetProcess:
    """One fleet run; a context manager that waits until GuideLLM sends, and stops it on exit."""

    def __init__(self, targets: Sequence[str], model: str, prompts: Sequence[Prompt], *, seconds: float,
                 max_tokens: int, rate: float | None = None, clients: int | None = None, requests: int | None = None,
                 mix: Mix | None = None, tokenizer: Path | None = None, work: Path | None = None,
                 rampup: float = 0.0) -> None:
        self.work = work or Path(tempfile.mkdtemp(prefix="quantrol-fleet-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "fleet.log"
        mix = mix or Mix()
        command = [serve_python(), "-m", "quantrol_worker.cli", "fleet", "--model", model,
                   "--prompts", str(write_prompts(self.work / "prompts.jsonl", prompts)),
                   "--seconds", str(seconds), "--max-tokens", str(max_tokens), "--work", str(self.work),
                   "--sampled-temperature", str(mix.sampled_temperature),
                   "--sampled-every", str(mix.sampled_every), "--unstreamed-every", str(mix.unstreamed_every)]
        command += ["--rate", str(rate)] if rate is not None else ["--clients", str(clients)]
        for target in targets:
            command += ["--target", target]
        if tokenizer is not None:
            command += ["--tokenizer", str(tokenizer)]
        if rampup > 0:
            command += ["--rampup", str(rampup)]
        if requests is not None:
            command += ["--requests", str(requests)]
        self.report_path = self.work / "report.json"
        command += ["--report", str(self.report_path)]
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: float = 90.0) -> FleetProcess:
        """Start it and wait (at most `wait` seconds) until GuideLLM is sending."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        deadline = time.monotonic() + wait
        while STARTED not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the fleet exited {self.proc.returncode} before sending: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fleet did not start sending within {wait:.0f} s: {self.log()[-2000:]}")
            time.sleep(0.2)
        return self

    def run(self, timeout: float) -> FleetResult:
        """Start it and wait for its end (its own bounds, or `timeout`): every request's outcome."""
        self.start()
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        if self.proc.returncode != 0 or not self.report_path.exists():
            raise RuntimeError(f"the fleet failed ({self.proc.returncode}): {self.log()[-2000:]}")
        report = json.loads(self.report_path.read_text())
        return FleetResult(tuple(Answer(**a) for a in report["answers"]), float(report["wall"]))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def counts(self) -> tuple[int, int]:
        """(answered, failed) so far: GuideLLM's last progress line, or the fleet's final counts."""
        found = COUNTS.findall(self.log())
        return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)

    def stop(self, grace: float = 60.0) -> tuple[int, int]:
        """SIGTERM, then the final counts; the process group is killed when it outlives `grace`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.counts()

    def __enter__(self) -> FleetProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
