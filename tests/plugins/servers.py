"""Fixtures for Prometheus and the OCI registry: the real Debian binaries, on 127.0.0.1, stopped at teardown.

Missing binaries skip the tests that need them with one loud line on a developer machine; under CI (the `CI`
environment variable set) they fail instead, because the CI set-up must have installed them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from quantrol_dev.localstack.prometheus import (
    PrometheusServer,
    prometheus_binary,
    promtool_binary,
    start_prometheus,
)
from quantrol_dev.localstack.registry import RegistryServer, registry_binary, start_registry

INSTALL_HINT = "apt-get install -y prometheus docker-registry (the README's test command does this)"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_binaries(found: dict[str, str | None]) -> None:
    """Skip (locally) or fail (in CI) when any of the named executables is missing."""
    missing = sorted(name for name, path in found.items() if path is None)
    if not missing:
        return
    message = f"LOCAL STACK INCOMPLETE: {', '.join(missing)} not found; install with: {INSTALL_HINT}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _require_prometheus() -> None:
    require_binaries({"prometheus": prometheus_binary(), "promtool": promtool_binary()})


def _require_registry() -> None:
    require_binaries({"docker-registry": registry_binary()})


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """One Prometheus for the session, with an (initially empty) file_sd job that tests fill and empty.

    Tests that need a restart (backfill on a running server) or a private config use `prometheus_factory`.
    """
    _require_prometheus()
    server = start_prometheus(workdir=tmp_path_factory.mktemp("prometheus"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prometheus_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PrometheusServer]]:
    """Start private Prometheus servers (`start_prometheus` keyword arguments); all stop at teardown."""
    _require_prometheus()
    started: list[PrometheusServer] = []

    def factory(**kwargs: Any) -> PrometheusServer:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("prometheus"))
        server = start_prometheus(**kwargs)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """One registry for the session; tests keep apart by repository name."""
    _require_registry()
    server = start_registry(workdir=tmp_path_factory.mktemp("registry"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def secure_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """One registry for the session that, like GHCR, Harbor or Artifactory, refuses anonymous clients: htpasswd
    users over TLS, its certificate from a CA of its own (`registry.login`: user, password, `ca_path`)."""
    _require_registry()
    server = start_registry(workdir=tmp_path_factory.mktemp("secure-registry"), secure=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def oci_registry_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RegistryServer]]:
    """Start private registries (`start_registry` keyword arguments); all stop at teardown."""
    _require_registry()
    started: list[RegistryServer] = []

    def factory(**kwargs: Any) -> RegistryServer:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("registry"))
        server = start_registry(**kwargs)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.stop()
