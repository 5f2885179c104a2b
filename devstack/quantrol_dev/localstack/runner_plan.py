"""Pure planning for the local workload runner (runner.py): no processes, no API calls, no clock of its own.

A development and test tool: on a real cluster the kubelet and the built-in controllers do this. Everything
here is a function of observed objects, the runner's process states and `now`, so that the rules (which
container starts next, what a Job's or Deployment's status is, which pods a rollout stops, what the serving
cap admits, which objects are orphaned) are tested without a server or a process.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

JSON = dict[str, Any]
LOOPBACK = "127.0.0.1"
NODE_NAME = "local-runner"
PODS_SECTION = "pods"  # services.json's map of running pods (localstack.addresses reads it)
PORT_ENV_PREFIX = "QUANTROL_PORT_"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096  # bytes, as the kubelet truncates
FALLBACK_LOG_BYTES, FALLBACK_LOG_LINES = 2048, 80  # FallbackToLogsOnError: the kubelet's limits
MAX_RESTART_BACKOFF = 10.0  # seconds; the kubelet's goes to 5 minutes, too slow for tests

# Reasons, as the kubelet and the controllers spell them (clients and alerts match on these).
ERR_IMAGE_PULL = "ErrImagePull"  # permanent here: the image map does not change while the runner runs
CONFIG_ERROR = "CreateContainerConfigError"  # e.g. a missing ConfigMap; retried on every pass
CRASH_LOOP = "CrashLoopBackOff"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
UNSCHEDULABLE = "Unschedulable"
FATAL_WAITING = frozenset({ERR_IMAGE_PULL})

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})


def rfc3339(moment: datetime) -> str:
    """The API's timestamp format (second precision, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- the image map ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageEnv:
    """Where a container image's programs come from on this machine: a virtual environment's bin dir.

    Images are never pulled. `pattern` is an fnmatch pattern on the image reference (matched with and without
    its registry host); `serving` makes its containers count against the serving cap; `entrypoint` stands for
    the image's ENTRYPOINT when a container declares no `command`; `env` is added to every such process
    (e.g. VLLM_CACHE_ROOT for the serving environment).
    """

    pattern: str
    bin_dir: Path
    serving: bool = False
    entrypoint: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageEnv:
        return cls(
            pattern=str(data["pattern"]),
            bin_dir=Path(data["bin_dir"]),
            serving=bool(data.get("serving", False)),
            entrypoint=tuple(str(a) for a in data.get("entrypoint") or ()),
            env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
        )


def _without_registry(image: str) -> str:
    first, _, rest = image.partition("/")
    return rest if rest and ("." in first or ":" in first or first == "localhost") else image


def resolve_image(image_map: Sequence[ImageEnv], image: str) -> ImageEnv | None:
    """The first entry whose pattern matches `image` (`docker.io/vllm/x:1` also matches `vllm/x*`)."""
    for entry in image_map:
        if fnmatch.fnmatchcase(image, entry.pattern) or fnmatch.fnmatchcase(_without_registry(image), entry.pattern):
            return entry
    return None


def unmapped_image_message(image: str, image_map: Sequence[ImageEnv]) -> str:
    known = ", ".join(e.pattern for e in image_map) or "none"
    return (
        f'no local environment mapped for image "{image}"; configure the local runner\'s image map '
        f"(patterns now: {known})"
    )


# --- from a container spec to a local process ------------------------------------------------------------------


class LaunchError(Exception):
    """A container cannot start; `reason` is what its waiting state shows."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Probe:
    """A readiness probe with its target on this machine."""

    kind: Literal["http", "tcp", "exec"]
    target: str = ""  # URL for http, port for tcp
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1


@dataclass(frozen=True)
class Launch:
    """One container as a local process."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None
    termination_path: Path
    fallback_to_logs: bool
    readiness: Probe | None
    serving: bool


@dataclass(frozen=True)
class PodContext:
    """What the loop prepared for one pod: its dirs, mapped ports and the ConfigMaps/Secrets it references."""

    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    service_account: str
    pod_dir: Path
    volume_dirs: Mapping[str, Path]  # volume name -> local dir (or file, for a hostPath file)
    ports: Mapping[int, int]  # containerPort -> local port; containers of a pod share one network namespace
    port_names: Mapping[str, int]  # declared port name -> containerPort
    config_maps: Mapping[str, Mapping[str, str]]  # name -> data, for env and envFrom
    secrets: Mapping[str, Mapping[str, str]]  # name -> decoded data
    base_env: Mapping[str, str]  # PATH, HOME, QUANTROL_LOCAL_SERVICES, ...


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined references expand, `$$` escapes, undefined ones stay as written."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _VAR_REF.sub(substitute, text)


def rewrite_paths(text: str, paths: Mapping[str, str]) -> str:
    """Replace each in-container path (a mountPath, the termination-message path) by its local counterpart.

    Processes cannot mount at absolute paths, so the paths a container is told about are rewritten wherever
    they appear as a whole path component: `/data` in `--out=/data/x` but not in `/database`.
    """
    if not paths:
        return text
    alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])({alternatives})(?=/|$|[^\w.-])")
    return pattern.sub(lambda m: paths[m.group(1)], text)


_PORT_FLAG = re.compile(r"(--[\w-]*port)(?:=(\d+))?")
_HOST_FLAG = re.compile(r"(--[\w-]*host)(?:=(.*))?")
_ANY_HOST = frozenset({"0.0.0.0", "::", "[::]"})


def _local_hostport(ports: Mapping[int, int]) -> re.Pattern[str] | None:
    if not ports:
        return None
    alternatives = "|".join(str(p) for p in sorted(ports, reverse=True))
    return re.compile(rf"\b(localhost|127\.0\.0\.1):({alternatives})\b")


def rewrite_args(args: Sequence[str], ports: Mapping[int, int]) -> list[str]:
    """Map declared container ports and wildcard hosts in flags to this machine's.

    `--port=8000` / `--port 8000` (any flag ending in `port`) with a declared containerPort becomes the local
    port; `--host 0.0.0.0` (any flag ending in `host`) becomes 127.0.0.1, so that nothing listens beyond the
    loopback; `localhost:8000` inside an argument (a sidecar calling its neighbour) becomes the local port.
    """
    out = list(args)
    hostport = _local_hostport(ports)
    for i, arg in enumerate(out):
        port_flag, host_flag = _PORT_FLAG.fullmatch(arg), _HOST_FLAG.fullmatch(arg)
        if port_flag and port_flag.group(2) and int(port_flag.group(2)) in ports:
            out[i] = f"{port_flag.group(1)}={ports[int(port_flag.group(2))]}"
        elif port_flag and i + 1 < len(out) and out[i + 1].isdigit() and int(out[i + 1]) in ports:
            out[i + 1] = str(ports[int(out[i + 1])])
        elif host_flag and host_flag.group(2) in _ANY_HOST:
            out[i] = f"{host_flag.group(1)}={LOOPBACK}"
        elif host_flag and host_flag.group(2) is None and i + 1 < len(out) and out[i + 1] in _ANY_HOST:
            out[i + 1] = LOOPBACK
        elif hostport is not None:
            out[i] = hostport.sub(lambda m: f"{m.group(1)}:{ports[int(m.group(2))]}", arg)
    return out


def _field_ref(path: str, ctx: PodContext) -> str:
    simple = {
        "metadata.name": ctx.name,
        "metadata.namespace": ctx.namespace,
        "metadata.uid": ctx.uid,
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": ctx.service_account,
        "status.podIP": LOOPBACK,
        "status.hostIP": LOOPBACK,
    }
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        source = ctx.labels if match.group(1) == "labels" else ctx.annotations
        return source.get(match.group(2), "")
    raise LaunchError(CONFIG_ERROR, f"fieldRef {path!r} is not supported by the local runner")


def _key_ref(ref: Mapping[str, Any], source: Mapping[str, Mapping[str, str]], what: str) -> str | None:
    data = source.get(str(ref.get("name", "")))
    value = None if data is None else data.get(str(ref.get("key", "")))
    if value is None and not ref.get("optional"):
        raise LaunchError(CONFIG_ERROR, f'{what} "{ref.get("name")}" key "{ref.get("key")}" not found')
    return value


def _resource_ref(ref: Mapping[str, Any], container: Mapping[str, Any]) -> str:
    # Recorded, not enforced: the declared quantity is passed through as written (the divisor is ignored).
    kind, _, name = str(ref.get("resource", "")).partition(".")
    resources = container.get("resources") or {}
    return str((resources.get(kind) or {}).get(name, "0"))


def container_env(container: Mapping[str, Any], ctx: PodContext) -> dict[str, str]:
    """The declared environment, in order (later entries may refer to earlier ones with `$(VAR)`)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix", ""))
        for key, (data, what) in {
            "configMapRef": (ctx.config_maps, "configmap"),
            "secretRef": (ctx.secrets, "secret"),
        }.items():
            ref = source.get(key)
            if ref is None:
                continue
            found = data.get(str(ref.get("name", "")))
            if found is None and not ref.get("optional"):
                raise LaunchError(CONFIG_ERROR, f'{what} "{ref.get("name")}" not found')
            env.update({prefix + k: v for k, v in (found or {}).items()})
    for var in container.get("env") or []:
        name, source = str(var["name"]), var.get("valueFrom")
        value: str | None
        if source is None:
            value = expand_vars(str(var.get("value", "")), env)
        elif "fieldRef" in source:
            value = _field_ref(str(source["fieldRef"].get("fieldPath", "")), ctx)
        elif "configMapKeyRef" in source:
            value = _key_ref(source["configMapKeyRef"], ctx.config_maps, "configmap")
        elif "secretKeyRef" in source:
            value = _key_ref(source["secretKeyRef"], ctx.secrets, "secret")
        elif "resourceFieldRef" in source:
            value = _resource_ref(source["resourceFieldRef"], container)
        else:
            raise LaunchError(CONFIG_ERROR, f"env {name}: valueFrom {sorted(source)} is not supported locally")
        if value is not None:
            env[name] = value
    return env


def mount_paths(container: Mapping[str, Any], ctx: PodContext) -> dict[str, str]:
    """In-container path -> local path, for the container's volumeMounts and its termination-message path."""
    paths: dict[str, str] = {}
    for mount in container.get("volumeMounts") or []:
        volume = ctx.volume_dirs.get(str(mount.get("name")))
        if volume is None:
            raise LaunchError(CONFIG_ERROR, f'volumeMount "{mount.get("name")}" names no volume of the pod')
        local = volume / str(mount["subPath"]) if mount.get("subPath") else volume
        paths[str(mount["mountPath"]).rstrip("/") or "/"] = str(local)
    declared = str(container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH)
    paths.setdefault(declared, str(termination_file(ctx.pod_dir, str(container["name"]))))
    return paths


FILE_VOLUMES: Mapping[str, tuple[str, str]] = {"configMap": ("configmaps", "name"), "secret": ("secrets", "secretName")}


def file_volume_source(volume: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]] | None:
    """(plural, object name, source) for a configMap or secret volume; None for other kinds."""
    for key, (plural, name_field) in FILE_VOLUMES.items():
        if key in volume:
            source = volume[key] or {}
            return plural, str(source.get(name_field, "")), source
    return None


def volume_files(source: Mapping[str, Any], data: Mapping[str, bytes], paths: Mapping[str, str]) -> dict[str, bytes]:
    """A configMap/secret volume's files (every key, or `items`), with in-container paths in text rewritten.

    A config file that names `/var/quantrol/work` or `/dev/termination-log` then points where the process
    can write, as its command line would: text is rewritten like args and env; binary data is kept as is.
    """
    items = source.get("items") or [{"key": k, "path": k} for k in sorted(data)]
    files: dict[str, bytes] = {}
    for item in items:
        raw = data.get(str(item["key"]))
        if raw is None:
            continue
        try:
            files[str(item.get("path", item["key"]))] = rewrite_paths(raw.decode(), paths).encode()
        except UnicodeDecodeError:
            files[str(item.get("path", item["key"]))] = raw
    return files


def termination_file(pod_dir: Path, container: str) -> Path:
    return pod_dir / f"{container}.termination-log"


def _probe(spec: Mapping[str, Any] | None, ctx: PodContext, paths: Mapping[str, str]) -> Probe | None:
    if not spec:
        return None
    timing = {
        "initial_delay": float(spec.get("initialDelaySeconds", 0)),
        "period": float(spec.get("periodSeconds", 10)),
        "timeout": float(spec.get("timeoutSeconds", 1)),
        "failure_threshold": int(spec.get("failureThreshold", 3)),
        "success_threshold": int(spec.get("successThreshold", 1)),
    }
    if "exec" in spec:
        command = tuple(rewrite_paths(str(a), paths) for a in spec["exec"].get("command") or [])
        return Probe("exec", command=command, **timing)  # type: ignore[arg-type]
    for kind, key in (("http", "httpGet"), ("tcp", "tcpSocket")):
        if key in spec:
            port = spec[key].get("port")
            number = int(port) if str(port).isdigit() else ctx.port_names.get(str(port), -1)
            local = ctx.ports.get(number)
            if local is None:
                raise LaunchError(CONFIG_ERROR, f"readiness probe port {spec[key].get('port')!r} is not declared")
            path = "/" + str(spec[key].get("path", "/")).lstrip("/")
            target = f"http://{LOOPBACK}:{local}{path}" if kind == "http" else str(local)
            return Probe(kind, target=target, **timing)  # type: ignore[arg-type]
    raise LaunchError(CONFIG_ERROR, f"readiness probe {sorted(spec)} is not supported by the local runner")


def build_launch(
    container: Mapping[str, Any], ctx: PodContext, image_map: Sequence[ImageEnv]
) -> Launch:
    """The local process for a container: argv (command+args, `$(VAR)`s expanded, paths and ports mapped) and env.

    The container's command runs with the mapped environment's bin dir first on PATH, so `quantrol-worker` or
    `python` resolve to that environment's. Raises LaunchError for what a kubelet would refuse.
    """
    image = str(container.get("image", ""))
    entry = resolve_image(image_map, image)
    if entry is None:
        raise LaunchError(ERR_IMAGE_PULL, unmapped_image_message(image, image_map))
    paths = mount_paths(container, ctx)
    env = {k: rewrite_paths(v, paths) for k, v in container_env(container, ctx).items()}
    for name, value in env.items():  # PORT=8000-style settings follow the port map too
        if (name == "PORT" or name.endswith("_PORT")) and value.isdigit() and int(value) in ctx.ports:
            env[name] = str(ctx.ports[int(value)])
    command = [str(a) for a in container.get("command") or entry.entrypoint]
    if not command:
        raise LaunchError(
            CONFIG_ERROR,
            f'container "{container["name"]}" declares no command and image map entry "{entry.pattern}" no '
            "entrypoint: the local runner cannot read an image's ENTRYPOINT",
        )
    argv = [rewrite_paths(expand_vars(a, env), paths) for a in [*command, *(container.get("args") or [])]]
    full_env = {
        **ctx.base_env,
        **entry.env,
        "PATH": f"{entry.bin_dir}:{ctx.base_env.get('PATH', '/usr/bin:/bin')}",
        "HOSTNAME": ctx.name,
        **{f"{PORT_ENV_PREFIX}{p}": str(local) for p, local in ctx.ports.items()},
        **{
            PORT_ENV_PREFIX + name.upper().replace("-", "_"): str(ctx.ports[number])
            for name, number in ctx.port_names.items()
            if number in ctx.ports
        },
        **env,
    }
    working_dir = container.get("workingDir")
    return Launch(
        name=str(container["name"]),
        argv=tuple(rewrite_args(argv, ctx.ports)),
        env=full_env,
        cwd=rewrite_paths(str(working_dir), paths) if working_dir else None,
        termination_path=Path(paths[str(container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH)]),
        fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
        readiness=_probe(container.get("readinessProbe"), ctx, paths),
        serving=entry.serving,
    )


def declared_ports(pod_spec: Mapping[str, Any]) -> dict[int, str]:
    """containerPort -> its name ('' when unnamed), over init and main containers."""
    ports: dict[int, str] = {}
    for container in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
        for port in container.get("ports") or []:
            ports[int(port["containerPort"])] = str(port.get("name", ""))
    return ports


def is_serving_pod(pod_spec: Mapping[str, Any], image_map: Sequence[ImageEnv]) -> bool:
    """A pod counts against the serving cap when any of its main containers' images maps to a serving env."""
    for container in pod_spec.get("containers") or []:
        entry = resolve_image(image_map, str(container.get("image", "")))
        if entry is not None and entry.serving:
            return True
    return False


def truncate_message(message: str) -> str:
    data = message.encode()[-MAX_TERMINATION_MESSAGE:]
    return data.decode(errors="replace")


def fallback_message(log_tail: str) -> str:
    """FallbackToLogsOnError: the last 80 lines or 2048 bytes of the log, whichever is smaller."""
    lines = "\n".join(log_tail.splitlines()[-FALLBACK_LOG_LINES:])
    return lines.encode()[-FALLBACK_LOG_BYTES:].decode(errors="replace")


# --- container and pod states ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str  # Completed, Error, StartError
    message: str
    started_at: datetime | None
    finished_at: datetime


@dataclass(frozen=True)
class ContainerRun:
    """One container's runtime state, as the kubelet tracks it."""

    name: str
    image: str
    started_at: datetime | None = None  # of the current run; None: never started since the last exit
    pid: int | None = None
    terminated: Terminated | None = None  # the last run ended (and no new run has started)
    last_terminated: Terminated | None = None  # the run before a restart
    restart_count: int = 0
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    ready: bool = False

    @property
    def state(self) -> Literal["waiting", "running", "terminated"]:
        if self.terminated is not None:
            return "terminated"
        return "running" if self.started_at is not None else "waiting"

    @property
    def fatal(self) -> bool:
        return self.state == "waiting" and self.waiting_reason in FATAL_WAITING


def restart_backoff(restart_count: int) -> float:
    return min(float(2**restart_count), MAX_RESTART_BACKOFF)


def _restarts(policy: str, ended: Terminated) -> bool:
    return policy == "Always" or (policy == "OnFailure" and ended.exit_code != 0)


def _due(run: ContainerRun, now: datetime) -> bool:
    ended = run.terminated
    return ended is None or now >= ended.finished_at + timedelta(seconds=restart_backoff(run.restart_count))


@dataclass(frozen=True)
class PodSteps:
    start: tuple[str, ...]  # containers to (re)start now
    phase: Phase


def plan_pod(
    restart_policy: str, init: Sequence[ContainerRun], main: Sequence[ContainerRun], now: datetime
) -> PodSteps:
    """Init containers one at a time and in order, then all main containers; restarts follow the policy."""
    for run in init:
        if run.state == "running":
            return PodSteps((), "Pending")
        if run.state == "waiting":
            fatal = run.fatal and restart_policy == "Never"
            return PodSteps((), "Failed") if fatal else PodSteps((run.name,), "Pending")
        assert run.terminated is not None
        if run.terminated.exit_code == 0:
            continue
        if restart_policy == "Never":  # init containers restart on failure under Always and OnFailure alike
            return PodSteps((), "Failed")
        return PodSteps((run.name,) if _due(run, now) else (), "Pending")
    if restart_policy == "Never" and any(r.fatal for r in main):
        return PodSteps((), "Failed")
    start = tuple(
        r.name
        for r in main
        if r.state == "waiting"
        or (r.terminated is not None and _restarts(restart_policy, r.terminated) and _due(r, now))
    )
    ended = [r.terminated for r in main if r.terminated is not None and not _restarts(restart_policy, r.terminated)]
    if main and len(ended) == len(main):
        return PodSteps((), "Succeeded" if all(t.exit_code == 0 for t in ended) else "Failed")
    started = any(r.started_at is not None or r.terminated is not None or r.restart_count for r in main)
    return PodSteps(start, "Running" if started else "Pending")


@dataclass(frozen=True)
class PodView:
    """Everything the pod's status is rendered from."""

    restart_policy: str
    init: tuple[ContainerRun, ...]
    main: tuple[ContainerRun, ...]
    phase: Phase
    scheduled: bool = True
    unschedulable_message: str = ""
    started_at: datetime | None = None
    reason: str = ""  # pod-level, e.g. DeadlineExceeded
    message: str = ""


def _terminated_json(t: Terminated) -> JSON:
    out: JSON = {"exitCode": t.exit_code, "reason": t.reason, "finishedAt": rfc3339(t.finished_at)}
    if t.started_at is not None:
        out["startedAt"] = rfc3339(t.started_at)
    if t.message:
        out["message"] = t.message
    return out


def container_status(run: ContainerRun, restart_policy: str, now: datetime) -> JSON:
    state: JSON
    ended = run.terminated
    if ended is not None and _restarts(restart_policy, ended):
        # Between an exit and its restart the kubelet shows the back-off, with the exit as lastState.
        wait = restart_backoff(run.restart_count)
        state = {"waiting": {"reason": CRASH_LOOP, "message": f"back-off {wait:.0f}s restarting failed "
                                                              f"container={run.name}"}}
        last: Terminated | None = ended
    elif ended is not None:
        state, last = {"terminated": _terminated_json(ended)}, run.last_terminated
    elif run.started_at is not None:
        state, last = {"running": {"startedAt": rfc3339(run.started_at)}}, run.last_terminated
    else:
        waiting: JSON = {"reason": run.waiting_reason}
        if run.waiting_message:
            waiting["message"] = run.waiting_message
        state, last = {"waiting": waiting}, run.last_terminated
    return {
        "name": run.name,
        "image": run.image,
        "imageID": "",
        "containerID": f"local://{run.pid}" if run.pid else "",
        "ready": run.ready,
        "started": run.started_at is not None and ended is None,
        "restartCount": run.restart_count,
        "state": state,
        "lastState": {"terminated": _terminated_json(last)} if last is not None else {},
    }


def _condition(kind: str, ok: bool, reason: str = "", message: str = "") -> JSON:
    out: JSON = {"type": kind, "status": "True" if ok else "False"}
    if not ok and reason:
        out["reason"] = reason
    if not ok and message:
        out["message"] = message
    return out


def with_transition_times(old: Iterable[Mapping[str, Any]], new: Sequence[JSON], now: datetime) -> list[JSON]:
    """Conditions with lastTransitionTime kept from `old` while their status is unchanged."""
    before = {c.get("type"): c for c in old}
    out = []
    for condition in new:
        previous = before.get(condition["type"])
        same = previous is not None and previous.get("status") == condition["status"]
        stamp = previous.get("lastTransitionTime") if same and previous else None
        out.append({**condition, "lastTransitionTime": stamp or rfc3339(now)})
    return out


def pod_status(view: PodView, old_status: Mapping[str, Any], now: datetime) -> JSON:
    """The status a kubelet would write for the pod (phase, conditions, init and main container statuses)."""
    pending_init = [r.name for r in view.init if r.terminated is None or r.terminated.exit_code != 0]
    unready = [r.name for r in view.main if not r.ready]
    done = view.phase in TERMINAL
    ready_reason = "PodCompleted" if done else "ContainersNotReady"
    ready_message = "" if done else f"containers with unready status: [{' '.join(unready)}]"
    conditions = [
        _condition("PodScheduled", view.scheduled, UNSCHEDULABLE, view.unschedulable_message),
        _condition("Initialized", not pending_init, "ContainersNotInitialized",
                   f"containers with incomplete status: [{' '.join(pending_init)}]"),
        _condition("ContainersReady", not unready and not done, ready_reason, ready_message),
        _condition("Ready", not unready and not done, ready_reason, ready_message),
    ]
    if not view.scheduled:
        conditions = conditions[:1]
    # A failed init container restarts unless the pod's policy is Never; a succeeded one never runs again.
    init_policy = "Never" if view.restart_policy == "Never" else "OnFailure"
    status: JSON = {
        "phase": view.phase,
        "conditions": with_transition_times(old_status.get("conditions") or [], conditions, now),
        "qosClass": "BestEffort",
    }
    if view.scheduled:
        status.update(
            hostIP=LOOPBACK,
            podIP=LOOPBACK,
            podIPs=[{"ip": LOOPBACK}],
            initContainerStatuses=[container_status(r, init_policy, now) for r in view.init],
            containerStatuses=[container_status(r, view.restart_policy, now) for r in view.main],
        )
    if view.started_at is not None:
        status["startTime"] = rfc3339(view.started_at)
    if view.reason:
        status["reason"], status["message"] = view.reason, view.message
    return status


def pod_is_ready(view: PodView) -> bool:
    return view.phase == "Running" and all(r.ready for r in view.main)


# --- Jobs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobPod:
    name: str
    phase: Phase
    ready: bool


@dataclass(frozen=True)
class JobPlan:
    start: int  # new pods to create now
    kill: tuple[str, ...]  # active pods to stop
    kill_reason: str
    status: JSON  # the whole status (merge-patched through /status when it differs)


def _finished(conditions: Iterable[Mapping[str, Any]]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def _job_outcome(spec: Mapping[str, Any], succeeded: int, failed: int, started: datetime | None,
                 now: datetime) -> JSON | None:
    """The condition that finishes the Job now (Complete, or Failed with its reason), if any."""
    backoff_limit = int(spec["backoffLimit"]) if spec.get("backoffLimit") is not None else 6
    deadline = spec.get("activeDeadlineSeconds")
    if succeeded >= int(spec.get("completions") or 1):
        return {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                "message": "Reached expected number of succeeded pods"}
    if failed > backoff_limit:
        return {"type": "Failed", "status": "True", "reason": BACKOFF_LIMIT_EXCEEDED,
                "message": "Job has reached the specified backoff limit"}
    if deadline is not None and started is not None and now >= started + timedelta(seconds=float(deadline)):
        return {"type": "Failed", "status": "True", "reason": DEADLINE_EXCEEDED,
                "message": "Job was active longer than specified deadline"}
    return None


def plan_job(job: Mapping[str, Any], pods: Sequence[JobPod], now: datetime) -> JobPlan:
    """The Job controller: start pods up to parallelism, count results, enforce backoffLimit and the deadline.

    Failed pods are retried at once (the controller's 10 s, 20 s, ... back-off between retries is not
    applied); every retry is a new pod, also under `restartPolicy: OnFailure`. Pods stopped by the deadline
    stay (Failed, reason DeadlineExceeded) rather than being deleted, so their logs and exit codes stay readable.
    """
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conditions: list[JSON] = list(status.get("conditions") or [])
    active = [p for p in pods if p.phase not in TERMINAL]
    succeeded = sum(p.phase == "Succeeded" for p in pods)
    failed = sum(p.phase == "Failed" for p in pods)
    suspended = bool(spec.get("suspend"))
    started = parse_time(status.get("startTime")) or (None if suspended else now)
    finished = _finished(conditions)
    outcome = None if finished else _job_outcome(spec, succeeded, failed, started, now)
    start, kill_reason, completion = 0, "", status.get("completionTime")
    kill: tuple[str, ...] = ()
    if outcome is not None:
        conditions.append({**outcome, "lastProbeTime": rfc3339(now), "lastTransitionTime": rfc3339(now)})
        kill, kill_reason = tuple(p.name for p in active), str(outcome["reason"])
        completion = rfc3339(now) if outcome["type"] == "Complete" else completion
    elif finished and active:  # finished earlier (e.g. by the deadline) and something still runs: stop it
        failed_reason = next((c.get("reason", "") for c in conditions if c.get("type") == "Failed"), "")
        kill, kill_reason = tuple(p.name for p in active), str(failed_reason or DEADLINE_EXCEEDED)
    elif not finished and not suspended:
        parallelism = int(spec["parallelism"]) if spec.get("parallelism") is not None else 1
        start = max(0, min(parallelism, int(spec.get("completions") or 1) - succeeded) - len(active))
    out: JSON = {"active": len(active) + start, "succeeded": succeeded, "failed": failed,
                 "ready": sum(p.ready for p in active), "conditions": conditions}
    if started is not None:
        out["startTime"] = status.get("startTime") or rfc3339(started)
    if completion:
        out["completionTime"] = completion
    return JobPlan(start=start, kill=kill, kill_reason=kill_reason, status=out)


# --- Deployments -----------------------------------------------------------------------------------------------


def template_hash(template: Mapping[str, Any]) -> str:
    """A stable hash of a pod template, like the ReplicaSet's `pod-template-hash` label."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return digest[:10]


@dataclass(frozen=True)
class Replica:
    name: str
    template_hash: str
    phase: Phase
    ready: bool
    created_at: datetime


@dataclass(frozen=True)
class DeploymentPlan:
    start: int  # new pods from the current template
    stop: tuple[str, ...]
    status: JSON


def _scaled(value: Any, desired: int, default: str, *, round_up: bool) -> int:
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        exact = desired * float(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


def _rollout_bounds(spec: Mapping[str, Any], desired: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) as pod counts; Recreate is 'no surge, everything may go'."""
    strategy = spec.get("strategy") or {}
    if strategy.get("type") == "Recreate":
        return 0, desired
    rolling = strategy.get("rollingUpdate") or {}
    surge = _scaled(rolling.get("maxSurge"), desired, "25%", round_up=True)
    unavailable = _scaled(rolling.get("maxUnavailable"), desired, "25%", round_up=False)
    if surge == 0 and unavailable == 0:  # the API server rejects this; be lenient and let one go
        unavailable = 1
    return surge, unavailable


def plan_deployment(
    deployment: Mapping[str, Any], replicas: Sequence[Replica], now: datetime, progress_since: datetime
) -> DeploymentPlan:
    """The Deployment controller (with no ReplicaSets in between): scale, roll a changed template, report.

    A rolling update starts new pods within maxSurge, and stops old pods only while at least
    `replicas - maxUnavailable` pods are ready; unready old pods and finished pods go at once. Recreate
    stops every old pod before a new one starts. `progress_since` is when the current template was first
    seen: the progress deadline counts from there.
    """
    spec = deployment.get("spec") or {}
    desired = int(spec["replicas"]) if spec.get("replicas") is not None else 1
    current = template_hash(spec.get("template") or {})
    surge, unavailable = _rollout_bounds(spec, desired)
    live = [r for r in replicas if r.phase not in TERMINAL]
    stop = [r.name for r in replicas if r.phase in TERMINAL]
    new = [r for r in live if r.template_hash == current]
    old = [r for r in live if r.template_hash != current]
    recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
    start = 0
    if not spec.get("paused") and not (recreate and old):
        start = max(0, min(desired - len(new), desired + surge - len(live)))
    # Too many new pods (scaled down): stop the unready first, then the newest.
    extra = sorted(new, key=lambda r: (r.ready, -r.created_at.timestamp()))[: max(0, len(new) - desired)]
    stop += [r.name for r in extra]
    ready_total = sum(r.ready for r in live if r not in extra)
    min_available = max(0, desired - unavailable)
    for replica in sorted(old, key=lambda r: (r.ready, r.created_at)):
        if not replica.ready:
            stop.append(replica.name)
        elif ready_total - 1 >= min_available:
            stop.append(replica.name)
            ready_total -= 1
    status = _deployment_status(deployment, live, new, desired, min_available, now, progress_since)
    return DeploymentPlan(start=start, stop=tuple(stop), status=status)


def _deployment_status(
    deployment: Mapping[str, Any], live: Sequence[Replica], new: Sequence[Replica], desired: int,
    min_available: int, now: datetime, progress_since: datetime,
) -> JSON:
    spec, meta = deployment.get("spec") or {}, deployment.get("metadata") or {}
    old_status = deployment.get("status") or {}
    ready = sum(r.ready for r in live)
    rs_name = f"{meta.get('name', '')}-{template_hash(spec.get('template') or {})}"
    complete = len(new) == desired and len(live) == desired and ready >= desired
    deadline = float(spec.get("progressDeadlineSeconds", 600))
    if complete:
        progressing = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                       "message": f'ReplicaSet "{rs_name}" has successfully progressed.'}
    elif now >= progress_since + timedelta(seconds=deadline):
        progressing = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                       "message": f'ReplicaSet "{rs_name}" has timed out progressing.'}
    else:
        progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                       "message": f'ReplicaSet "{rs_name}" is progressing.'}
    available = {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                 "message": "Deployment has minimum availability."}
    if ready < min_available:
        available.update(status="False", reason="MinimumReplicasUnavailable",
                         message="Deployment does not have minimum availability.")
    return {
        "observedGeneration": int(meta.get("generation") or 1),
        "replicas": len(live),
        "updatedReplicas": len(new),
        "readyReplicas": ready,
        "availableReplicas": ready,  # minReadySeconds is not applied
        "unavailableReplicas": max(0, desired - ready),
        "conditions": with_transition_times(old_status.get("conditions") or [], [available, progressing], now),
    }


# --- Services --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A running pod as a Service backend."""

    name: str
    namespace: str
    labels: Mapping[str, str]
    ready: bool
    ports: Mapping[int, int]  # containerPort -> local port
    named_ports: Mapping[str, int]  # port name -> containerPort


def services_map(services: Sequence[Mapping[str, Any]], endpoints: Sequence[Endpoint]) -> JSON:
    """`{"ns/name": {"host": "127.0.0.1", "ports": {"<service port>": <local port>}}}`.

    A port is listed once a ready pod selected by the Service backs it (the first such pod by name: there
    is no load balancing); a Service without a selector or without ready pods has no ports.
    """
    out: JSON = {}
    for service in services:
        meta, spec = service.get("metadata") or {}, service.get("spec") or {}
        ns, selector = str(meta.get("namespace", "")), spec.get("selector") or {}
        backends = sorted(
            (e for e in endpoints if selector and e.namespace == ns and e.ready
             and all(e.labels.get(k) == v for k, v in selector.items())),
            key=lambda e: e.name,
        )
        ports: dict[str, int] = {}
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for backend in backends:
                number = backend.named_ports.get(target) if isinstance(target, str) and not target.isdigit() \
                    else int(target)
                if number is not None and number in backend.ports:
                    ports[str(port["port"])] = backend.ports[number]
                    break
        out[f"{ns}/{meta.get('name', '')}"] = {"host": LOOPBACK, "ports": ports}
    return out


def pods_map(endpoints: Sequence[Endpoint]) -> JSON:
    """`{"ns/pod": {"host": "127.0.0.1", "ports": {"<containerPort>": <local port>}}}` for every running pod, ready
    or not: all pods share the IP 127.0.0.1 here, so a client that talks to one pod (the operator pushing a router
    config to each replica) finds its port by the pod's name."""
    return {f"{e.namespace}/{e.name}": {"host": LOOPBACK, "ports": {str(k): v for k, v in sorted(e.ports.items())}}
            for e in sorted(endpoints, key=lambda e: (e.namespace, e.name)) if e.ports}


# --- the serving cap -------------------------------------------------------------------------------------------


def admit(waiting: Sequence[tuple[str, bool]], serving_in_use: int, cap: int) -> tuple[list[str], list[str]]:
    """(admitted, held) among pods waiting to start, in order: serving pods only while the cap has room."""
    admitted, held = [], []
    for name, serving in waiting:
        if not serving:
            admitted.append(name)
        elif serving_in_use < cap:
            admitted.append(name)
            serving_in_use += 1
        else:
            held.append(name)
    return admitted, held


def cpu_slots(pool: Sequence[int], cap: int) -> list[tuple[int, ...]]:
    """Exclusive CPU sets for serving pods, as the kubelet's static CPU manager gives Guaranteed pods: the pool
    split into `cap` equal slots (2 cores, cap 2: one core each), or none when there are fewer CPUs than slots.
    Why: vLLM's CPU build binds its OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND=auto) to the CPUs it is
    allowed, minus one it reserves; two engines that both see the whole machine bind to the *same* core and
    stall each other for tens of seconds under load. Within its own slot each engine binds where it should."""
    cpus = sorted(pool)
    if cap < 1 or len(cpus) < cap:
        return []
    size = len(cpus) // cap
    return [tuple(cpus[i * size:(i + 1) * size]) for i in range(cap)]


def free_slot(slots: Sequence[tuple[int, ...]], taken: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    """The first slot nobody holds, or () (no pinning) when there are no slots or all are held."""
    held = set(taken)
    return next((slot for slot in slots if slot not in held), ())


def cap_message(cap: int) -> str:
    return (
        f"0/1 nodes are available: the local runner caps concurrent serving processes at {cap} on this machine; "
        "the pod starts when one stops"
    )


# --- garbage collection ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerRef:
    api_version: str
    kind: str
    uid: str


def owner_refs(obj: Mapping[str, Any]) -> tuple[OwnerRef, ...]:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return tuple(OwnerRef(str(r.get("apiVersion", "")), str(r.get("kind", "")), str(r.get("uid", ""))) for r in refs)


def orphaned(
    objects: Sequence[Mapping[str, Any]], live_uids: Mapping[tuple[str, str], set[str]]
) -> list[Mapping[str, Any]]:
    """Objects all of whose owners are gone, as the garbage collector would delete them.

    `live_uids` maps (apiVersion, kind) to the uids that exist now; an owner of a kind missing from it
    (one the collector could not list) keeps its dependants, so nothing is deleted on doubt.
    """
    out = []
    for obj in objects:
        refs = owner_refs(obj)
        if refs and all(
            (ref.api_version, ref.kind) in live_uids and ref.uid not in live_uids[(ref.api_version, ref.kind)]
            for ref in refs
        ):
            out.append(obj)
    return out
