"""Model artifacts in an OCI registry: publish a folder, and bring one back by digest with every byte verified.

The layout (what `push` writes and every reader expects): one layer per file, titled by
`org.opencontainers.image.title`, with the media types of `quantrol_worker.contracts`, and a small config blob.

Every download path (the serving pod's `fetch`, calibration's base-model pull and `python -m
quantrol_worker.calibrate pull`) goes through one verifier, because the manifest comes from a registry a tenant may
control:
- the manifest is fetched by digest and its bytes hashed against that digest (a tag can move, a digest cannot);
- each layer's title must be a plain file name that is not one of ours: empty, `.`, `..`, anything with `/`,
  `\\` or NUL, and the names this module and `fetch` write into the destination (`RESERVED_TITLES`) are refused,
  not sanitised, before a byte is downloaded;
- each file is downloaded into the staging folder inside the destination, its sha256 and size checked against
  the manifest, and only then renamed into place (same file system, so atomic): the destination only ever holds
  verified files, also after a failure halfway.

Credentials come from one docker config.json (`credentials`: the file a mounted `kubernetes.io/dockerconfigjson`
Secret holds), looked up by registry host before the first request, for push and pull alike. Only its inline `auths`
are read: credential helpers (`credsStore`, `credHelpers`) are programs, and the file comes from a tenant's Secret.
Registries that challenge with Basic (htpasswd: distribution, Artifactory) and with Bearer tokens (GHCR, Harbor,
Docker Hub) both work. A 401 or 403 is its own reason (`RegistryUnauthorized`), naming the registry and whether
credentials were given, never what they are. Plain HTTP is the caller's decision per registry (`plain_http`, from the
install policy's list); TLS trusts the system CAs or `REQUESTS_CA_BUNDLE`.

Errors carry an `ArtifactReason` (the values of `fetch`'s termination message); callers map them to their own
vocabulary. Torch-free and stdlib-only at import time (the worker's CLI imports `fetch` to build its parser);
oras is imported when a registry is contacted.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger("quantrol.oci")

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE_ANNOTATION = "org.opencontainers.image.title"
RECORD_FILE = ".quantrol-fetch.json"  # `fetch` writes what it fetched here, for whoever debugs the pod later
STAGING_DIR = ".partial"  # downloads land here until verified
RESERVED_TITLES = frozenset({RECORD_FILE, STAGING_DIR})
DOCKER_CONFIG_LIMIT = 1 << 20  # bytes: a docker config with a few dozen registries is a few KiB
# A registry is whoever the artifact reference names (a tenant's choice). Every call waits at most this long per socket
# operation (oras sets no timeout); a manifest, which is read into memory, is bounded in size (the distribution spec
# asks registries to accept manifests of at least 4 MiB: ours are a few KiB) and in the whole read's time. Blobs are
# streamed to disk, bounded by the manifest's sizes and the volume (check_fits), and verified by digest.
SOCKET_TIMEOUT_S = (10.0, 60.0)  # (connect, each read)
MANIFEST_MAX_BYTES = 4 << 20
MANIFEST_SECONDS = 30.0
# Docker Hub's credentials are keyed by its v1 index URL, whatever host the client talks to.
_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REF = re.compile(
    r"^(?P<host>[^/]+)/(?P<repo>[a-z0-9._\-/]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]*))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


class ArtifactReason(StrEnum):
    """Why an artifact was refused (CamelCase, like condition reasons; `fetch` writes them as they are)."""

    DIGEST_MISMATCH = "DigestMismatch"  # bytes differ from the digest or size that pins them
    INVALID_REFERENCE = "InvalidReference"  # the reference or the manifest it names cannot be used as is
    ARTIFACT_UNAVAILABLE = "ArtifactUnavailable"  # the registry or the source could not deliver
    REGISTRY_UNAUTHORIZED = "RegistryUnauthorized"  # HTTP 401/403: credentials missing, wrong, or without access
    INSUFFICIENT_STORAGE = "InsufficientStorage"  # the files do not fit the destination volume


class ArtifactError(Exception):
    def __init__(self, reason: ArtifactReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class OciRef:
    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, reference: str) -> OciRef:
        m = _REF.match(reference.removeprefix("oci://"))
        if not m:
            raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"not an OCI reference: {reference!r}")
        return cls(m["host"], m["repo"], m["tag"], m["digest"])

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def pinned(self, digest: str) -> str:
        return f"{self.name}@{digest}"


@dataclass(frozen=True)
class Layer:
    """One file of an artifact, as its manifest pins it (`digest` is empty only for an unverified local copy)."""

    title: str
    digest: str
    size: int | None


# --- the verifier ---


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_title(title: str, digest: str) -> None:
    """A title becomes a file name in the destination: anything that could land elsewhere (an absolute path
    contains `/`), or on one of our own files, is refused rather than sanitised (a sanitised name would no longer
    be what the manifest says)."""
    if not title or title in (".", "..") or any(c in title for c in "/\\\0"):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE,
                            f"layer {digest} has an unsafe or missing title {title!r}: it must be a plain file name")
    if title in RESERVED_TITLES:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE,
                            f"layer {digest} is titled {title!r}, a name reserved for quantrol-worker's own files "
                            f"in the destination ({', '.join(sorted(RESERVED_TITLES))})")


def _layer(raw: Any) -> Layer:
    if not isinstance(raw, dict):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"a manifest layer is not an object: {raw!r:.80}")
    digest = str(raw.get("digest", ""))
    if not _DIGEST.match(digest):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"layer digest {digest!r:.80} is not a sha256 digest")
    annotations = raw.get("annotations")
    title = str((annotations if isinstance(annotations, dict) else {}).get(TITLE_ANNOTATION) or "")
    check_title(title, digest)
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"layer {title!r} has an invalid size {size!r:.40}")
    return Layer(title, digest, size)


def layers_of(manifest: Any) -> list[Layer]:
    """The manifest's file layers, every title checked (`check_title`) before anything is downloaded."""
    raw_layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(raw_layers, list):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, "the manifest has no list of layers")
    layers = [_layer(raw) for raw in raw_layers]
    if not layers:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, "the manifest lists no files")
    titles = [layer.title for layer in layers]
    twice = sorted({t for t in titles if titles.count(t) > 1})
    if twice:  # which of two verified files would end up under the name is an accident of order: neither is
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"the manifest lists {twice} more than once")
    return layers


def check_file(path: Path, layer: Layer) -> None:
    actual = sha256_file(path)
    size = path.stat().st_size
    if actual != layer.digest or (layer.size is not None and size != layer.size):
        raise ArtifactError(
            ArtifactReason.DIGEST_MISMATCH,
            f"{layer.title}: got {actual} ({size} bytes), the manifest pins {layer.digest} ({layer.size} bytes)",
        )


def is_verified(path: Path, layer: Layer) -> bool:
    if not path.is_file() or (layer.size is not None and path.stat().st_size != layer.size):
        return False
    return sha256_file(path) == layer.digest


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A fresh staging folder inside `dest` (same file system: the final rename is atomic), always removed after."""
    staging = dest / STAGING_DIR
    _remove(staging)  # leftovers of an interrupted run were never verified
    staging.mkdir()
    try:
        yield staging
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_fits(layers: list[Layer], dest: Path, max_bytes: int | None = None) -> None:
    """Refuse before the first byte when the files cannot fit: the size the pod gave its model volume (`max_bytes`:
    an emptyDir's sizeLimit, which the file system does not show; the kubelet evicts beyond it) and the free space
    the file system reports (a claim's, or the node's disk). Files already in place with their size count as there."""
    total = sum(layer.size or 0 for layer in layers)
    if max_bytes is not None and total > max_bytes:
        raise ArtifactError(ArtifactReason.INSUFFICIENT_STORAGE,
                            f"the artifact's {len(layers)} files take {total} bytes; the model volume holds "
                            f"{max_bytes}: give it more storage")
    dest.mkdir(parents=True, exist_ok=True)
    needed = sum(layer.size or 0 for layer in layers
                 if not ((dest / layer.title).is_file() and (dest / layer.title).stat().st_size == layer.size))
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise ArtifactError(ArtifactReason.INSUFFICIENT_STORAGE,
                            f"the artifact needs {needed} more bytes in {dest}, which has {free} free")


def install_verified(layers: list[Layer], dest: Path, obtain: Callable[[Layer, Path], None]) -> None:
    """Put every layer's file into `dest`: `obtain(layer, path)` writes its bytes to a staging path, which is
    verified and then renamed into place. Files already in `dest` with the right digest are kept (an init
    container restart does not download a model twice)."""
    dest.mkdir(parents=True, exist_ok=True)
    with _staging(dest) as staging:
        for i, layer in enumerate(layers, 1):
            final = dest / layer.title
            if is_verified(final, layer):
                log.info("[%d/%d] %s already present and verified", i, len(layers), layer.title)
                continue
            log.info("[%d/%d] fetching %s (%s, %s bytes)", i, len(layers), layer.title, layer.digest, layer.size)
            tmp = staging / layer.title
            obtain(layer, tmp)
            check_file(tmp, layer)
            os.replace(tmp, final)


# --- the registry ---


def plain_http(host: str, registries: Iterable[str]) -> bool:
    """Whether `host` (`name[:port]`) is reached over plain HTTP: listed as it is, or its name listed without a port
    (`registry.ci.svc` covers every port of it). One rule for push, pull and fetch; the list is the install policy's."""
    name = host.rsplit(":", 1)[0] if re.fullmatch(r".+:\d+", host) else host
    return any(entry in (host, name) for entry in registries)


@dataclass(frozen=True)
class Credentials:
    """One registry's user and password from a docker config; never logged, never in a message."""

    username: str = field(repr=False)
    password: str = field(repr=False)


def _config_host(key: str) -> str:
    """`https://index.docker.io/v1/` -> `index.docker.io`; `registry:5000` stays as it is."""
    return re.sub(r"^[a-z]+://", "", key.strip()).split("/", 1)[0]


def _entry_credentials(entry: Any, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    if not entry.get("auth"):
        return None
    try:
        user, sep, password = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        user, sep, password = "", "", ""
    if not sep or not user:
        raise ArtifactError(ArtifactReason.REGISTRY_UNAUTHORIZED,
                            f"{where}: its `auth` is not base64 of user:password")
    return Credentials(user, password)


def credentials_for(config: Path | None, host: str) -> Credentials | None:
    """The docker config's credentials for `host` (`auths`, keyed by `host[:port]` or by a URL), or None."""
    if config is None:
        return None
    try:
        if config.stat().st_size > DOCKER_CONFIG_LIMIT:
            raise ArtifactError(ArtifactReason.REGISTRY_UNAUTHORIZED,
                                f"registry credentials {config}: larger than {DOCKER_CONFIG_LIMIT} bytes")
        data = json.loads(config.read_bytes())
    except OSError as exc:
        raise ArtifactError(ArtifactReason.REGISTRY_UNAUTHORIZED,
                            f"registry credentials {config} cannot be read: {exc.strerror}") from exc
    except ValueError as exc:
        raise ArtifactError(ArtifactReason.REGISTRY_UNAUTHORIZED,
                            f"registry credentials {config} are not a docker config.json (not JSON)") from exc
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        raise ArtifactError(ArtifactReason.REGISTRY_UNAUTHORIZED,
                            f"registry credentials {config} are not a docker config.json (no `auths`)")
    wanted = {host} | (_DOCKER_HUB if host in _DOCKER_HUB else set())
    for key, entry in auths.items():
        if _config_host(str(key)) in wanted:
            return _entry_credentials(entry, f"registry credentials {config}, entry {_config_host(str(key))}")
    return None


class Registry:
    """One registry host as oras-py reaches it, with our credentials and the status of its last answer.

    oras-py raises bare ValueErrors and HTTPErrors; the last status tells whether a failure was about credentials.
    Its own credential loading is switched off (it would read ~/.docker and run credential helpers): `credentials`
    are the only ones used, offered to Basic challenges as they are and to Bearer challenges for a token."""

    def __init__(self, host: str, *, insecure: bool, credentials: Path | None) -> None:
        import oras.client

        self.host = host
        self.source = credentials
        self.credentials = credentials_for(credentials, host)
        self.client = oras.client.OrasClient(hostname=host, insecure=insecure)
        session = self.client.session
        session.request = functools.partial(session.request, timeout=SOCKET_TIMEOUT_S)
        self.last_status: int | None = None
        self.client.session.hooks["response"].append(self._record)
        auth = self.client.auth
        auth.load_configs = lambda *_args, **_kwargs: None
        if self.credentials is not None:
            auth.set_basic_auth(self.credentials.username, self.credentials.password)
        self._bearer = auth.authenticate_request
        auth.authenticate_request = self._authenticate

    @property
    def prefix(self) -> str:
        return str(self.client.prefix)

    def _record(self, response: Any, *_args: Any, **_kwargs: Any) -> None:
        self.last_status = int(response.status_code)

    def _authenticate(self, original: Any, headers: dict[str, str] | None,
                      refresh: bool = False) -> tuple[dict[str, str], bool]:
        """Answer a 401's challenge, or raise oras' AuthenticationException: oras retries any other error five
        times over two minutes, and no retry turns a refusal into a yes."""
        from oras.auth import AuthenticationException

        challenge = str(original.headers.get("Www-Authenticate", ""))
        if challenge.split(" ", 1)[0].lower() != "basic":
            result: tuple[dict[str, str], bool] = self._bearer(original, headers, refresh)
            if not result[1]:
                raise AuthenticationException(f"{self.host}: no token for {challenge[:200]!r}")
            return result
        if self.credentials is None:
            raise AuthenticationException(f"{self.host}: Basic credentials asked for, none given")
        basic = base64.b64encode(f"{self.credentials.username}:{self.credentials.password}".encode()).decode()
        self.client.session.headers["Authorization"] = f"Basic {basic}"  # every later request carries it
        return {**(headers or {}), "Authorization": f"Basic {basic}"}, True

    def unauthorized(self, what: str, status: int | None = None) -> ArtifactError:
        code = status or self.last_status
        answer = "401 Unauthorized" if code == 401 else f"{code} Forbidden"
        if self.credentials is None:
            given = (f"the registry credentials ({self.source}) hold none for {self.host}" if self.source
                     else "no registry credentials were given")
            why = f"it asks for credentials, and {given}"
        else:
            why = f"it refused the credentials given for {self.host}" + (
                "" if code == 401 else " (they have no access to this repository)")
        return ArtifactError(ArtifactReason.REGISTRY_UNAUTHORIZED, f"{what}: {self.host} answered HTTP {answer}: {why}")

    def failed(self, what: str, exc: Exception) -> ArtifactError:
        """The ArtifactError for an exception oras or requests raised while doing `what`."""
        if self.last_status in (401, 403):
            return self.unauthorized(what)
        return ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"{what}: {exc}")

    def request(self, url: str, method: str, what: str, headers: dict[str, str] | None = None,
                stream: bool = False) -> Any:
        try:
            response = self.client.do_request(url, method, headers=headers or {}, stream=stream)
        except Exception as exc:  # oras/requests raise bare ValueError / ConnectionError
            raise self.failed(what, exc) from exc
        if response.status_code in (401, 403):
            raise self.unauthorized(what, response.status_code)
        return response


def pinned_digest(ref: OciRef) -> str:
    """The digest `ref` pins. A tag-only reference is refused: a tag can move under a running rollout, a digest
    cannot."""
    if ref.digest is None:
        raise ArtifactError(
            ArtifactReason.INVALID_REFERENCE,
            f"{ref.name}: refusing a tag-only reference; pin the artifact by digest (oci://REPO@sha256:...)",
        )
    return ref.digest


def fetch_manifest(ref: OciRef, *, insecure: bool, credentials: Path | None = None) -> dict[str, Any]:
    """The manifest `ref` pins by digest, its bytes checked against that digest."""
    digest = pinned_digest(ref)
    return _manifest(Registry(ref.host, insecure=insecure, credentials=credentials), ref, digest)


def _manifest(registry: Registry, ref: OciRef, digest: str) -> dict[str, Any]:
    pinned = ref.pinned(digest)
    url = f"{registry.prefix}://{ref.host}/v2/{ref.repository}/manifests/{digest}"
    response = registry.request(url, "GET", f"manifest {pinned}", headers={"Accept": MANIFEST_MEDIA_TYPE},
                                stream=True)
    with response:
        if response.status_code != 200:
            raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"{pinned}: HTTP {response.status_code}")
        content = bounded_body(response, f"manifest {pinned}")
    actual = "sha256:" + hashlib.sha256(content).hexdigest()
    if actual != digest:
        raise ArtifactError(ArtifactReason.DIGEST_MISMATCH, f"manifest digest {actual} != {digest}")
    try:
        manifest = json.loads(content)
    except ValueError as exc:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"{pinned} is not JSON") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"{pinned} is not a manifest")
    return manifest


def bounded_body(response: Any, what: str, max_bytes: int = MANIFEST_MAX_BYTES,
                 seconds: float = MANIFEST_SECONDS) -> bytes:
    """The body of a streamed `requests` response, refused beyond `max_bytes` or `seconds` for the whole read (each
    read takes what has arrived, so a registry that drips a byte at a time is cut at the deadline too)."""
    declared = str(response.headers.get("Content-Length") or "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"{what}: declares {declared} bytes, over {max_bytes}")
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    size = 0
    while chunk := response.raw.read1(64 << 10, decode_content=True):
        size += len(chunk)
        if size > max_bytes:
            raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"{what}: larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"{what}: not read within {seconds:g} s")
        chunks.append(chunk)
    return b"".join(chunks)


def pull(reference: str, dest: Path, *, insecure: bool, credentials: Path | None = None,
         max_bytes: int | None = None, titles: frozenset[str] | None = None,
         max_layer_bytes: int | None = None) -> tuple[str, list[Layer]]:
    """Bring `oci://REPO@sha256:…` into `dest`, verified; returns the pinned reference and the layers brought.
    `titles`: only the files of these names (a reader of the report or the evaluation prompts needs no weights);
    a name the artifact does not hold is simply not brought, the caller decides what its absence means.
    `max_layer_bytes`: a layer the manifest sizes above it (or does not size) is refused before a byte is fetched;
    `max_bytes`: so are files that together would not fit the destination (`check_fits`)."""
    ref = OciRef.parse(reference)
    digest = pinned_digest(ref)
    registry = Registry(ref.host, insecure=insecure, credentials=credentials)
    layers = [layer for layer in layers_of(_manifest(registry, ref, digest)) if titles is None or layer.title in titles]
    for layer in layers:
        if max_layer_bytes is not None and (layer.size is None or layer.size > max_layer_bytes):
            raise ArtifactError(ArtifactReason.INVALID_REFERENCE,
                                f"layer {layer.title!r} is {layer.size} bytes, over the {max_layer_bytes}-byte limit")
    check_fits(layers, dest, max_bytes)

    def download(layer: Layer, path: Path) -> None:
        try:
            registry.client.download_blob(ref.name, layer.digest, str(path))
        except Exception as exc:  # oras/requests raise bare HTTPError / ConnectionError
            raise registry.failed(f"blob {layer.title} ({layer.digest})", exc) from exc

    install_verified(layers, dest, download)
    return ref.pinned(digest), layers


def media_type_of(path: Path) -> str:
    # Imported here, not at the top: pydantic would make every `quantrol-worker` parse pay for a push-only need.
    from quantrol_worker.contracts import (
        EVALUATION_PROMPTS_FILE,
        EVALUATION_PROMPTS_MEDIA_TYPE,
        FILE_MEDIA_TYPE,
        JSON_FILE_MEDIA_TYPE,
        REPORT_FILE,
        REPORT_MEDIA_TYPE,
        SAFETENSORS_MEDIA_TYPE,
    )

    if path.name == REPORT_FILE:
        return REPORT_MEDIA_TYPE
    if path.name == EVALUATION_PROMPTS_FILE:
        return EVALUATION_PROMPTS_MEDIA_TYPE
    if path.suffix == ".safetensors":
        return SAFETENSORS_MEDIA_TYPE
    if path.suffix == ".json":
        return JSON_FILE_MEDIA_TYPE
    return FILE_MEDIA_TYPE


def check_push_access(repository: str, *, insecure: bool, credentials: Path | None = None) -> None:
    """Start a blob upload to `repository` and cancel it: the registry says now, not after hours of calibration,
    whether these credentials may push there (401/403 is REGISTRY_UNAUTHORIZED, naming the registry)."""
    ref = OciRef.parse(repository)
    registry = Registry(ref.host, insecure=insecure, credentials=credentials)
    what = f"push access to {ref.name}"
    response = registry.request(f"{registry.prefix}://{ref.host}/v2/{ref.repository}/blobs/uploads/", "POST", what)
    if response.status_code != 202:
        raise ArtifactError(ArtifactReason.ARTIFACT_UNAVAILABLE, f"{what}: HTTP {response.status_code}")
    location = str(response.headers.get("Location", ""))
    if location:
        url = location if "://" in location else f"{registry.prefix}://{ref.host}{location}"
        try:
            registry.client.do_request(url, "DELETE")  # the upload was only a question; leave nothing behind
        except Exception as exc:  # a registry that cannot cancel purges the upload itself later
            log.info("cancelling the probe upload to %s failed: %s", ref.name, exc)


def push(directory: Path, repository: str, *, insecure: bool, tag: str | None, annotations: dict[str, str],
         credentials: Path | None = None) -> str:
    """Push every file of `directory` as one layer each; returns `repo@sha256:…` of the manifest. Every file name
    passes `check_title` first: an artifact no reader would accept is never published."""
    from quantrol_worker.contracts import ARTIFACT_TYPE, CONFIG_MEDIA_TYPE

    ref = OciRef.parse(repository if tag is None else f"{repository}:{tag}")
    target = f"{ref.name}:{ref.tag or 'latest'}"
    files = sorted(p for p in directory.iterdir() if p.is_file())
    for path in files:
        check_title(path.name, str(path))
        if ":" in path.name:  # oras reads `path:media type`; a colon in the name would change the media type
            raise ArtifactError(ArtifactReason.INVALID_REFERENCE, f"{path}: a file name with ':' cannot be pushed")
    registry = Registry(ref.host, insecure=insecure, credentials=credentials)
    client = registry.client
    with tempfile.TemporaryDirectory(prefix="quantrol-oci-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"artifactType": ARTIFACT_TYPE, "files": [p.name for p in files]}, sort_keys=True))
        try:
            response = client.push(
                target=target,
                files=[f"{p}:{media_type_of(p)}" for p in files],
                manifest_config=f"{config}:{CONFIG_MEDIA_TYPE}",
                manifest_annotations=annotations,
                disable_path_validation=True,
                quiet=True,
            )
        except Exception as exc:  # oras raises bare ValueError / requests errors
            raise registry.failed(f"push to {target}", exc) from exc
    digest = response.headers.get("Docker-Content-Digest")
    if not digest:
        url = f"{registry.prefix}://{ref.host}/v2/{ref.repository}/manifests/{ref.tag or 'latest'}"
        manifest = registry.request(url, "GET", f"manifest of {target}", headers={"Accept": MANIFEST_MEDIA_TYPE})
        digest = "sha256:" + hashlib.sha256(manifest.content).hexdigest()
    return ref.pinned(digest)
