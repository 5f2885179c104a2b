"""The e2e guard: the scenarios touch only the cluster e2e/kind-up.sh made, and skip where there is none.

kind-up.sh marks its cluster twice: a random token in the ConfigMap kube-system/quantrol-e2e-owner, and the same
token with the context's name in e2e/.kind-context (git-ignored, so it never leaves this checkout). Then:

- no kubeconfig, or no current context: the suite skips, with one line saying why;
- a current context other than the one in e2e/.kind-context (or no such file): pytest stops, refusing, before
  any request reaches that cluster — it may be a shared or a production one;
- the right context, but its API server does not answer (the kind cluster was deleted, Docker is stopped): skip;
- an API server that answers but does not hold the token (another cluster under the same context name): refuse.

Everything the scenarios do afterwards goes to the context named here, never to "the current one" again, so a
`kubectl config use-context` during a run cannot redirect them.
"""

from __future__ import annotations

import functools
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

MARKER = Path(__file__).resolve().parent / ".kind-context"
OWNER_NAMESPACE = "kube-system"
OWNER_CONFIGMAP = "quantrol-e2e-owner"
UP = "bash e2e/kind-up.sh"


@dataclass(frozen=True)
class Cluster:
    context: str
    kubeconfig: str


def _skip(why: str) -> str:
    return f"E2E SKIPPED, NO CLUSTER: {why} (create one with `{UP}`; e2e/README.md)"


def _refuse(why: str) -> NoReturn:
    pytest.exit(f"E2E REFUSED: {why}. The e2e scenarios create and delete objects, so they run only against the "
                f"cluster `{UP}` made (e2e/guard.py).", returncode=int(pytest.ExitCode.USAGE_ERROR))


def read_marker(path: Path = MARKER) -> dict[str, str]:
    """`key=value` lines of e2e/.kind-context (comments skipped); empty when the file is missing."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _owner_configmap(api: Any, context: str) -> dict[str, str] | str:
    """The owner ConfigMap's data (reading it is the reachability check too), why the suite skips (the API server
    does not answer), or a refusal (it answers, without that ConfigMap)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        owner = client.CoreV1Api(api).read_namespaced_config_map(OWNER_CONFIGMAP, OWNER_NAMESPACE, _request_timeout=10)
    except ApiException as exc:
        _refuse(f"context {context!r} answers, but its ConfigMap {OWNER_NAMESPACE}/{OWNER_CONFIGMAP} cannot be read "
                f"({exc.status} {exc.reason}): it is not the cluster e2e/.kind-context was written for")
    except (HTTPError, OSError) as exc:
        return _skip(f"the API server of context {context!r} is unreachable ({type(exc).__name__})")
    return dict(owner.data or {})


def kubeconfig_path() -> str:
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


@functools.cache
def check_cluster() -> Cluster | str:
    """The guarded cluster, or why the suite skips; a refusal stops pytest (see the module's doc). Cached: one
    verdict per session."""
    from kubernetes import config

    path = kubeconfig_path()
    try:
        _, current = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError, ValueError, TypeError) as exc:
        return _skip(f"no usable kubeconfig at {path} ({exc})")
    context = str((current or {}).get("name") or "")
    if not context:
        return _skip(f"the kubeconfig {path} names no current context")
    marker = read_marker()
    if marker.get("context") != context or not marker.get("token"):
        made = f"it made {marker['context']!r}" if marker.get("context") else "e2e/.kind-context does not exist"
        _refuse(f"the current kube context {context!r} was not made by `{UP}` ({made}); switch to the e2e "
                f"cluster's context, or create it")
    try:
        api = config.new_client_from_config(config_file=path, context=context)  # type: ignore[no-untyped-call]
    except config.ConfigException as exc:
        return _skip(f"context {context!r} cannot be loaded ({exc})")
    try:
        owner = _owner_configmap(api, context)
    finally:
        api.close()
    if isinstance(owner, str):
        return owner
    token = str(owner.get("token") or "")
    if not hmac.compare_digest(token.encode(), marker["token"].encode()):
        _refuse(f"the cluster behind context {context!r} holds another token than e2e/.kind-context: it was not made "
                "by this checkout's kind-up.sh")
    return Cluster(context=context, kubeconfig=path)


def require_cluster() -> Cluster:
    """The guarded cluster for a fixture; skips (or refuses) as check_cluster says."""
    verdict = check_cluster()
    if isinstance(verdict, str):
        pytest.skip(verdict)
    return verdict
