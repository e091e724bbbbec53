"""A fault-injecting HTTP Range server for remote-read tests (built on tests/httpserver.py).

Each request (GET or HEAD) is faulted with probability ``rate``, drawn from a seeded generator so a
run is reproducible (``schedule``, a list of kinds, faults the first requests first); the fault is
one of :data:`FAULTS`, in turn:

- ``503``: 503 Service Unavailable;
- ``429``: 429 Too Many Requests with ``Retry-After: <retry_after>`` seconds;
- ``reset``: the response starts (status, headers with the full Content-Length, half the body)
  and the connection is reset (RST);
- ``short``: a 206 whose body is half the range, with a Content-Length to match and a
  Content-Range that still claims the whole range;
- ``wrong_range``: a 206 with the bytes of another range, honestly labelled by Content-Range;
- ``stall``: nothing is sent for ``stall_s`` seconds, then the connection is closed;
- ``403`` (only when asked for): 403 Forbidden, a fault that must not be retried.

    with serve_faults(directory, rate=0.1, seed=0) as srv:
        url = srv.url("slide.svs")
        ...
        srv.faults            # {kind: count} of faults injected so far
        srv.timeline          # [(time.monotonic(), kind or "ok")] of every request
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
from collections import Counter
from pathlib import Path

from httpserver import _RANGE, RangeServer, Request, _Handler, running

FAULTS = ("503", "429", "reset", "short", "wrong_range", "stall")


class FaultServer(RangeServer):
    def __init__(
        self,
        root: Path,
        *,
        rate: float,
        seed: int = 0,
        faults: tuple[str, ...] = FAULTS,
        retry_after: float = 1.0,
        stall_s: float = 3.0,
        schedule: list[str] | None = None,
    ):
        super().__init__(root)
        self.RequestHandlerClass = _FaultHandler
        self.rate, self.kinds, self.retry_after, self.stall_s = rate, faults, retry_after, stall_s
        self.schedule = list(schedule or [])
        self._rng = random.Random(seed)
        self._turn = 0
        self.faults: Counter[str] = Counter()
        self.timeline: list[tuple[float, str]] = []

    def draw(self) -> str | None:
        """The fault for the next request (None: answer it properly)."""
        with self.lock:
            if self.schedule:
                kind = self.schedule.pop(0)
            elif self.kinds and self._rng.random() < self.rate:
                kind = self.kinds[self._turn % len(self.kinds)]
                self._turn += 1
            else:
                kind = None
            if kind is not None:
                self.faults[kind] += 1
            self.timeline.append((time.monotonic(), kind or "ok"))
            return kind


class _FaultHandler(_Handler):
    server: FaultServer

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), not an orderly close."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _fault(self, kind: str, head: bool) -> bool:
        """Inject ``kind`` into this request; False when it does not apply (the request is then
        answered properly)."""
        rng = self.headers.get("Range")
        if kind in ("503", "429", "403"):
            hdrs = {"Retry-After": f"{self.server.retry_after:g}"} if kind == "429" else {}
            self._send(int(kind), b"" if head else b"fault", hdrs, head, rng)
            return True
        if kind == "stall":
            time.sleep(self.server.stall_s)
            self._reset()
            return True
        p = self._file()
        m = _RANGE.match((rng or "").strip())
        if head or p is None or not m or m.group(1) == "":
            if kind == "reset":
                self._reset()
                return True
            return False
        size = p.stat().st_size
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or end < start:
            return False
        with open(p, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if kind == "reset":
            self.server.log(Request(self.command, self.path, rng, 206, len(body) // 2))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self._reset()
            return True
        if kind == "short":
            if len(body) < 2:
                return False
            self._send(
                206,
                body[: len(body) // 2],
                headers | {"Content-Range": f"bytes {start}-{end}/{size}"},
                head,
                rng,
            )
            return True
        if kind == "wrong_range":
            shift = 1 + (end - start + 1) // 3
            a, b = min(start + shift, size - 1), min(end + shift, size - 1)
            if a == start:
                return False
            with open(p, "rb") as f:
                f.seek(a)
                other = f.read(b - a + 1)
            self._send(206, other, headers | {"Content-Range": f"bytes {a}-{b}/{size}"}, head, rng)
            return True
        raise ValueError(f"unknown fault {kind!r}")

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        kind = self.server.draw()
        if kind is None or not self._fault(kind, head=False):
            self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server API
        kind = self.server.draw()
        if kind is None or not self._fault(kind, head=True):
            super().do_HEAD()


def serve_faults(root: str | os.PathLike, **kw):
    """Serve ``root`` on 127.0.0.1 with faults (see :class:`FaultServer`) for the block."""
    return running(FaultServer(Path(root), **kw))
