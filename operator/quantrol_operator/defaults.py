"""What the operator fills in where a spec leaves a choice open; set per installation through env vars."""

from __future__ import annotations

import os
from dataclasses import dataclass

from quantrol_operator import __version__


@dataclass(frozen=True)
class OperatorDefaults:
    worker_image: str = f"ghcr.io/quantrol/worker:{__version__}"
    serving_image: str = f"ghcr.io/quantrol/serve:{__version__}"
    router_image: str = f"ghcr.io/quantrol/serve:{__version__}"
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    # How often children are re-read while a calibration or rollout is in flight (reads only, no writes).
    poll_seconds: float = 5.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorDefaults:
        env = dict(os.environ) if env is None else env
        base = cls()
        return cls(
            worker_image=env.get("QUANTROL_WORKER_IMAGE", base.worker_image),
            serving_image=env.get("QUANTROL_SERVING_IMAGE", base.serving_image),
            router_image=env.get("QUANTROL_ROUTER_IMAGE", base.router_image),
            prometheus_url=env.get("QUANTROL_PROMETHEUS_URL", base.prometheus_url),
            poll_seconds=float(env.get("QUANTROL_POLL_SECONDS", base.poll_seconds)),
        )
