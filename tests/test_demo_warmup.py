"""The demos' engine warm-up (quantrol_dev.demo.warmup), run as `quantrol demo --cluster` runs it: the module's own
source as a `python -c` program, in a fresh interpreter with nothing but the standard library, against an engine
stand-in on 127.0.0.1 (quantrol_dev.standin, not vLLM). The demos' traffic is the fleet's (tests/test_fleet.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from quantrol_dev.demo import warmup
from quantrol_dev.standin import standin_process


@pytest.fixture
def engine() -> Iterator[str]:
    with standin_process("tiny") as url:
        yield f"{url}/v1/completions"


def _script_env(**values: str) -> dict[str, str]:
    # -I would drop PYTHONPATH too; an empty path and no site packages' imports are what the pod program gets.
    return {"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1", **values}


def test_the_warm_up_program_sends_every_body_and_exits_zero(engine: str) -> None:
    result = subprocess.run([sys.executable, "-S", "-c", warmup.pod_script(warmup.warm_main)],
                            env=_script_env(QUANTROL_WARM_URL=engine, QUANTROL_WARM_MODEL="tiny",
                                            QUANTROL_WARM_TIMEOUT="30"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failures: []" in result.stdout


def test_the_warm_up_program_fails_when_the_engine_does_not_answer() -> None:
    result = subprocess.run([sys.executable, "-S", "-c", warmup.pod_script(warmup.warm_main)],
                            env=_script_env(QUANTROL_WARM_URL="http://127.0.0.1:9/v1/completions",
                                            QUANTROL_WARM_MODEL="tiny", QUANTROL_WARM_TIMEOUT="5"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "Connection refused" in result.stdout, result.stdout + result.stderr
