"""Where a cluster Service or pod answers, as the pods Quantrol creates and the operator reach them.

On a cluster a Service URL (`http://name.namespace.svc:port`) resolves through DNS and a pod answers on its pod IP:
`ClusterAddresses` changes nothing and looks nothing up. A development stand-in for the cluster network (the local
stack's, in the development package) is chosen once at start-up by naming its factory in
`QUANTROL_ADDRESS_RESOLVER=module:factory`; production code never knows which one it holds.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Protocol, cast

RESOLVER_ENV = "QUANTROL_ADDRESS_RESOLVER"


class Addresses(Protocol):
    def url(self, url: str) -> str:
        """Where to send a request for `url` (a Service URL, or any other URL, returned as it is)."""
        ...

    def pod_url(self, ip: str, namespace: str, name: str, port: int, path: str = "") -> str | None:
        """One pod's containerPort, or None while the pod cannot be reached there (no IP yet)."""
        ...


def service_url(name: str, namespace: str, port: int, path: str = "") -> str:
    return f"http://{name}.{namespace}.svc:{port}{path}"


class ClusterAddresses:
    """Cluster DNS and pod IPs: the production resolver."""

    def url(self, url: str) -> str:
        return url

    def pod_url(self, ip: str, namespace: str, name: str, port: int, path: str = "") -> str | None:
        if not ip:
            return None
        host = f"[{ip}]" if ":" in ip else ip  # an IPv6 pod IP
        return f"http://{host}:{port}{path}"


def from_environment(env: Mapping[str, str] | None = None) -> Addresses:
    """The resolver named by QUANTROL_ADDRESS_RESOLVER (`module:factory`), else the cluster's."""
    spec = (os.environ if env is None else env).get(RESOLVER_ENV, "").strip()
    if not spec:
        return ClusterAddresses()
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise ValueError(f"{RESOLVER_ENV}={spec!r}: expected module:factory")
    factory = cast(Callable[[], Addresses], getattr(importlib.import_module(module), attribute))
    return factory()
