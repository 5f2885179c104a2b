"""Whether a registry credentials Secret a spec names can be used, read by name and never copied.

The Secret is mounted into the pods that reach registries; the operator only looks at its type and keys, so that a
missing or wrong Secret is said in status (naming the field) instead of a pod stuck on a failed mount. Its data never
leaves this function: not into status, logs or Events.
"""

from __future__ import annotations

from quantrol_operator.children.calibration import DOCKER_CONFIG_KEY
from quantrol_operator.kube import Kube

DOCKER_CONFIG_TYPE = "kubernetes.io/dockerconfigjson"


def docker_config_problem(kube: Kube, namespace: str, name: str, field: str) -> str | None:
    """Why the Secret `name` cannot serve as registry credentials (None: it can), in words naming `field`."""
    secret = kube.get("v1", "Secret", namespace, name)
    create = (f"kubectl -n {namespace} create secret docker-registry {name} --docker-server=REGISTRY "
              "--docker-username=USER --docker-password=PASSWORD")
    if secret is None:
        return f"{field}: Secret {name} not found in namespace {namespace}; create it: {create}"
    keys = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
    if DOCKER_CONFIG_KEY not in keys:
        kind = secret.get("type") or "Opaque"
        return (f"{field}: Secret {name} (type {kind}) has no {DOCKER_CONFIG_KEY} key: registry credentials are a "
                f"{DOCKER_CONFIG_TYPE} Secret ({create})")
    return None
