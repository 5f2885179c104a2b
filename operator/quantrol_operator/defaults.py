"""What the operator fills in where a spec leaves a choice open; set per installation through env vars."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from quantrol_operator import __version__


@dataclass(frozen=True)
class OperatorDefaults:
    worker_image: str = f"ghcr.io/quantrol/worker:{__version__}"
    serving_image: str = f"ghcr.io/quantrol/serve:{__version__}"
    router_image: str = f"ghcr.io/quantrol/serve:{__version__}"
    # The serving pods' init steps (launcher delivery, artifact fetch): torch-free, this operator's release.
    tools_image: str = f"ghcr.io/quantrol/operator:{__version__}"
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    # How often children are re-read while a calibration or rollout is in flight (reads only, no writes).
    poll_seconds: float = 5.0
    # One Prometheus Operator PodMonitor per ServingPolicy: `auto` (when the API server serves the kind, found out
    # once at start-up), `true` or `false`. The pods' scrape annotations stay either way, for a plain Prometheus.
    pod_monitors: str = "auto"
    # Labels every PodMonitor carries besides Quantrol's own: what the Prometheus selects them by
    # (kube-prometheus-stack: `release=<its release name>`). `QUANTROL_POD_MONITOR_LABELS=k=v,k2=v2`.
    pod_monitor_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pod_monitors not in POD_MONITOR_MODES:
            raise ValueError(f"QUANTROL_POD_MONITORS must be one of {', '.join(POD_MONITOR_MODES)}, "
                             f"not {self.pod_monitors!r}")

    def pod_monitors_enabled(self, served: Callable[[], bool]) -> tuple[bool, str]:
        """(whether to write PodMonitors, why); `served` asks the API server, and is called only in `auto` mode."""
        if self.pod_monitors != "auto":
            return self.pod_monitors == "true", f"QUANTROL_POD_MONITORS={self.pod_monitors}"
        if served():
            return True, "QUANTROL_POD_MONITORS=auto and the API server serves monitoring.coreos.com/v1 podmonitors"
        return False, ("QUANTROL_POD_MONITORS=auto and the API server does not serve monitoring.coreos.com/v1 "
                       "podmonitors (restart the operator after installing the Prometheus Operator's CRDs)")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorDefaults:
        env = dict(os.environ) if env is None else env
        base = cls()
        return cls(
            worker_image=env.get("QUANTROL_WORKER_IMAGE", base.worker_image),
            serving_image=env.get("QUANTROL_SERVING_IMAGE", base.serving_image),
            router_image=env.get("QUANTROL_ROUTER_IMAGE", base.router_image),
            tools_image=env.get("QUANTROL_TOOLS_IMAGE", base.tools_image),
            prometheus_url=env.get("QUANTROL_PROMETHEUS_URL", base.prometheus_url),
            poll_seconds=float(env.get("QUANTROL_POLL_SECONDS", base.poll_seconds)),
            pod_monitors=env.get("QUANTROL_POD_MONITORS", base.pod_monitors).strip().lower() or base.pod_monitors,
            pod_monitor_labels=parse_labels(env.get("QUANTROL_POD_MONITOR_LABELS", "")),
        )


POD_MONITOR_MODES = ("auto", "true", "false")


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (kubectl's selector syntax; label keys and values hold neither `,` nor `=`) to a dict."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"QUANTROL_POD_MONITOR_LABELS: {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels
