"""Slide work in a worker process: a native abort or segfault, a hang or runaway memory in one slide
becomes a recorded failure of that slide, and the job goes on.

:class:`SlideWorker` runs functions in a child process (:mod:`pipelines.runtime.child`) with a
memory limit (``RLIMIT_DATA``, :attr:`IsolationConfig.memory_gb`) and time limits, and restarts it
when it dies. Two ways to use it:

- ``worker.call(fn, *args, what=..., url=..., limits=cfg)`` runs ``fn`` there and returns its
  result (e.g. a whole tissue-QC slide, a thumbnail, a conversion);
- ``for item in worker.stream(gen, *args, ...)`` runs the generator function ``gen`` there and
  yields its items as they come (e.g. uint8 tile batches for an encoder that stays in this
  process). At most ``prefetch`` items wait in this process; the worker blocks when they are not
  consumed, so memory stays bounded.

Failures are raised in this process:

- an exception in ``fn`` is raised again here, with its type when it can be pickled (a
  ``CorruptSlideError`` stays a ``CorruptSlideError``), else as a :class:`WorkerFailure` carrying
  its class name;
- the worker dying is a :class:`WorkerFailure` with ``error_class`` ``Crashed(SIGABRT)``,
  ``Crashed(SIGSEGV)``, ``Crashed(exit 3)``, ...; the message quotes the worker's last words (a
  GLib allocation failure, the innermost Python frame printed by :mod:`faulthandler`);
- a ``MemoryError`` in the worker (an allocation past its limit) is ``MemoryLimit``;
- no message from the worker for ``stall_timeout_s`` seconds, or more than ``slide_timeout_s``
  seconds spent waiting for it on one call, is ``Timeout`` (the worker is killed).

Time limits count only the time this process spends *waiting for the worker*: an encoder that is
slower than the reading never makes a slide time out. After any failure but an ordinary exception
the worker is killed and the next call starts a new one (imports take a few seconds).

:mod:`pipelines.runtime.pool` hands workers out to jobs; :mod:`pipelines.runtime.failures` has
the config and the error classes.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .failures import IsolationConfig, WorkerFailure, last_words

_REPO = str(Path(__file__).resolve().parents[2])
_TAIL = 32768  # characters of worker output kept for the message of a crash


class _Budget:
    """Waiting time of one call: at most ``total`` seconds in all, ``stall`` without a message."""

    def __init__(self, limits: IsolationConfig):
        self.total = float(limits.slide_timeout_s)
        self.stall = float(limits.stall_timeout_s)
        self.spent = 0.0

    def next_wait(self) -> float:
        return max(0.0, min(self.stall, self.total - self.spent))


class _Tail:
    """The last :data:`_TAIL` characters of a worker's output (faulthandler writes a crash report
    in many small pieces, so characters are kept, not pieces)."""

    def __init__(self) -> None:
        self._parts: deque[str] = deque()
        self._size = 0

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        while self._size > _TAIL and len(self._parts) > 1:
            self._size -= len(self._parts.popleft())

    def text(self) -> str:
        return "".join(self._parts)


class SlideWorker:
    """One worker process (see the module docstring). Not thread-safe: one call at a time."""

    def __init__(
        self,
        memory_gb: float = IsolationConfig.memory_gb,
        *,
        preload: tuple[str, ...] = (),
        prefetch: int = 2,
        echo: bool = True,
        start_timeout_s: float = 300.0,
    ):
        self.memory_bytes = int(memory_gb * (1 << 30))
        self.preload = tuple(preload)
        self.prefetch = max(1, int(prefetch))
        self.echo = echo
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._conn: Any = None
        self._q: queue.Queue | None = None
        self._tail = _Tail()
        self._threads: list[threading.Thread] = []
        self.starts = 0  # processes started so far (restarts included)

    # --- process --------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        parent, child = Pipe(duplex=True)
        env = dict(os.environ)
        # the worker imports what this process imports (this source tree first, then sys.path)
        paths = [_REPO, *(p for p in sys.path if p and os.path.isdir(p))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        cmd = [sys.executable, "-m", "pipelines.runtime.child", str(child.fileno()), str(self.memory_bytes)]
        try:
            proc = subprocess.Popen(
                [*cmd, *self.preload],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal is the job's to handle, not the worker's
            )
        finally:
            child.close()
        self._proc, self._conn, self._q = proc, parent, queue.Queue(maxsize=self.prefetch)
        self._tail = _Tail()
        self.starts += 1
        self._threads = [
            threading.Thread(target=self._read_messages, args=(parent, self._q), daemon=True),
            threading.Thread(target=self._read_output, args=(proc, self._tail), daemon=True),
        ]
        for t in self._threads:
            t.start()
        budget = _Budget(IsolationConfig(stall_timeout_s=self.start_timeout_s))
        try:
            msg = self._next(budget, "starting the slide worker", None)
        except WorkerFailure as e:
            raise ConfigError(
                f"the slide worker could not start with a memory limit of {self.memory_bytes / 2**30:.2f} "
                f"GiB ({e.error_class}: {self.output_tail() or e}); raise isolation.memory_gb"
            ) from None
        if msg[0] != "ready":
            self.kill()
            raise RuntimeError(f"slide worker sent {msg[0]!r} before it was ready")

    @staticmethod
    def _read_messages(conn: Any, q: queue.Queue) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                q.put(("eof",))
                return
            except Exception as e:  # noqa: BLE001 - a result that cannot be unpickled is the call's error
                msg = (
                    "error",
                    {"cls": type(e).__name__, "message": str(e), "memory": False, "pickled": None},
                )
            q.put(msg)

    def _read_output(self, proc: subprocess.Popen, tail: _Tail) -> None:
        fd = proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            text = chunk.decode("utf-8", "replace")
            tail.add(text)
            if self.echo:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(text)
                    sys.stderr.flush()

    def output_tail(self) -> str:
        """The worker's last output (stdout and stderr), for messages."""
        return last_words(self._tail.text())

    def kill(self) -> None:
        """End the worker now (SIGKILL); the next call starts a new one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        self._cleanup(proc)

    def _cleanup(self, proc: subprocess.Popen) -> None:
        """After the process has ended: let the reader threads finish, close the pipes."""
        q = self._q
        for t in self._threads:
            while t.is_alive():  # the message reader may wait for room in the queue
                with contextlib.suppress(queue.Empty):
                    while True:
                        q.get_nowait()
                t.join(0.05)
        self._threads = []
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        """Ask the worker to exit (kill it when it does not within 5 s)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(("exit",))
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        self._cleanup(proc)

    def __enter__(self) -> SlideWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls ----------------------------------------------------------------------------------
    def _next(self, budget: _Budget, what: str, url: str | None) -> tuple:
        wait = budget.next_wait()
        t0 = time.monotonic()
        try:
            msg = self._q.get(timeout=wait) if wait > 0 else self._q.get_nowait()
        except queue.Empty:
            budget.spent += time.monotonic() - t0
            self.kill()
            stalled = wait >= budget.stall - 1e-6
            limit = (
                f"no progress for {budget.stall:g} s (isolation.stall_timeout_s)"
                if stalled
                else f"more than {budget.total:g} s spent on it (isolation.slide_timeout_s)"
            )
            raise WorkerFailure(
                f"{what}: {limit}; the slide was abandoned and its worker killed — a stalled file system or "
                f"server, or a file that makes the reader loop; raise the limit if the slide is merely slow",
                url,
                error_class="Timeout",
            ) from None
        budget.spent += time.monotonic() - t0
        if msg[0] == "eof":
            raise self._died(what, url)
        return msg

    def _died(self, what: str, url: str | None) -> WorkerFailure:
        proc, self._proc = self._proc, None
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        for t in self._threads[1:]:
            t.join(5)  # the output reader: the worker's last words
        words = last_words(self._tail.text())
        self._cleanup(proc)
        if rc < 0:
            try:
                cls = f"Crashed({signal.Signals(-rc).name})"
            except ValueError:
                cls = f"Crashed(signal {-rc})"
        else:
            cls = f"Crashed(exit {rc})"
        memory = ""
        if "allocate" in words or "memory" in words.lower():
            memory = (
                f"; the worker's memory limit is {self.memory_bytes / 2**30:.2f} GiB "
                f"(isolation.memory_gb: raise it if the slide is trusted)"
            )
        return WorkerFailure(
            f"{what}: the worker reading it died ({cls}{': ' + words if words else ''}){memory}",
            url,
            error_class=cls,
        )

    def _raise_error(self, info: dict, what: str, url: str | None) -> None:
        if info.get("memory"):
            self.kill()  # an allocation failed half-way: the worker's state is not to be trusted
            raise WorkerFailure(
                f"{what}: ran out of the worker's memory limit of {self.memory_bytes / 2**30:.2f} GiB "
                f"({info['message'] or 'MemoryError'}); raise isolation.memory_gb if the slide is trusted",
                url,
                error_class="MemoryLimit",
            )
        exc = None
        if info.get("pickled") is not None:
            with contextlib.suppress(Exception):
                exc = pickle.loads(info["pickled"])
        if isinstance(exc, BaseException):
            exc.worker_traceback = info.get("traceback", "")  # type: ignore[attr-defined]
            raise exc
        raise WorkerFailure(f"{what}: {info['cls']}: {info['message']}", url, error_class=info["cls"])

    def _send(self, msg: tuple) -> None:
        if not self.alive:
            if self._proc is not None:
                self._cleanup(self._proc)
                self._proc = None
            self._start()
        self._conn.send(msg)

    def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        what: str = "slide",
        url: str | None = None,
        limits: IsolationConfig | None = None,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)`` in the worker; its result, or its failure raised here (module
        docstring). ``what`` and ``url`` name the slide in messages. ``fn`` must be importable
        (a module-level function) and its arguments and result picklable."""
        budget = _Budget(limits or IsolationConfig())
        self._send(("call", fn, args, kwargs, False))
        msg = self._next(budget, what, url)
        if msg[0] == "error":
            self._raise_error(msg[1], what, url)
        if msg[0] != "done":
            self.kill()
            raise RuntimeError(f"slide worker answered a call with {msg[0]!r}")
        return msg[1]

    def stream(
        self,
        fn: Callable[..., Iterator[Any]],
        *args: Any,
        what: str = "slide",
        url: str | None = None,
        limits: IsolationConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """The items of the generator ``fn(*args, **kwargs)`` run in the worker, as they come
        (module docstring). Leaving the loop early kills the worker (it is still producing)."""
        budget = _Budget(limits or IsolationConfig())
        self._send(("call", fn, args, kwargs, True))
        finished = False
        try:
            while True:
                msg = self._next(budget, what, url)
                if msg[0] == "item":
                    yield msg[1]
                elif msg[0] == "done":
                    finished = True
                    return
                elif msg[0] == "error":
                    finished = True
                    self._raise_error(msg[1], what, url)
                else:
                    raise RuntimeError(f"slide worker sent {msg[0]!r} in a stream")
        finally:
            if not finished:
                self.kill()
