"""Every container Quantrol builds for the samples runs something its image has: checked statically, from the
repository's Dockerfiles and pyproject's entry points, for the children of every file in e2e/samples.

What an image holds is read, not assumed: a Dockerfile that pip-installs this project (`pip install … .`) puts its
console scripts (pyproject `[project.scripts]`) and packages into the image; `ENV PATH` says where. The stock
upstream engine image cannot be read from here: what it holds is the one declared fact below, with its source.
For each container: its program exists in its image; a `quantrol-worker` subcommand exists in the CLI; a
`python3 -m` module exists in the image, or in a folder an init container of the same pod delivered it to from an
image that has it; every absolute path it is told about lies on one of its volume mounts (or is the kubelet's
termination-message file).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantrol_operator.children import calibration
from quantrol_operator.defaults import OperatorDefaults
from quantrol_operator.planning.quantizedmodel import QmObserved
from quantrol_operator.planning.quantizedmodel import plan as plan_qm
from quantrol_operator.planning.servingpolicy import Images, SpObserved, read_spec
from quantrol_operator.planning.servingpolicy import plan as plan_sp
from quantrol_worker.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "e2e" / "samples").glob("*.yaml"))
TERMINATION_PATHS = {"/dev/termination-log"}  # written by the kubelet into every container


@dataclass(frozen=True)
class ImageFacts:
    source: str
    programs: frozenset[str]
    packages: frozenset[str]  # importable top-level packages that matter here
    path_dirs: frozenset[str] = field(default_factory=frozenset)  # the image's ENV PATH entries it installed into


# vllm/vllm-openai (docker/Dockerfile upstream, target vllm-openai): vLLM installed into the image's Python, which is
# on PATH as python3, with its dependencies (pydantic, prometheus_client among them); ENTRYPOINT is vLLM's own.
# Nothing of Quantrol's is in it.
STOCK_VLLM = ImageFacts("upstream vllm/vllm-openai (declared)", frozenset({"python3", "python", "vllm"}),
                        frozenset({"vllm", "pydantic", "prometheus_client"}))


def project_scripts() -> frozenset[str]:
    return frozenset(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def project_packages() -> frozenset[str]:
    return frozenset(p.parent.name for p in ROOT.glob("*/quantrol_*/__init__.py") if p.parent.parent.name != "devstack")


def dockerfile_facts(path: Path) -> ImageFacts:
    """What a Dockerfile of this repository puts into its final image."""
    text = path.read_text()
    base = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)[-1]
    installs_project = re.search(r"pip install[^\n]*\s\.(\s|$|\\)", text) or re.search(r"pip install[^\n]*\"\.\[",
                                                                                         text)
    programs = {"python3", "python"}
    packages: set[str] = set()
    if installs_project:
        programs |= project_scripts()
        packages |= project_packages()
    inherited = STOCK_VLLM if "VLLM_IMAGE" in base or "vllm" in base else None
    if inherited is not None:
        programs |= inherited.programs
        packages |= inherited.packages
    path_dirs = {d for line in re.findall(r"^ENV\s+PATH=(\S+)", text, flags=re.MULTILINE)
                 for d in line.split(":") if d.startswith("/") and "$" not in d}
    return ImageFacts(str(path.relative_to(ROOT)), frozenset(programs), frozenset(packages), frozenset(path_dirs))


def image_facts(image: str) -> ImageFacts:
    """The image a reference names, by the repositories this project builds (README: Images) or upstream's."""
    name = image.rsplit("@", 1)[0].rsplit(":", 1)[0] if "/" in image else image
    built = {"ghcr.io/quantrol/operator": "operator/Dockerfile", "ghcr.io/quantrol/worker": "worker/Dockerfile",
             "ghcr.io/quantrol/serve": "worker/serve.Dockerfile"}
    if name in built:
        return dockerfile_facts(ROOT / built[name])
    if name in ("vllm/vllm-openai", "docker.io/vllm/vllm-openai"):
        return STOCK_VLLM
    raise AssertionError(f"{image}: no Dockerfile in this repository builds it and it is not a known upstream image")


def children(sample: Path) -> list[dict[str, Any]]:
    """The pod templates the operator builds for `sample` with its default images (stock defaults, no chart)."""
    obj = yaml.safe_load(sample.read_text())
    obj["metadata"].update(uid="uid", generation=1)
    defaults = OperatorDefaults()
    if obj["kind"] == "QuantizedModel":
        built = plan_qm(QmObserved(obj), defaults.worker_image).apply
    else:
        candidate = "oci://registry.example.com/models/candidate@sha256:" + "c" * 64
        qm = {"metadata": {"name": obj["spec"]["candidate"]["quantizedModelRef"]["name"], "generation": 1},
              "status": {"phase": "Ready", "observedGeneration": 1, "artifact": {"ref": candidate[6:]},
                         "conditions": [{"type": "QualityQualified", "status": "True", "reason": "Succeeded"}]}}
        images = Images(defaults.serving_image, defaults.router_image, defaults.tools_image)
        built = plan_sp(SpObserved(obj=obj, spec=read_spec(obj), quantized_model=qm), images).apply
    return [o["spec"]["template"] for o in built if o["kind"] in ("Job", "Deployment")]


def worker_subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices or ())


def _mounted(path: str, container: dict[str, Any]) -> bool:
    mounts = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts") or []]
    return path in TERMINATION_PATHS or any(path == m or path.startswith(m + "/") for m in mounts)


def _delivered(folder: str, pod: dict[str, Any], volume_of: dict[str, str]) -> ImageFacts | None:
    """The facts of the init container that wrote `folder`'s volume with `install-launcher`, if one did."""
    for init in pod.get("initContainers") or []:
        command = init.get("command") or []
        if command[:2] == ["quantrol-worker", "install-launcher"] and "--dest" in command:
            dest = command[command.index("--dest") + 1]
            same = {m["name"] for m in init.get("volumeMounts") or [] if m["mountPath"] == dest}
            if volume_of.get(folder) in same:
                return image_facts(init["image"])
    return None


def check_container(container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    facts = image_facts(container["image"])
    command = [*(container.get("command") or []), *(container.get("args") or [])]
    name, problems = container["name"], []
    for mount in container.get("volumeMounts") or []:  # a volume hides what the image keeps under its path
        hidden = [d for d in facts.path_dirs if d == mount["mountPath"] or d.startswith(mount["mountPath"] + "/")]
        if hidden:
            problems.append(f"{name}: volume {mount['name']} at {mount['mountPath']} hides {hidden} of its image")
    if not command or command[0] not in facts.programs:
        problems.append(f"{name}: {command[:1]} is not in {container['image']} ({facts.source})")
        return problems
    env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
    volume_of = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
    if command[0] == "quantrol-worker" and command[1] not in worker_subcommands():
        problems.append(f"{name}: quantrol-worker has no subcommand {command[1]!r}")
    if command[0].startswith("python") and command[1:2] == ["-m"]:
        module = command[2]
        path = ROOT / "worker" / Path(*module.split("."))
        if not ((path / "__main__.py").is_file() or path.with_suffix(".py").is_file()):
            problems.append(f"{name}: module {module} is not in this repository")
        top = module.split(".")[0]
        in_image = top in facts.packages
        delivered = [_delivered(p, pod, volume_of) for p in env.get("PYTHONPATH", "").split(":") if p]
        if not in_image and not any(d is not None and top in d.packages for d in delivered):
            problems.append(f"{name}: {top} is neither in {container['image']} nor delivered to its PYTHONPATH")
    for arg in [a for a in [*command[1:], *env.values()] if "://" not in a]:  # a URI is no path of the pod
        for path in re.findall(r"(?<![\w:])(/[\w.-]+(?:/[\w.-]+)*)", arg):
            if not _mounted(path, container):
                problems.append(f"{name}: {path} (in {arg!r}) lies on none of its volume mounts")
    return problems


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_every_container_of_every_sample_runs_what_its_image_holds(sample: Path) -> None:
    problems = []
    for template in children(sample):
        pod = template["spec"]
        for container in [*(pod.get("initContainers") or []), *pod["containers"]]:
            problems += check_container(container, pod)
    assert problems == [], "\n".join(problems)


def test_the_serving_sample_runs_a_stock_vllm_image() -> None:
    """The design the README states: the engine is upstream's image, Quantrol's parts come from its tools image."""
    (arm, *_rest) = [t for t in children(ROOT / "e2e/samples/servingpolicy-llama-8b.yaml")
                     if t["metadata"]["labels"].get("quantrol.io/arm")]
    engine = next(c for c in arm["spec"]["containers"] if c["name"] == "engine")
    assert image_facts(engine["image"]) is STOCK_VLLM


def test_the_check_catches_a_command_an_image_lacks() -> None:
    """The check is only as good as its refusals: the old design (quantrol-worker in a stock vLLM image) fails it,
    as does a launcher volume nobody fills or a path off every mount."""
    template = next(t for t in children(ROOT / "e2e/samples/servingpolicy-llama-8b.yaml")
                    if t["metadata"]["labels"].get("quantrol.io/arm"))
    pod = template["spec"]
    engine = next(c for c in pod["containers"] if c["name"] == "engine")
    old = {**engine, "command": ["quantrol-worker", *engine["command"][3:]]}
    assert any("is not in vllm/vllm-openai" in p for p in check_container(old, pod))
    unfilled = {**pod, "initContainers": [c for c in pod["initContainers"] if c["name"] != "launcher"]}
    assert any("nor delivered" in p for p in check_container(engine, unfilled))
    stray = {**engine, "command": [*engine["command"], "--download-dir", "/root/.cache"]}
    assert any("/root/.cache" in p for p in check_container(stray, pod))
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch")
    shadowed = {**fetch, "volumeMounts": [*fetch["volumeMounts"], {"name": "quantrol", "mountPath": "/opt/quantrol"}]}
    assert any("hides" in p for p in check_container(shadowed, pod))  # the operator image's Python lives there
    assert calibration.CONFIG_DIR.startswith("/")  # the Job's config path is checked the same way
