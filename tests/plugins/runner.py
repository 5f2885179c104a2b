"""Fixtures for the local workload runner (the kubelet/controller stand-in) on top of the emulated API.

- `workload_runner_factory`: start runners (`LocalRunner` keyword arguments, e.g. `namespaces=[...]`), all
  stopped at teardown (request `namespace` before it, so that runners stop before their namespace goes);
- `workload_runner`: one runner watching the test's fresh `namespace`, with `default_image_map()`; the test
  fails at teardown if any of the runner's passes raised.

The emulation has no kubelet, no Job/Deployment controllers and no garbage collector: the runner plays those
parts (runner.py says how, and where it differs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from quantrol_dev.localstack.runner import LocalRunner
from quantrol_dev.localstack.runner_plan import ImageEnv

DEV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin dir, not the base interpreter's
TEST_IMAGE = "quantrol-test/tools:dev"  # test workloads, run with the dev environment's python
TEST_SERVING_IMAGE = "quantrol-test/serve:dev"  # the same, but counted against the serving cap


def default_image_map(cache_dir: Path) -> list[ImageEnv]:
    """Test images -> the dev environment; the worker and vLLM images -> the calibrate and serve
    environments where their interpreters are configured (QUANTROL_CALIBRATE_PYTHON, QUANTROL_SERVE_PYTHON)."""
    entries = [
        ImageEnv("quantrol-test/serve*", DEV_BIN, serving=True),
        ImageEnv("quantrol-test/*", DEV_BIN),
    ]
    calibrate, serve = os.environ.get("QUANTROL_CALIBRATE_PYTHON"), os.environ.get("QUANTROL_SERVE_PYTHON")
    if calibrate:
        entries.append(ImageEnv("quantrol/worker*", Path(calibrate).parent))
    if serve:
        # The vLLM image's entrypoint; its console script fails on package metadata (ARCHITECTURE.md).
        entries.append(ImageEnv(
            "vllm/vllm-openai*", Path(serve).parent, serving=True,
            entrypoint=("python", "-m", "vllm.entrypoints.openai.api_server"),
            env={"VLLM_CACHE_ROOT": str(cache_dir / "vllm"), "VLLM_CPU_KVCACHE_SPACE": "1"},
        ))
    return entries


@pytest.fixture
def workload_runner_factory(kubeconfig: Path, tmp_path: Path) -> Iterator[Callable[..., LocalRunner]]:
    started: list[LocalRunner] = []

    def factory(**kwargs: Any) -> LocalRunner:
        state_dir = kwargs.pop("state_dir", tmp_path / f"runner{len(started)}")
        kwargs.setdefault("image_map", default_image_map(state_dir / "cache"))
        kwargs.setdefault("poll_interval", 0.2)
        kwargs.setdefault("gc_interval", 0.5)
        runner = LocalRunner(kubeconfig=kubeconfig, state_dir=state_dir, **kwargs)
        started.append(runner)
        return runner.start()

    try:
        yield factory
    finally:
        for runner in started:
            runner.stop()


@pytest.fixture
def workload_runner(workload_runner_factory: Callable[..., LocalRunner], namespace: str) -> Iterator[LocalRunner]:
    runner = workload_runner_factory(namespaces=[namespace])
    yield runner
    runner.stop()  # before `namespace` goes: the runner would otherwise poll a deleted namespace
    if runner.errors:  # a pass that raised is a runner bug (or a broken API): say so, even when the test passed
        pytest.fail(f"the local runner failed {runner.errors} pass(es); the last error: {runner.last_error!r}")
