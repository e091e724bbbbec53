"""Slide workers handed out to jobs: ``with worker_for(cfg, preload=...) as w`` gives a worker that
is kept, idle, for the next job of this process (jobs run one after another in a notebook or a
test session; idle workers are ended at exit or by :func:`close_idle_workers`), and
:func:`maybe_isolated`, :func:`run_call`, :func:`run_stream` let a job's code read the same way with
isolation on (in the worker) or off (in this process)."""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .failures import IsolationConfig
from .isolation import SlideWorker

_idle: dict[tuple, SlideWorker] = {}
_idle_lock = threading.Lock()
_at_exit: list[bool] = []  # close_idle_workers is registered with atexit when the first worker idles


@contextlib.contextmanager
def worker_for(limits: IsolationConfig, *, preload: tuple[str, ...] = ()) -> Iterator[SlideWorker]:
    """A :class:`SlideWorker` with ``limits.memory_gb`` and ``preload``: an idle one left by an
    earlier job of this process when there is one, else a new one; kept idle afterwards."""
    key = (float(limits.memory_gb), tuple(preload))
    with _idle_lock:
        w = _idle.pop(key, None)
    if w is None or not w.alive:
        w = SlideWorker(limits.memory_gb, preload=preload)
    try:
        yield w
    finally:
        with _idle_lock:
            if w.alive and key not in _idle:
                _idle[key] = w
                w = None
                if not _at_exit:
                    atexit.register(close_idle_workers)
                    _at_exit.append(True)
        if w is not None:
            w.close()


def close_idle_workers() -> None:
    """End the workers kept idle by :func:`worker_for`."""
    with _idle_lock:
        workers = list(_idle.values())
        _idle.clear()
    for w in workers:
        w.close()


@contextlib.contextmanager
def maybe_isolated(limits: IsolationConfig, *, preload: tuple[str, ...] = ()) -> Iterator[SlideWorker | None]:
    """``worker_for(limits)`` when ``limits.enabled``, else None (run in this process)."""
    if not limits.enabled:
        yield None
        return
    with worker_for(limits, preload=preload) as w:
        yield w


def run_call(
    worker: SlideWorker | None,
    fn: Callable[..., Any],
    *args: Any,
    what: str,
    url: str | None,
    limits: IsolationConfig,
    **kwargs: Any,
) -> Any:
    """``worker.call(...)``, or ``fn(*args, **kwargs)`` here when ``worker`` is None."""
    if worker is None:
        return fn(*args, **kwargs)
    return worker.call(fn, *args, what=what, url=url, limits=limits, **kwargs)


def run_stream(
    worker: SlideWorker | None,
    fn: Callable[..., Iterator[Any]],
    *args: Any,
    what: str,
    url: str | None,
    limits: IsolationConfig,
    **kwargs: Any,
) -> Iterator[Any]:
    """``worker.stream(...)``, or the generator ``fn(*args, **kwargs)`` here when ``worker`` is None."""
    if worker is None:
        return fn(*args, **kwargs)
    return worker.stream(fn, *args, what=what, url=url, limits=limits, **kwargs)
