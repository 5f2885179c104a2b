"""`quantrol-worker install-launcher --dest DIR`: a serving pod's first init step, run in Quantrol's tools image.

It copies this package's Python files into DIR (an emptyDir the engine container mounts), so that any vLLM image,
stock `vllm/vllm-openai` included, runs Quantrol's launcher with `PYTHONPATH=DIR python3 -m quantrol_worker serve`.
What the launcher imports beyond the standard library (pydantic, prometheus_client) comes with vLLM. The copy lands
in a staging folder first and is renamed into place, so a restarted step never leaves half a package behind.
Stdlib only.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
log = logging.getLogger("quantrol.deliver")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("install-launcher",
                                 help="copy the serving launcher into a shared volume (the serving pod's init step)")
    parser.add_argument("--dest", type=Path, required=True, help="the volume the engine container mounts")


def install(dest: Path) -> Path:
    """Copy the package's .py files (and py.typed) to DEST/quantrol_worker; returns that folder."""
    dest.mkdir(parents=True, exist_ok=True)
    final, staging = dest / PACKAGE.name, dest / f".{PACKAGE.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and (p.suffix == ".py" or p.name == "py.typed")
             and "__pycache__" not in p.parts]
    for path in files:
        target = staging / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    log.info("launcher installed: %d files into %s", len(files), final)
    return final


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        install(args.dest)
    except OSError as exc:
        log.error("cannot install the launcher into %s: %s", args.dest, exc)
        return 1
    return 0
