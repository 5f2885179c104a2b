"""Cluster Service and pod addresses, resolved through the local stack's services.json when there is one.

On a cluster, `http://name.namespace.svc:port` resolves through DNS, a pod answers on its pod IP, and this
module changes nothing. Under the local workload runner (a development stand-in for the kubelet), every
process gets `QUANTROL_LOCAL_SERVICES` naming a JSON file

    {"ns/name": {"host": "127.0.0.1", "ports": {"8000": 41234}},                  # Services
     "pods": {"ns/pod": {"host": "127.0.0.1", "ports": {"8080": 41240}}}}         # running pods

URLs that name a Service found there are rewritten to the local port. Pods all share the IP 127.0.0.1 there,
each containerPort mapped to a port of its own, so a pod's address is looked up by namespace and name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

ENV = "QUANTROL_LOCAL_SERVICES"
PODS = "pods"  # the section of running pods ("pods" has no "/", so it never collides with a Service key)
_SVC_URL = re.compile(r"^(?P<scheme>https?)://(?P<name>[a-z0-9-]+)\.(?P<ns>[a-z0-9-]+)\.svc(?:\.cluster\.local)?"
                      r":(?P<port>\d+)(?P<rest>/.*)?$")
_cache: dict[str, tuple[float, dict[str, Any]]] = {}


def _table() -> dict[str, Any] | None:
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        mtime = Path(path).stat().st_mtime
    except FileNotFoundError:
        return {}
    cached = _cache.get(path)
    if cached is None or cached[0] != mtime:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cached[1] if cached else {}  # the runner rewrites the file; a half-written read is skipped
        _cache[path] = (mtime, data)
        return dict(data)
    return cached[1]


def resolve(url: str) -> str:
    """`url` with a local Service address substituted, or unchanged (cluster DNS, or not a Service URL)."""
    table = _table()
    if table is None:
        return url
    match = _SVC_URL.match(url)
    if match is None:
        return url
    entry = table.get(f"{match['ns']}/{match['name']}")
    port = (entry or {}).get("ports", {}).get(match["port"])
    if not entry or port is None:
        return url
    return f"{match['scheme']}://{entry['host']}:{port}{match['rest'] or ''}"


def service_url(name: str, namespace: str, port: int, path: str = "") -> str:
    return resolve(f"http://{name}.{namespace}.svc:{port}{path}")


def pod_url(ip: str, namespace: str, name: str, port: int, path: str = "") -> str | None:
    """The URL of one pod's containerPort, or None while the pod cannot be reached there.

    On a cluster: `http://<pod IP>:<port>` (None without an IP yet). Under the local runner: the pod's local
    port from the file's `pods` section, or None while the file does not list the pod (not running yet): its
    IP 127.0.0.1 with the containerPort would reach whatever else listens there.
    """
    if not ip:
        return None
    table = _table()
    if table is None:
        host = f"[{ip}]" if ":" in ip else ip  # an IPv6 pod IP
        return f"http://{host}:{port}{path}"
    entry = (table.get(PODS) or {}).get(f"{namespace}/{name}") or {}
    local = (entry.get("ports") or {}).get(str(port))
    if local is None:
        return None
    return f"http://{entry.get('host', ip)}:{local}{path}"
