"""The whole local stack starts, serves, and leaves no process and no port behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantrol_operator.localstack.procs import port_is_open
from quantrol_operator.localstack.stack import LocalStack

pytestmark = pytest.mark.stack


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stack_starts_every_server_and_stop_leaves_nothing(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path).start()
    try:
        assert stack.kubeapi and stack.prometheus and stack.registry and stack.operator
        ports = [stack.kubeapi.port, stack.prometheus.port, stack.registry.port]
        pids = [p.pid for p in (stack.kubeapi.process, stack.prometheus.process, stack.registry.process,
                                stack.operator.process) if p is not None]
        assert len(pids) == 4 and all(map(port_is_open, ports))
        assert stack.operator.logged("watching QuantizedModel and ServingPolicy")
        with pytest.raises(RuntimeError, match="already running"):
            stack.start()
    finally:
        stack.stop()
    assert not any(map(port_is_open, ports))
    assert not any(map(_group_alive, pids))


def test_a_failing_part_stops_the_parts_already_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTROL_REGISTRY", str(tmp_path / "no-such-registry"))
    stack = LocalStack(tmp_path)
    with pytest.raises(FileNotFoundError):
        stack.start()
    assert stack.kubeapi is not None and stack.prometheus is not None
    assert not port_is_open(stack.kubeapi.port) and not port_is_open(stack.prometheus.port)


def test_demo_command_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "quantrol_operator.cli", "demo", "--local", "--output", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "stack.json").is_file()
    assert "the operator has seen it" in result.stdout  # the operator really reconciled the applied objects
    assert "spec.rollout.canarySteps" in result.stdout  # the broken spec was refused naming the field
