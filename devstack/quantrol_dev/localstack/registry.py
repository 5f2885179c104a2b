"""A real OCI registry (Debian's `docker-registry`, CNCF distribution 2.8.2) on 127.0.0.1.

It stands in for the cluster's artifact registry: artifacts are pushed and pulled by digest with oras.
Known gaps of distribution 2.8: no referrers API and no OCI artifact manifest (image manifests with an
artifact config media type work, which is what oras-py pushes). Ready about 0.1 s after start.

The Debian default config (/etc/docker/registry/config.yml) expects htpasswd auth and listens on every
interface; this module writes its own config instead: no auth, filesystem storage in a temp dir.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from quantrol_dev.localstack.procs import LOOPBACK, ManagedProcess, find_binary, free_port, wait_until

DEFAULT_READY_TIMEOUT = 30.0

# Without an explicit empty ProxyHandler, urllib sends 127.0.0.1 requests to $http_proxy when one is set.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def registry_binary() -> str | None:
    # Debian names the distribution binary docker-registry (upstream: `registry`, too generic to look up).
    return find_binary("docker-registry", "QUANTROL_REGISTRY")


def render_config(port: int, root: Path) -> str:
    """The registry config, as JSON (a subset of YAML, so no YAML writer is needed)."""
    if not root.is_absolute():
        raise ValueError(f"registry storage {root} must be absolute: the registry may run from another folder")
    config = {
        "version": "0.1",
        "log": {"level": "info", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            # The purge goroutine only removes stale uploads; a test registry lives minutes.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"{LOOPBACK}:{port}",
            # Without a secret the registry generates one and warns; uploads are signed with it.
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    return json.dumps(config, indent=2) + "\n"


def _clean_env() -> dict[str, str]:
    # distribution lets REGISTRY_* variables override any config key (REGISTRY_HTTP_ADDR, auth, ...):
    # drop them so that a stray variable cannot make the test registry listen elsewhere or need auth.
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


def _v2_status(url: str) -> int:
    try:
        with _HTTP.open(f"{url}/v2/", timeout=2.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@dataclass
class RegistryServer:
    """A running registry of the local stack. Use `start_registry()` to get one."""

    port: int
    workdir: Path
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    owns_workdir: bool = False
    process: ManagedProcess | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, the registry host in references such as `127.0.0.1:PORT/repo@sha256:...`."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def _launch(self) -> None:
        binary = registry_binary()
        if binary is None:
            raise FileNotFoundError("docker-registry is not installed (apt-get install docker-registry)")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self.port, self.storage_dir))
        argv = [binary, "serve", str(self.config_path)]
        self.process = ManagedProcess("docker-registry", argv, self.log_path, env=_clean_env()).start()
        process = self.process

        def ready_or_dead() -> bool:
            # A dead process ends the wait at once; ensure_alive() below then raises with its log.
            return not process.alive() or _v2_status(self.url) == 200

        try:
            wait_until(ready_or_dead, timeout=self.ready_timeout, what=f"registry ready on {self.url}/v2/")
        except TimeoutError as exc:
            process.stop()
            raise TimeoutError(f"{exc}; last log lines:\n{process.log_tail()}") from exc
        process.ensure_alive()

    def stop(self) -> None:
        """Stop the process group; remove the workdir only when this module created it."""
        if self.process is not None:
            self.process.stop()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_registry(
    *, workdir: Path | None = None, ready_timeout: float = DEFAULT_READY_TIMEOUT, attempts: int = 3
) -> RegistryServer:
    """Start the registry on a free 127.0.0.1 port and wait until `GET /v2/` answers 200."""
    owns_workdir = workdir is None
    # Absolute: the storage path goes into the registry's config file.
    root = (Path(tempfile.mkdtemp(prefix="quantrol-registry-")) if workdir is None else workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    # free_port() can race with another process taking the port before the registry binds it: retry.
    for _ in range(attempts):
        server = RegistryServer(port=free_port(), workdir=root, ready_timeout=ready_timeout, owns_workdir=owns_workdir)
        try:
            server._launch()
            return server
        except RuntimeError as exc:
            last_error = exc
            if "address already in use" not in str(exc):
                break
    if owns_workdir:
        shutil.rmtree(root, ignore_errors=True)
    assert last_error is not None
    raise last_error
