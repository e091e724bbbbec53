"""pipelines.runtime: slide work in a worker process with a memory limit and time limits. A native
abort (a real one: OpenSlide's GLib allocation failure on a 518-byte file), a segfault, a hang,
runaway memory and a silent exit each become a failure with its error class, raised in the job's
process, and the next call gets a new worker. Ordinary exceptions come back as themselves."""

from __future__ import annotations

import ctypes
import os
import time

import pytest
from hostile import big_tile_tiff, glib_abort_tiff, ifd_loop_tiff, worker_data_bytes

from pipelines.runtime import (
    INTERRUPTED,
    InFlight,
    IsolationConfig,
    SlideWorker,
    WorkerFailure,
    error_class,
    last_words,
    worker_for,
)
from wsi.errors import CorruptSlideError

FAST = IsolationConfig(stall_timeout_s=3.0)


def _read(path: str) -> tuple:
    """Open a slide and read its top-left tile (module level: the worker imports it by name)."""
    import wsi

    with wsi.open_slide(path) as s:
        return s.dimensions, s.read_region((0, 0), 0, (64, 64)).shape


def _count(n: int):
    yield from range(n)


def _fail_after(n: int):
    yield from range(n)
    raise CorruptSlideError("broken after the first items", "x.svs")


@pytest.fixture(scope="module")
def worker():
    with SlideWorker(2.0, preload=("wsi",)) as w:
        yield w


@pytest.mark.parametrize(
    "fn, args, cls",
    [
        (os.abort, (), "Crashed(SIGABRT)"),
        (ctypes.string_at, (0,), "Crashed(SIGSEGV)"),
        (time.sleep, (60,), "Timeout"),
        (bytearray, (1 << 40,), "MemoryLimit"),
        (os._exit, (3,), "Crashed(exit 3)"),
    ],
    ids=["abort", "segfault", "hang", "memory", "exit"],
)
def test_failures_are_classified_and_the_worker_restarts(worker, fn, args, cls):
    worker.call(sum, [0], limits=FAST)  # started
    starts = worker.starts
    t = time.monotonic()
    with pytest.raises(WorkerFailure) as ei:
        worker.call(fn, *args, what="slide s.svs", url="s.svs", limits=FAST)
    assert error_class(ei.value) == cls and ei.value.url == "s.svs" and "s.svs" in str(ei.value)
    assert time.monotonic() - t < 30  # a hang is cut at the stall limit
    assert worker.call(sum, [1, 2, 3], limits=FAST) == 6  # the job goes on with a new worker
    assert worker.starts == starts + 1


def test_exceptions_come_back_as_themselves_and_keep_the_worker(worker, tmp_path):
    p = ifd_loop_tiff(tmp_path / "loop.tif")
    worker.call(sum, [1], limits=FAST)
    starts = worker.starts
    with pytest.raises(CorruptSlideError, match="loops back") as ei:
        worker.call(_read, str(p), limits=FAST)
    assert ei.value.url == str(p) and error_class(ei.value) == "CorruptSlideError"
    assert "Traceback" in ei.value.worker_traceback
    with pytest.raises(ValueError, match="invalid literal"):
        worker.call(int, "x", limits=FAST)
    assert worker.starts == starts


def test_streams(worker):
    assert list(worker.stream(_count, 5, limits=FAST)) == [0, 1, 2, 3, 4]
    with pytest.raises(CorruptSlideError, match="broken"):
        assert list(worker.stream(_fail_after, 3, limits=FAST)) == [0, 1, 2]
    starts = worker.starts
    g = worker.stream(_count, 10_000, limits=FAST)
    assert next(g) == 0
    g.close()  # abandoned mid-stream: the worker, still producing, is ended
    assert not worker.alive
    assert list(worker.stream(_count, 3, limits=FAST)) == [0, 1, 2] and worker.starts == starts + 1


def test_slide_timeout_counts_waiting_time_only(worker):
    limits = IsolationConfig(slide_timeout_s=2.0, stall_timeout_s=60.0)
    t = time.monotonic()
    with pytest.raises(WorkerFailure, match="slide_timeout_s") as ei:
        worker.call(time.sleep, 30, limits=limits)
    assert ei.value.error_class == "Timeout" and time.monotonic() - t < 20
    # a consumer slower than the worker never times it out: 3 x 1 s of consumer time > 2 s limit
    for _ in worker.stream(_count, 3, limits=limits):
        time.sleep(1.0)


def test_a_real_native_abort_is_contained(tmp_path):
    """OpenSlide allocates a declared 16384x16384 tile with g_malloc; under the worker's memory
    limit the allocation fails and GLib aborts the process. That is a Crashed(SIGABRT) of the slide
    with GLib's own message; a tile of the same size in the TIFF backend is a MemoryLimit."""
    crash = glib_abort_tiff(tmp_path / "crash.tif")
    big = big_tile_tiff(tmp_path / "big.tif")
    limit = (worker_data_bytes(("wsi",)) + (384 << 20)) / 2**30  # room for reading, not for 1 GiB
    with SlideWorker(limit, preload=("wsi",)) as w:
        with pytest.raises(WorkerFailure) as ei:
            w.call(_read, str(crash), what=f"slide {crash}", url=str(crash), limits=FAST)
        assert ei.value.error_class == "Crashed(SIGABRT)"
        assert "failed to allocate 1073741824 bytes" in str(ei.value) and str(crash) in str(ei.value)
        assert "isolation.memory_gb" in str(ei.value)
        with pytest.raises(WorkerFailure) as ei:
            w.call(_read, str(big), what=f"slide {big}", url=str(big), limits=FAST)
        assert ei.value.error_class == "MemoryLimit"


def test_a_worker_that_cannot_start_is_a_config_error():
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match="memory_gb"), SlideWorker(0.05, preload=("wsi",)) as w:
        w.call(sum, [1], limits=FAST)


def test_idle_workers_are_reused():
    with worker_for(FAST) as a:
        a.call(sum, [1], limits=FAST)
        pid = a.pid
    with worker_for(FAST) as b:
        assert b is a and b.pid == pid


def test_last_words_quote_native_errors_and_the_innermost_frame():
    out = (
        "(process:1): GLib-ERROR **: gmem.c:106: failed to allocate 1073741824 bytes\n"
        "Fatal Python error: Aborted\n\nThread 0x1 (most recent call first):\n"
        '  File "/x/watchdog.py", line 55 in run\n\n'
        "Current thread 0x2 (most recent call first):\n"
        '  File "/x/lowlevel.py", line 435 in read_region\n  File "/x/slide.py", line 3 in read\n'
    )
    words = last_words(out)
    assert "failed to allocate 1073741824 bytes" in words and "Fatal Python error: Aborted" in words
    assert "lowlevel.py:435 in read_region" in words and "watchdog" not in words


def test_in_flight_markers(tmp_path):
    j = InFlight(tmp_path, "embed")
    assert j.stale() == {}
    j.begin("a", "/s/a.svs")
    with j.slide("b", "/s/b.svs"):
        assert set(InFlight(tmp_path, "embed").stale()) == {"a", "b"}
    with pytest.raises(RuntimeError), j.slide("c", "/s/c.svs"):
        raise RuntimeError("an outcome the caller records")
    left = InFlight(tmp_path, "embed").stale()  # what a rerun sees after a crash on "a"
    assert set(left) == {"a"} and left["a"]["url"] == "/s/a.svs" and left["a"]["pid"] == os.getpid()
    assert set(InFlight(tmp_path, "tissue").stale()) == set()  # one journal per job
    j.end("a")
    j.tidy()
    assert not (tmp_path / ".inflight").exists()
    assert INTERRUPTED == "Interrupted"
