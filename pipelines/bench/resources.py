"""What a benchmark row used: CPU seconds and RSS of this process and its descendants (Linux
``/proc``; zeros elsewhere), and the machine's load when it ran. Shared by ``bench loader``,
``bench embed`` and ``bench train`` so that every row is reported with the same measures."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        return out
    return out


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _tree() -> list[int]:
    todo, out = [os.getpid()], []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(_children(pid))
    return out


def worker_pids() -> list[int]:
    """Live descendants of this process that can do work (DataLoader workers, fork servers), not
    multiprocessing's idle resource tracker."""
    out = []
    for p in _tree()[1:]:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"resource_tracker" in f.read():
                    continue
        except OSError:
            continue  # gone
        out.append(p)
    return out


def cpu_tree_s() -> float:
    """CPU seconds (user + system) used so far by this process and its live descendants."""
    return sum(_cpu_s(p) for p in _tree())


def rss_tree_mb() -> float:
    """RSS of this process and its descendants, MB."""
    return sum(_rss_kb(p) for p in _tree()) / 1024


def load_avg() -> float:
    """The 1-minute load average (0 where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


class Window:
    """Wall seconds, CPU seconds of the process tree and RSS at start and end of a measured span
    (``with measure() as w: ...``)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0


@contextmanager
def measure() -> Iterator[Window]:
    w = Window()
    w.rss_start_mb = rss_tree_mb()
    t, c = time.perf_counter(), cpu_tree_s()
    try:
        yield w
    finally:
        w.wall_s, w.cpu_s = time.perf_counter() - t, cpu_tree_s() - c
        w.rss_end_mb = rss_tree_mb()
