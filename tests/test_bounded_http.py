"""observe/http.py: what the operator reads from pods (a launcher in a tenant-chosen image, router admin endpoints)
is bounded in size and in the whole call's time, not only per socket read.

Real sockets on 127.0.0.1: a server that streams an endless body, one that drips a byte every 0.3 s (each read
answers well within any per-read timeout, so only a total bound stops it), one that redirects elsewhere.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from quantrol_operator.observe import http


def serve_answers(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A server on 127.0.0.1 that reads each request and gives `answer` the connection (also used by test_oci)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def loop() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                with contextlib.suppress(OSError):  # the client gave up: that is the point
                    answer(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/kernels"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture
def endless() -> Iterator[str]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            conn.sendall(b'"native",' * 4096)

    yield from serve_answers(answer)


@pytest.fixture
def dripping() -> Iterator[str]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        for _ in range(100):
            conn.sendall(b" ")
            time.sleep(0.3)

    yield from serve_answers(answer)


@pytest.fixture
def redirecting() -> Iterator[str]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data/\r\n"
                     b"Content-Length: 0\r\n\r\n")

    yield from serve_answers(answer)


def test_an_endless_answer_is_cut_at_the_size_bound(endless: str) -> None:
    began = time.monotonic()
    with pytest.raises(http.BoundExceeded, match="larger than"):
        http.request_json(endless, max_bytes=256 << 10, total_seconds=5)
    assert time.monotonic() - began < 5


def test_a_dripping_answer_is_cut_at_the_time_bound(dripping: str) -> None:
    began = time.monotonic()
    with pytest.raises(http.BoundExceeded, match="within"):
        http.request_json(dripping, total_seconds=1.5)
    assert time.monotonic() - began < 2.5  # the whole call, not one read


def test_a_redirect_is_an_answer_not_a_hop(redirecting: str) -> None:
    with pytest.raises(http.HttpStatusError) as refused:
        http.request_json(redirecting)
    assert refused.value.status == 302
