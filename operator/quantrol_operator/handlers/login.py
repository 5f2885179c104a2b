"""Log in with an explicit kubeconfig (or the pod's service account).

The kubernetes client reads `$KUBECONFIG` once, when it is imported, and kopf's default login uses that
snapshot: a process that sets `$KUBECONFIG` later (tests, the demo) would silently talk to `~/.kube/config`.
Here the path is read at every login, so the operator always talks to the cluster it was pointed at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kopf
import kubernetes

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@kopf.on.login()
def login(logger: kopf.Logger, **_: Any) -> kopf.ConnectionInfo:
    config = kubernetes.client.Configuration()
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
        namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.exists() else None
        logger.debug("Logging in with the pod's service account.")
    else:
        path = kubeconfig or str(Path("~/.kube/config").expanduser())
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=config, persist_config=False
        )
        _, active = kubernetes.config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
        namespace = (active or {}).get("context", {}).get("namespace")
        logger.debug("Logging in with kubeconfig %s.", path)
    return _connection_info(config, namespace)


def _connection_info(config: Any, namespace: str | None) -> kopf.ConnectionInfo:
    # kubernetes>=36 keeps the bearer token under "BearerToken"; older versions under "authorization".
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    parts = str(header).split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=str(config.host),
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        default_namespace=namespace,
    )
