"""The Kubernetes API of the local stack: KMock (with apishims) served over HTTP on 127.0.0.1.

Command (KMock has no server command of its own)::

    python -m quantrol_dev.localstack.kubeapi --port N [--crds DIR] [--request-log FILE]

Python side: `KubeAPIServer` starts and stops that command as a child process and writes a kubeconfig for it;
`OperatorProcess` runs the real operator (`quantrol-operator`, i.e. `kopf run`) against it.
What the emulation does and does not do: tests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import kmock
import yaml

from quantrol_dev.localstack.apishims import KubeAPIEmulator, read_crds
from quantrol_dev.localstack.procs import LOOPBACK, ManagedProcess, free_port, port_is_open

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


# --- the server command --------------------------------------------------------------------------------------


async def serve(port: int, crds_dir: Path | None, request_log: Path | None) -> None:
    crds = read_crds(crds_dir) if crds_dir else []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with KubeAPIEmulator(request_log=request_log) as emulator:
        names = await emulator.bootstrap(crds)
        async with kmock.Server(emulator, host=LOOPBACK, port=port):
            print(f"kubeapi: serving http://{LOOPBACK}:{port} with CRDs {names}", flush=True)
            await stop.wait()
            # Open watches would otherwise hold the HTTP server's shutdown until their clients leave.
            await emulator.close_streams()
            await asyncio.sleep(0.1)
    print("kubeapi: stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="quantrol-kubeapi", description="Serve the emulated Kubernetes API (KMock + apishims) on 127.0.0.1."
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--crds", type=Path, default=None, help="directory of CustomResourceDefinition YAML files")
    parser.add_argument("--request-log", type=Path, default=None, help="append one JSON line per request here")
    args = parser.parse_args(argv)
    if args.crds is not None and not args.crds.is_dir():
        parser.error(f"--crds {args.crds} is not a directory")
    asyncio.run(serve(args.port, args.crds, args.request_log))


# --- the Python-side handles ---------------------------------------------------------------------------------


def _wait_for(check: Callable[[], bool], proc: ManagedProcess, *, timeout: float, what: str) -> None:
    """Poll until `check` holds; fail at once (with the log tail) if the process dies, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.ensure_alive()
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; log tail:\n{proc.log_tail()}")


@dataclass
class KubeAPIServer:
    """The emulated API server as a child process on a free 127.0.0.1 port."""

    workdir: Path
    crds_dir: Path | None = None
    python: str = sys.executable
    port: int = 0
    process: ManagedProcess | None = field(default=None, init=False)
    started_in: float = field(default=0.0, init=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def request_log(self) -> Path:
        return self.workdir / "kubeapi-requests.jsonl"

    def start(self, timeout: float = 30.0) -> Self:
        # Absolute: the request log and the kubeconfig are handed to other processes with other working folders.
        self.workdir = self.workdir.resolve()
        self.crds_dir = self.crds_dir.resolve() if self.crds_dir is not None else None
        self.workdir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        for attempt in range(3):  # free_port() can race with another process taking the port
            self.port = free_port() if attempt or not self.port else self.port
            argv = [
                self.python,
                "-m",
                "quantrol_dev.localstack.kubeapi",
                "--port",
                str(self.port),
                "--request-log",
                str(self.request_log),
            ]
            if self.crds_dir is not None:
                argv += ["--crds", str(self.crds_dir)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.process = ManagedProcess("kubeapi", argv, self.workdir / "kubeapi.log", env=env).start()
            try:
                _wait_for(self._ready, self.process, timeout=timeout, what=f"the Kubernetes API on {self.url}")
            except BaseException as exc:
                self.process.stop()  # never leave a half-started server behind
                port_taken = "address already in use" in self.process.log_tail().lower()
                if not isinstance(exc, RuntimeError) or not port_taken or attempt == 2:
                    raise
                continue
            self.started_in = time.monotonic() - began
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/version", timeout=1) as rsp:
            return bool(rsp.status == 200)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path | None = None, namespace: str = "default") -> Path:
        """A kubeconfig whose only context points at this server (no credentials: the emulator checks none)."""
        path = (path or self.workdir / "kubeconfig").resolve()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "quantrol-local", "cluster": {"server": self.url}}],
            "users": [{"name": "quantrol-local", "user": {}}],
            "contexts": [
                {
                    "name": "quantrol-local",
                    "context": {"cluster": "quantrol-local", "user": "quantrol-local", "namespace": namespace},
                }
            ],
            "current-context": "quantrol-local",
            "preferences": {},
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def requests(self, *, since: float = 0.0) -> list[dict[str, Any]]:
        """The request log (one dict per request), optionally only the entries at or after `since` (epoch s)."""
        if not self.request_log.exists():
            return []
        lines = self.request_log.read_text(encoding="utf-8").splitlines()
        return [entry for line in lines if line for entry in [json.loads(line)] if entry["ts"] >= since]

    def writes(self, *, since: float = 0.0, user_agent_prefix: str = "") -> list[dict[str, Any]]:
        """Successful writes (create/update/patch/delete) at or after `since`, by clients matching the prefix."""
        return [
            e
            for e in self.requests(since=since)
            if e["verb"] in WRITE_VERBS and e["status"] < 400 and e["user_agent"].startswith(user_agent_prefix)
        ]


@dataclass
class OperatorProcess:
    """The real operator (`quantrol-operator`, which is `kopf run`) as a child process against a kubeconfig."""

    kubeconfig: Path
    workdir: Path
    args: Sequence[str] = ("--standalone", "--all-namespaces")
    env: dict[str, str] = field(default_factory=dict)  # extra settings, e.g. QUANTROL_POLL_SECONDS
    process: ManagedProcess | None = field(default=None, init=False)
    started_in: float = field(default=0.0, init=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "operator.log"

    def command(self) -> list[str]:
        script = Path(sys.executable).with_name("quantrol-operator")
        entry = [str(script)] if script.exists() else [sys.executable, "-m", "quantrol_operator.run"]
        return [*entry, *self.args]

    def start(self, *, ready: Callable[[], bool] | None = None, timeout: float = 60.0) -> Self:
        """Start and wait until the operator logs that it watches both kinds (and `ready()` holds, if given)."""
        self.workdir, self.kubeconfig = self.workdir.resolve(), self.kubeconfig.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        began = time.monotonic()
        self.process = ManagedProcess("operator", self.command(), self.log_path, env=env).start()
        try:
            _wait_for(
                lambda: self.logged("watching QuantizedModel and ServingPolicy") and (ready is None or ready()),
                self.process,
                timeout=timeout,
                what="the operator to watch QuantizedModel and ServingPolicy",
            )
        except BaseException:
            self.process.stop()  # never leave a half-started operator behind
            raise
        self.started_in = time.monotonic() - began
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged(self, text: str) -> bool:
        return text in self.log()

    def wait_logged(self, text: str, timeout: float = 30.0) -> None:
        if self.process is None:
            raise RuntimeError("the operator was never started")
        _wait_for(lambda: self.logged(text), self.process, timeout=timeout, what=f"operator log line {text!r}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        """A crash (OOM kill, node lost): SIGKILL at once, no graceful shutdown in which kopf finishes passes."""
        if self.process is not None:
            self.process.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def port_closed(port: int) -> bool:
    return not port_is_open(port)


if __name__ == "__main__":
    main()


KOPF_USER_AGENT = "kopf/"


def kopf_watches(kubeapi: KubeAPIServer, since: float, plurals: tuple[str, ...]) -> bool:
    """Whether the operator (kopf's user agent) has opened a watch stream for each plural since `since`."""
    watched = {
        e["resource"]
        for e in kubeapi.requests(since=since)
        if e["verb"] == "watch" and e["status"] == 200 and e["user_agent"].startswith(KOPF_USER_AGENT)
    }
    return set(plurals) <= watched
