"""Which slides a batch job had in flight when it ended: :class:`InFlight`.

Before a slide's work starts the job writes a marker ``DIR/.inflight/<key>.json`` (the slide id and
URL, the process, the time); when the slide's outcome has been recorded the marker is removed. A
job that crashes, is killed or runs out of memory leaves the marker of the slide it was on, so the
next run knows that slide took the job down (or was on when it was killed) and records it as
failed (error class ``Interrupted``) instead of starting it again and crashing again. Markers are
one small file per slide, written atomically, so ranks of a distributed job never contend for one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

#: error class of a slide that was in flight when its job ended
INTERRUPTED = "Interrupted"


def interrupted_reason(marker: dict[str, Any], retry_hint: str) -> str:
    """The failure reason recorded for a slide left in flight by an earlier run."""
    when = marker.get("started")
    at = time.strftime(" (started %Y-%m-%d %H:%M:%S)", time.localtime(when)) if when else ""
    return (
        f"the job ended while this slide was in flight{at}: it crashed, was killed or ran out of "
        f"memory on it; {retry_hint}"
    )


class InFlight:
    """In-flight markers of one job in ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, job: str):
        self.dir = Path(out_dir) / ".inflight" / job

    def _path(self, slide_id: str) -> Path:
        return self.dir / (hashlib.sha256(slide_id.encode()).hexdigest()[:24] + ".json")

    def stale(self) -> dict[str, dict[str, Any]]:
        """Markers left by earlier runs, by slide id (read them before this run writes any)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.glob("*.json")):
            try:
                m = json.loads(p.read_text())
                out[str(m["slide_id"])] = m
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written by a killed writer cannot happen (atomic); foreign files are ignored
        return out

    def begin(self, slide_id: str, url: str, **extra: Any) -> None:
        """Mark ``slide_id`` as in flight (persisted before its work starts)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "slide_id": slide_id,
            "url": url,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            **extra,
        }
        final = self._path(slide_id)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(doc))  # no fsync: a marker only has to outlive the process
        os.replace(tmp, final)

    def end(self, slide_id: str) -> None:
        """The slide's outcome is recorded: remove its marker."""
        with contextlib.suppress(FileNotFoundError):
            self._path(slide_id).unlink()

    def tidy(self) -> None:
        """Remove what killed writers left (temporary files) and the marker directories when no
        marker is left in them. Call it when no process of the job writes markers any more."""
        if self.dir.is_dir():
            for p in self.dir.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)
        for d in (self.dir, self.dir.parent):
            with contextlib.suppress(OSError):
                d.rmdir()

    @contextlib.contextmanager
    def slide(self, slide_id: str, url: str):
        """``begin`` before the block; ``end`` after it, whatever its outcome (an exception is an
        outcome the caller records). A process that dies inside the block leaves the marker."""
        self.begin(slide_id, url)
        try:
            yield
        finally:
            self.end(slide_id)
