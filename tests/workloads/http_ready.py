"""A tiny HTTP "server container" for the runner tests, with readiness a test can flip.

    python http_ready.py --port N [--host H]

GET /        -> 200, body: $VERSION (so a test sees which template serves)
GET /ready   -> 200 while ready, 503 otherwise (starts ready)
POST /toggle -> flips readiness; body: the new state
Standard library only; exits on SIGTERM (the default handler).
"""

from __future__ import annotations

import argparse
import http.server
import os
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    ready = threading.Event()

    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/ready":
            self._reply(200 if self.ready.is_set() else 503, "ready" if self.ready.is_set() else "not ready")
        else:
            self._reply(200, os.environ.get("VERSION", ""))

    def do_POST(self) -> None:
        if self.ready.is_set():
            self.ready.clear()
        else:
            self.ready.set()
        self._reply(200, "ready" if self.ready.is_set() else "not ready")

    def log_message(self, format: str, *args: object) -> None:  # keep the container log quiet
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    Handler.ready.set()
    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
