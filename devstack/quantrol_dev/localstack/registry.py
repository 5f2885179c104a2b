"""A real OCI registry (Debian's `docker-registry`, CNCF distribution 2.8.2) on 127.0.0.1.

It stands in for the cluster's artifact registry: artifacts are pushed and pulled by digest with oras.
Known gaps of distribution 2.8: no referrers API and no OCI artifact manifest (image manifests with an
artifact config media type work, which is what oras-py pushes). Ready about 0.1 s after start.

The Debian default config (/etc/docker/registry/config.yml) expects htpasswd auth and listens on every
interface; this module writes its own config instead, filesystem storage in a temp dir, and either no auth over
plain HTTP (`secure=False`) or, as a private registry (GHCR, Harbor, Artifactory) would ask, htpasswd users over
TLS (`secure=True`: distribution serves htpasswd only over TLS). The secure registry's certificate comes from a
CA of its own (`trustme`): clients trust it through `ca_path` (REQUESTS_CA_BUNDLE for oras/requests), and log in
with `docker_config`, a docker config.json as a `kubernetes.io/dockerconfigjson` Secret holds it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import ssl
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


@dataclass(frozen=True)
class RegistryLogin:
    """What a secure registry asks of its clients: one htpasswd user, and the CA its certificate chains to."""

    username: str
    password: str = field(repr=False)
    ca_path: Path  # PEM: trust it (REQUESTS_CA_BUNDLE / SSL_CERT_FILE) to reach the registry over TLS
    cert_path: Path
    key_path: Path
    htpasswd_path: Path

    def docker_config(self, address: str) -> dict[str, object]:
        """config.json as `docker login` and `kubectl create secret docker-registry` write it."""
        auth = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"auths": {address: {"username": self.username, "password": self.password, "auth": auth}}}


def make_login(directory: Path, username: str = "quantrol") -> RegistryLogin:
    """A fresh CA, a server certificate for 127.0.0.1 and localhost, and one bcrypt htpasswd user."""
    import bcrypt
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    login = RegistryLogin(username=username, password=secrets.token_urlsafe(18), ca_path=directory / "ca.pem",
                          cert_path=directory / "server.pem", key_path=directory / "server-key.pem",
                          htpasswd_path=directory / "htpasswd")
    ca.cert_pem.write_to_path(str(login.ca_path))
    server.cert_chain_pems[0].write_to_path(str(login.cert_path))
    server.private_key_pem.write_to_path(str(login.key_path))
    hashed = bcrypt.hashpw(login.password.encode(), bcrypt.gensalt(rounds=5)).decode()  # cheap: a test secret
    login.htpasswd_path.write_text(f"{username}:{hashed}\n")
    return login


def render_config(port: int, root: Path, login: RegistryLogin | None = None) -> str:
    """The registry config, as JSON (a subset of YAML, so no YAML writer is needed)."""
    if not root.is_absolute():
        raise ValueError(f"registry storage {root} must be absolute: the registry may run from another folder")
    config: dict[str, object] = {
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
    if login is not None:
        http = config["http"]
        assert isinstance(http, dict)
        http["tls"] = {"certificate": str(login.cert_path), "key": str(login.key_path)}
        config["auth"] = {"htpasswd": {"realm": "quantrol-test-registry", "path": str(login.htpasswd_path)}}
    return json.dumps(config, indent=2) + "\n"


def _clean_env() -> dict[str, str]:
    # distribution lets REGISTRY_* variables override any config key (REGISTRY_HTTP_ADDR, auth, ...):
    # drop them so that a stray variable cannot make the test registry listen elsewhere or need auth.
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


def _v2_status(url: str, ca_path: Path | None = None) -> int:
    opener = _HTTP
    if ca_path is not None:
        context = ssl.create_default_context(cafile=str(ca_path))
        https = urllib.request.HTTPSHandler(context=context)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), https)
    try:
        with opener.open(f"{url}/v2/", timeout=2.0) as response:
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
    login: RegistryLogin | None = None  # set: htpasswd over TLS; unset: anonymous over plain HTTP
    process: ManagedProcess | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, the registry host in references such as `127.0.0.1:PORT/repo@sha256:...`."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.login else 'http'}://{self.address}"

    @property
    def docker_config(self) -> dict[str, object]:
        """The credentials as a docker config.json (a secure registry only)."""
        if self.login is None:
            raise ValueError("this registry takes anonymous pushes: it has no login")
        return self.login.docker_config(self.address)

    def client_env(self) -> dict[str, str]:
        """What a client process needs to trust this registry's TLS certificate (requests, under oras, reads it); a
        pod on a cluster would have the CA in its image or a mounted bundle (e2e/images/trust.Dockerfile)."""
        return {"REQUESTS_CA_BUNDLE": str(self.login.ca_path)} if self.login else {}

    def write_docker_config(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.docker_config))
        path.chmod(0o600)
        return path

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
        self.config_path.write_text(render_config(self.port, self.storage_dir, self.login))
        argv = [binary, "serve", str(self.config_path)]
        self.process = ManagedProcess("docker-registry", argv, self.log_path, env=_clean_env()).start()
        process = self.process

        def ready_or_dead() -> bool:
            # A dead process ends the wait at once; ensure_alive() below then raises with its log.
            # A secure registry answers /v2/ with 401 until a client logs in: that is ready too.
            ca = self.login.ca_path if self.login else None
            return not process.alive() or _v2_status(self.url, ca) in (200, 401)

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
    *, workdir: Path | None = None, ready_timeout: float = DEFAULT_READY_TIMEOUT, attempts: int = 3,
    secure: bool = False,
) -> RegistryServer:
    """Start the registry on a free 127.0.0.1 port and wait until `GET /v2/` answers (200, or 401 when `secure`:
    htpasswd users over TLS, see `RegistryServer.login`)."""
    owns_workdir = workdir is None
    # Absolute: the storage path goes into the registry's config file.
    root = (Path(tempfile.mkdtemp(prefix="quantrol-registry-")) if workdir is None else workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    login = make_login(root / "tls") if secure else None
    last_error: Exception | None = None
    # free_port() can race with another process taking the port before the registry binds it: retry.
    for _ in range(attempts):
        server = RegistryServer(port=free_port(), workdir=root, ready_timeout=ready_timeout, owns_workdir=owns_workdir,
                                login=login)
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
