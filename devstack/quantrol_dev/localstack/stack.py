"""The whole local stack in one object: API emulation, Prometheus, OCI registry, the workload runner and the
real operator.

Used by `quantrol demo` and by tests that need everything at once. Each part is started on 127.0.0.1,
waited for with a bounded timeout, and stopped in reverse order, even when a later part fails to start.

With an `image_map`, the local workload runner (the kubelet stand-in, runner.py) runs the operator's Jobs and
Deployments as local processes; the operator then resolves Services through the runner's services.json
(localstack.addresses, chosen with QUANTROL_ADDRESS_RESOLVER), queries this Prometheus
(QUANTROL_PROMETHEUS_URL), and Prometheus scrapes every router the runner serves (scrape.py). Without one, Jobs
and Deployments are only objects in the API.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from quantrol_dev.localstack import addresses
from quantrol_dev.localstack.kubeapi import KubeAPIServer, OperatorProcess
from quantrol_dev.localstack.prometheus import PrometheusServer, start_prometheus
from quantrol_dev.localstack.registry import RegistryServer, start_registry
from quantrol_dev.localstack.runner import LocalRunner
from quantrol_dev.localstack.runner_plan import ImageEnv
from quantrol_dev.localstack.scrape import RouterScrapeSync
from quantrol_operator import crdgen

log = logging.getLogger(__name__)


@dataclass
class LocalStack:
    workdir: Path
    with_operator: bool = True
    progress: Callable[[str], None] = log.info
    image_map: Sequence[ImageEnv] | None = None  # None: no runner (Jobs and Deployments stay objects)
    operator_env: Mapping[str, str] = field(default_factory=dict)  # e.g. QUANTROL_WORKER_IMAGE
    runner_env: Mapping[str, str] = field(default_factory=dict)  # added to every process the runner starts
    runner_poll: float = 0.3
    # A private registry, as a cluster's would be: htpasswd users over TLS (registry.login); the runner's pods trust
    # its CA. False: anonymous plain HTTP.
    secure_registry: bool = True
    kubeapi: KubeAPIServer | None = field(default=None, init=False)
    kubeconfig: Path | None = field(default=None, init=False)
    prometheus: PrometheusServer | None = field(default=None, init=False)
    registry: RegistryServer | None = field(default=None, init=False)
    operator: OperatorProcess | None = field(default=None, init=False)
    runner: LocalRunner | None = field(default=None, init=False)
    scrape: RouterScrapeSync | None = field(default=None, init=False)
    _stops: list[Callable[[], None]] = field(default_factory=list, init=False)

    def start(self) -> Self:
        if self._stops:
            raise RuntimeError("this LocalStack is already running; stop() it first")
        # Every path the stack writes into a config file or hands to a child process derives from this one, and
        # children do not share our working folder: relative paths broke Prometheus' file_sd (issue 12).
        self.workdir = self.workdir.resolve()
        progress = self.progress
        try:
            crds = self.workdir / "crds"
            crdgen.write_all(crds)  # the CRDs of this very version, registered like `kubectl apply`
            self.kubeapi = KubeAPIServer(self.workdir / "kubeapi", crds_dir=crds).start()
            self._stops.append(self.kubeapi.stop)
            self.kubeconfig = self.kubeapi.write_kubeconfig()
            progress(f"Kubernetes API emulation (KMock) on {self.kubeapi.url}, kubeconfig {self.kubeconfig}")

            self.prometheus = start_prometheus(workdir=self.workdir / "prometheus")
            self._stops.append(self.prometheus.stop)
            progress(f"Prometheus on {self.prometheus.url}")

            self.registry = start_registry(workdir=self.workdir / "registry", secure=self.secure_registry)
            self._stops.append(self.registry.stop)
            login = "htpasswd over TLS, its own CA" if self.secure_registry else "anonymous, plain HTTP"
            progress(f"OCI registry (CNCF distribution) on {self.registry.address} ({login})")

            operator_env = {"QUANTROL_PROMETHEUS_URL": self.prometheus.url}
            if self.image_map is not None:
                self.runner = LocalRunner(kubeconfig=self.kubeconfig, image_map=self.image_map,
                                          state_dir=self.workdir / "runner", poll_interval=self.runner_poll,
                                          extra_env={**self.registry.client_env(), **self.runner_env}).start()
                self._stops.append(self.runner.stop)
                operator_env.update(addresses.environment(self.runner.services_path))
                progress(f"local workload runner (kubelet stand-in), pod logs under {self.runner.state_dir}/pods")
                self.scrape = RouterScrapeSync(kubeconfig=self.kubeconfig, services_path=self.runner.services_path,
                                               prometheus=self.prometheus).start()
                self._stops.append(self.scrape.stop)

            if self.with_operator:
                self.operator = OperatorProcess(self.kubeconfig, self.workdir / "operator",
                                                env={**operator_env, **self.operator_env}).start()
                self._stops.append(self.operator.stop)
                progress(f"operator (kopf run) watching, log {self.operator.log_path}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        while self._stops:
            stop = self._stops.pop()
            with contextlib.suppress(Exception):  # stop everything else even if one part misbehaves
                stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
