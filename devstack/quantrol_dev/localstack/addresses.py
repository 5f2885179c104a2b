"""The local stack's stand-in for the cluster network: Service and pod addresses from the runner's services.json.

Every process the local workload runner starts (and the operator the stack starts) gets
`QUANTROL_ADDRESS_RESOLVER=quantrol_dev.localstack.addresses:from_env` and `QUANTROL_LOCAL_SERVICES` naming a file

    {"ns/name": {"host": "127.0.0.1", "ports": {"8000": 41234}},                  # Services
     "pods": {"ns/pod": {"host": "127.0.0.1", "ports": {"8080": 41240}}}}         # running pods

URLs that name a Service found there are rewritten to the local port. Pods all share the IP 127.0.0.1 there, each
containerPort mapped to a port of its own, so a pod's address is looked up by namespace and name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from quantrol_worker.addresses import RESOLVER_ENV

SERVICES_ENV = "QUANTROL_LOCAL_SERVICES"
PODS = "pods"  # the section of running pods ("pods" has no "/", so it never collides with a Service key)
_SVC_URL = re.compile(r"^(?P<scheme>https?)://(?P<name>[a-z0-9-]+)\.(?P<ns>[a-z0-9-]+)\.svc(?:\.cluster\.local)?"
                      r":(?P<port>\d+)(?P<rest>/.*)?$")


def environment(services: Path) -> dict[str, str]:
    """What a process needs to resolve addresses through `services` (the runner's services.json)."""
    return {RESOLVER_ENV: f"{__name__}:from_env", SERVICES_ENV: str(services)}


class ServicesFile:
    """Addresses from a services.json the runner rewrites while pods come and go (re-read when it changes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached: tuple[float, dict[str, Any]] | None = None

    def _table(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if self._cached is None or self._cached[0] != mtime:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return self._cached[1] if self._cached else {}  # a half-written read is skipped
            self._cached = (mtime, dict(data))
        return self._cached[1]

    def url(self, url: str) -> str:
        match = _SVC_URL.match(url)
        if match is None:
            return url
        entry = self._table().get(f"{match['ns']}/{match['name']}")
        port = (entry or {}).get("ports", {}).get(match["port"])
        if not entry or port is None:
            return url
        return f"{match['scheme']}://{entry['host']}:{port}{match['rest'] or ''}"

    def pod_url(self, ip: str, namespace: str, name: str, port: int, path: str = "") -> str | None:
        """The pod's local port from the file's `pods` section, or None while the file does not list the pod (not
        running yet): its IP 127.0.0.1 with the containerPort would reach whatever else listens there."""
        if not ip:
            return None
        entry = (self._table().get(PODS) or {}).get(f"{namespace}/{name}") or {}
        local = (entry.get("ports") or {}).get(str(port))
        if local is None:
            return None
        return f"http://{entry.get('host', ip)}:{local}{path}"


def from_env() -> ServicesFile:
    """The factory QUANTROL_ADDRESS_RESOLVER names: the file in QUANTROL_LOCAL_SERVICES."""
    path = os.environ.get(SERVICES_ENV)
    if not path:
        raise RuntimeError(f"{SERVICES_ENV} is not set: the local stack's resolver needs the runner's services.json")
    return ServicesFile(Path(path))
