"""A real HTTP server for remote-read tests: serves a directory on 127.0.0.1 with single-range
``Range`` support (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``), HTTP/1.1 keep-alive, and a log of
every request with the body bytes actually sent.

    with serve(directory) as srv:
        url = srv.url("slide.svs")          # http://127.0.0.1:PORT/slide.svs
        ...
        srv.bytes_sent()                   # body bytes sent since start / last reset()
        srv.reset()
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # fsspec opens many connections at once; the default 5 drops SYNs

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address) -> None:
        # a client closing a connection early (fsspec's exists() does a GET and drops the body)
        # is normal here; anything else is printed as usual
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def url(self, rel: str = "") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{urllib.parse.quote(rel)}"

    def bytes_sent(self) -> int:
        with self.lock:
            return sum(r.body_bytes for r in self.requests)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def log(self, r: Request) -> None:
        with self.lock:
            self.requests.append(r)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out as separate writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold each response for tens of milliseconds
    disable_nagle_algorithm = True
    server: RangeServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - base class signature
        return None

    def _file(self) -> Path | None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        p = (self.server.root / rel).resolve()
        if self.server.root not in (p, *p.parents) or not p.is_file():
            return None
        return p

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool, rng: str | None) -> None:
        # logged before anything is sent, so a client that has its response always finds it in
        # the log (a body cut short by the client still counts whole: an upper bound)
        sent = len(body) if not head else 0
        self.server.log(Request(self.command, self.path, rng, status, sent))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if sent:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        p = self._file()
        rng = self.headers.get("Range")
        if p is None:
            self._send(404, b"not found", {"Content-Type": "text/plain"}, head, rng)
            return
        size = p.stat().st_size
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if rng is None:
            self._send(200, p.read_bytes(), headers, head, rng)
            return
        m = _RANGE.match(rng.strip())
        if not m or (m.group(1) == "" and m.group(2) == ""):
            self._send(416, b"", {"Content-Range": f"bytes */{size}"}, head, rng)
            return
        if m.group(1) == "":  # suffix
            n = int(m.group(2))
            start, end = max(0, size - n), size - 1
        else:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or end < start:
            self._send(416, b"", {"Content-Range": f"bytes */{size}"}, head, rng)
            return
        with open(p, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self._send(206, body, headers | {"Content-Range": f"bytes {start}-{end}/{size}"}, head, rng)

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server API
        p = self._file()
        if p is None:
            self._send(404, b"", {}, True, None)
            return
        # HEAD must announce the real length without a body
        self.server.log(Request("HEAD", self.path, None, 200, 0))
        self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(os.path.getsize(p)))
        self.end_headers()


@contextlib.contextmanager
def running(srv: RangeServer) -> Iterator[RangeServer]:
    """Run ``srv`` (a RangeServer or subclass) in a background thread for the block."""
    t = threading.Thread(target=srv.serve_forever, name="range-http", daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def serve(root: str | os.PathLike):
    """Serve ``root`` on 127.0.0.1 (a free port) in a background thread for the block."""
    return running(RangeServer(Path(root)))
