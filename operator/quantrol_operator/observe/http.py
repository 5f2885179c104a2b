"""Bounded HTTP for what the operator reads from pods it does not trust (the launcher's /kernels runs inside a
tenant-chosen image; router admin endpoints answer for their pods): a bound on the body's size and on the whole
call's time, not only on each socket read; no redirects, no proxies.

Built on http.client so that every socket operation waits at most the time left in the call: a server that drips
one byte a second, or never ends its body, is cut off at the bound instead of holding a reconcile pass forever.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse
from typing import Any

MAX_BYTES = 1 << 20  # 1 MiB: a kernel report or a push answer is a few KiB
TOTAL_SECONDS = 5.0
CHUNK = 64 << 10


class BoundExceeded(OSError):
    """The answer was larger, or slower, than the call's bound allows."""


class HttpStatusError(OSError):
    """An answer with an error (or redirect) status; `detail` is the start of its body, for the log only."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _connection(url: urllib.parse.SplitResult, timeout: float,
                ca_file: str | None = None) -> http.client.HTTPConnection:
    if url.scheme == "https":  # verified: against the system's CAs, or the install's own when it names one
        return http.client.HTTPSConnection(url.hostname or "", url.port, timeout=timeout,
                                           context=ssl.create_default_context(cafile=ca_file))
    if url.scheme == "http":
        return http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
    raise ValueError(f"not an http(s) URL: {url.geturl()!r}")


def request(url: str, body: bytes | None = None, token: str = "", *, total_seconds: float = TOTAL_SECONDS,
            max_bytes: int = MAX_BYTES, ca_file: str | None = None) -> tuple[int, bytes]:
    """(status, body) of one GET (or POST of `body`), all of it within `total_seconds` and `max_bytes`."""
    deadline = time.monotonic() + total_seconds

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BoundExceeded(f"no complete answer within {total_seconds:g} s")
        return remaining

    parts = urllib.parse.urlsplit(url)
    connection = _connection(parts, left(), ca_file)
    try:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        # Held here: http.client lets go of the connection's socket once a response says it closes the connection,
        # while the response keeps reading from it.
        sock = connection.sock
        assert sock is not None
        sock.settimeout(left())
        response = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        while True:
            sock.settimeout(left())
            chunk = response.read1(CHUNK)
            if not chunk:
                return response.status, b"".join(chunks)
            size += len(chunk)
            if size > max_bytes:
                raise BoundExceeded(f"the answer is larger than {max_bytes} bytes")
            chunks.append(chunk)
    except TimeoutError as exc:
        raise BoundExceeded(f"no complete answer within {total_seconds:g} s") from exc
    finally:
        connection.close()


def request_json(url: str, body: bytes | None = None, token: str = "", *, total_seconds: float = TOTAL_SECONDS,
                 max_bytes: int = MAX_BYTES) -> Any:
    """The JSON answer of a 2xx; HttpStatusError for any other status (redirects are not followed), OSError
    (BoundExceeded included) when nothing complete came back within the bounds, ValueError when it is not JSON."""
    status, payload = request(url, body, token, total_seconds=total_seconds, max_bytes=max_bytes)
    if not 200 <= status < 300:
        raise HttpStatusError(status, payload[:512].decode(errors="replace").strip())
    return json.loads(payload or b"null")
