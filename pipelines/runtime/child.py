"""The worker side of :class:`pipelines.runtime.SlideWorker`: ``python -m pipelines.runtime.child FD
MEMORY [MODULE ...]``.

Sets its memory limit (``RLIMIT_DATA``: heap and private mappings, so an allocation past the limit
fails — ``MemoryError`` in Python, an abort in GLib — instead of growing the job), enables
:mod:`faulthandler` (a native crash prints the Python stack first), imports the ``MODULE``s, says
``ready`` and then runs calls from the parent, one at a time, over the connection on file
descriptor ``FD``:

- ``("call", fn, args, kwargs, stream)`` → ``("done", result)``; with ``stream`` true ``fn``
  returns an iterator and each of its items goes back as ``("item", item)`` before ``("done",
  None)``; an exception goes back as ``("error", description)`` (:func:`describe`);
- ``("exit",)`` or the parent closing the connection ends the process.

A watchdog thread ends the process when the parent is gone (a worker stuck in a hang would
otherwise outlive a killed job). Messages are pickled: they only ever travel between this
project's own processes; nothing here reads a user's pickle.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import pickle
import resource
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any


def describe(e: BaseException) -> dict[str, Any]:
    """What the parent needs of an exception: its class name, message, traceback and, when it
    survives a pickle round trip, the exception itself (so the parent can raise the same type)."""
    try:
        blob = pickle.dumps(e)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - any exception that does not round-trip is described instead
        blob = None
    return {
        "cls": type(e).__name__,
        "message": str(e),
        "memory": isinstance(e, MemoryError),
        "traceback": "".join(traceback.format_exception(e))[-4000:],
        "pickled": blob,
    }


def _watch_parent(parent: int) -> None:
    def run() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=run, name="parent-watchdog", daemon=True).start()


def _serve(conn: Connection) -> None:
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        except Exception as e:  # noqa: BLE001 - a call that cannot be unpickled (an import error) is reported
            conn.send(("error", describe(e)))
            continue
        if msg[0] == "exit":
            return
        _, fn, args, kwargs, stream = msg
        try:
            out = fn(*args, **kwargs)
            if stream:
                for item in out:
                    conn.send(("item", item))
                out = None
            conn.send(("done", out))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which decides
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            conn.send(("error", describe(e)))


def main(argv: list[str]) -> None:
    fd, memory, preload = int(argv[0]), int(argv[1]), argv[2:]
    if memory > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        limit = memory if hard == resource.RLIM_INFINITY else min(memory, hard)  # never above the hard limit
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    faulthandler.enable(sys.stderr, all_threads=False)
    _watch_parent(os.getppid())
    conn = Connection(fd)
    for name in preload:
        importlib.import_module(name)
    conn.send(("ready", os.getpid()))
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
