"""`quantrol demo --quick`: a 30-second check of the embedded stack, without engines or calibration.

The local stack starts for real, the CRDs generated from the API models are registered, the operator runs as
`kopf run` and watches both kinds, the same YAML a user would `kubectl apply` is printed and applied, a broken spec
is refused with the field named, and an artifact travels through the registry by digest. The whole story is
`quantrol demo` (demo_story.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import urllib.request
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
    """Push a file, then fetch it back by digest and check the bytes: what serving pods will do."""
    import oras.client  # dev/serve/calibrate extras all carry oras

    assert stack.registry is not None
    target = f"{stack.registry.address}/quantrol/demo-envelope"
    client = oras.client.OrasClient(hostname=stack.registry.address, insecure=True)
    response = client.push(target=f"{target}:v1", files=[str(payload)], disable_path_validation=True)
    digest = str(response.headers["Docker-Content-Digest"])
    manifest = client.get_manifest(f"{target}@{digest}")
    blob = manifest["layers"][0]["digest"]
    with urllib.request.urlopen(f"{stack.registry.url}/v2/quantrol/demo-envelope/blobs/{blob}", timeout=10) as rsp:
        fetched = rsp.read()
    if "sha256:" + hashlib.sha256(fetched).hexdigest() != blob:
        raise RuntimeError(f"registry returned bytes that do not match {blob}")
    return f"{target}@{digest}"


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
