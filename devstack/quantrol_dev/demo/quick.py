"""`quantrol demo --quick`: a 30-second check of the embedded stack, without engines or calibration.

The local stack starts for real, the CRDs generated from the API models are registered, the operator runs as
`kopf run` and watches both kinds, the same YAML a user would `kubectl apply` is printed and applied, a broken spec
is refused with the field named, and an artifact travels through the registry by digest. The whole story is
`quantrol demo` (demo_story.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client.exceptions import ApiException

from quantrol_dev.localstack.procs import wait_until
from quantrol_dev.localstack.stack import LocalStack
from quantrol_operator.kube import Kube
from quantrol_operator.validation import validate_object

SAMPLES = Path(__file__).resolve().parents[3] / "e2e" / "samples"


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _apply(kube: Kube, obj: dict[str, Any]) -> None:
    namespace = obj["metadata"].get("namespace", "default")
    try:
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    except ApiException as exc:
        if exc.status != 409:  # already there is fine, as with `kubectl create namespace` twice
            raise
    kube.create(obj)


def _reconciled(kube: Kube, obj: dict[str, Any]) -> bool:
    """Whether the operator has reconciled this generation: it wrote the object's status."""
    meta = obj["metadata"]
    found = kube.get(obj["apiVersion"], obj["kind"], meta.get("namespace", "default"), meta["name"]) or {}
    return (found.get("status") or {}).get("observedGeneration") == (found.get("metadata") or {}).get("generation")


def _registry_roundtrip(stack: LocalStack, payload: Path) -> str:
    """Push a file to the private registry with the credentials a user would put in a docker-config Secret, then
    fetch it back by digest, every byte verified: what calibration Jobs and serving pods do."""
    from quantrol_worker.oci import ArtifactError, pull, push

    assert stack.registry is not None
    os.environ.update(stack.registry.client_env())  # this process is the user's machine: it trusts the CA
    credentials = stack.registry.write_docker_config(payload.parent / "docker-config.json")
    folder = payload.parent / "envelope"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(payload, folder / payload.name)
    target = f"{stack.registry.address}/quantrol/demo-envelope"
    try:
        push(folder, target, insecure=False, tag="v1", annotations={})
    except ArtifactError as refused:
        _say(f"without credentials the registry refuses: {refused.message}")
    ref = push(folder, target, insecure=False, tag="v1", annotations={}, credentials=credentials)
    pull(f"oci://{ref}", payload.parent / "fetched", insecure=False, credentials=credentials)
    return ref


def run_demo(output: Path) -> int:
    began = time.monotonic()
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    workdir = output / "stack"
    shutil.rmtree(workdir, ignore_errors=True)  # a previous run's logs; nothing of it is reused
    documents = [yaml.safe_load(path.read_text()) for path in sorted(SAMPLES.glob("*.yaml"))]
    with LocalStack(workdir, progress=_say) as stack:
        assert stack.kubeconfig is not None
        kube = Kube.from_kubeconfig(str(stack.kubeconfig))
        for obj in documents:
            print("---\n" + yaml.safe_dump(obj, sort_keys=False), end="", flush=True)
            _apply(kube, obj)
            name = f"{obj['kind']} {obj['metadata']['namespace']}/{obj['metadata']['name']}"
            wait_until(partial(_reconciled, kube, obj), timeout=30, interval=0.2, what=f"{name} reconciled")
            _say(f"applied {name}; the operator has reconciled it (its status is written)")
        kube.close()

        broken = json.loads(json.dumps(documents[-1]))
        broken["spec"]["rollout"]["canarySteps"] = [{"weight": 50}, {"weight": 25}]
        errors = validate_object(broken)
        _say("a ServingPolicy with canary weights 50 → 25 is refused: " + "; ".join(map(str, errors)))

        envelope = output / "stack.json"
        assert stack.kubeapi is not None and stack.prometheus is not None
        envelope.write_text(json.dumps({"kubeapi": stack.kubeapi.url, "prometheus": stack.prometheus.url}))
        ref = _registry_roundtrip(stack, envelope)
        _say(f"pushed and pulled back by digest: {ref}")
    _say(f"every process stopped; demo took {time.monotonic() - began:.1f}s; output in {output}")
    print(
        "Stage reached: stack + CRDs + operator watching. Calibration, serving arms and the SLO loop "
        "arrive with their issues (see README).",
        file=sys.stderr,
    )
    return 0
