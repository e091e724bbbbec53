"""The harness that runs the hostile-file corpus of issue 12 (tests/fuzz_corpus.py) with crashes
contained.

Harness: :func:`run_corpus` runs variants in worker subprocesses (this file run as a script) with an
address-space limit (``RLIMIT_AS``) and a per-variant time limit. A worker reports one JSON line per
variant; when a worker crashes, exceeds its memory or stops reporting, the variant it was on is run
again alone (its outcome is then ``crash``, ``memory`` or ``hang``) and the rest go on in a new
worker. Outcomes: ``ok``; ``clean`` (a ``SlideError`` subclass whose message names the file);
``other`` (any other exception, or a message not naming the file); ``memory``; ``hang``; ``crash``;
``wrong`` (a tile whose stream header disagrees with the tile geometry returned pixels).
"""

from __future__ import annotations

import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

OUTCOMES = ("ok", "clean", "other", "memory", "hang", "crash", "wrong")
MEMORY_LIMIT = 3 << 30  # address space of one worker (an idle worker with every library loaded: ~0.5 GiB)
TIME_LIMIT = 30.0  # seconds one variant may take


@dataclass
class Variant:
    id: str
    path: str  # the file or store the worker opens
    must_fail: list | None = None  # [level, x, y, w, h]: a region whose tile stream lies about its size
    probe: str | None = None  # harness self-test only: "abort", "hang", "alloc" or "exit" instead of reading


@dataclass
class Result:
    id: str
    outcome: str
    detail: str = ""


# ================================================================================================
# running
# ================================================================================================
def _worker_cmd() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker"]


def _env() -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    # fewer malloc arenas: each thread's arena reserves 64 MiB of address space
    return {**os.environ, "PYTHONPATH": path, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}


def _run_batch(variants: list[Variant], memory: int, time_limit: float) -> tuple[list[Result], str | None]:
    """Run ``variants`` in one worker. Returns the results it reported and, when it died or stalled
    before finishing, what happened ("crash: ...", "hang", "memory") — the next unreported variant
    is the culprit."""
    proc = subprocess.Popen(
        [*_worker_cmd(), str(memory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        text=True,
    )
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    err_lines: list[str] = []
    et = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    et.start()
    proc.stdin.write("".join(json.dumps(asdict(v)) + "\n" for v in variants))
    proc.stdin.close()
    results: list[Result] = []
    failure = None
    ready = False  # the worker says so once its imports are done (slow on a loaded machine)
    while len(results) < len(variants):
        try:
            line = lines.get(timeout=time_limit if ready else 60.0)
        except queue.Empty:
            failure = "hang"
            proc.kill()
            break
        if line is None:
            break
        if line.startswith('{"ready"'):
            ready = True
        elif line.startswith("{"):
            results.append(Result(**json.loads(line)))
    rc = proc.wait()
    t.join(5)
    et.join(5)
    proc.stdout.close()
    proc.stderr.close()
    if failure is None and len(results) < len(variants):
        tail = "".join(err_lines[-5:]).strip().replace("\n", " | ")[-300:]
        if rc < 0:
            failure = f"crash: {signal.Signals(-rc).name} {tail}"
        elif "MemoryError" in tail:
            failure = f"memory: {tail}"
        else:
            failure = f"crash: exit {rc} {tail}"
    return results, failure


def run_corpus(
    variants: list[Variant],
    *,
    workers: int = 2,
    batch: int = 40,
    memory: int = MEMORY_LIMIT,
    time_limit: float = TIME_LIMIT,
) -> list[Result]:
    """Run every variant (see the module docstring); returns one Result per variant, in order."""
    done: dict[str, Result] = {}

    def run(chunk: list[Variant]) -> None:
        todo = list(chunk)
        while todo:
            got, failure = _run_batch(todo, memory, time_limit)
            for r in got:
                done[r.id] = r
            todo = todo[len(got) :]
            if failure is None or not todo:
                continue
            culprit, todo = todo[0], todo[1:]
            if len(chunk) > 1:  # confirm alone: the batch may have died of something else
                alone, failure2 = _run_batch([culprit], memory, time_limit)
                if alone:
                    done[culprit.id] = alone[0]
                    continue
                failure = failure2 or failure
            kind = failure.split(":")[0]
            done[culprit.id] = Result(culprit.id, kind if kind in OUTCOMES else "crash", failure)

    chunks = [variants[i : i + batch] for i in range(0, len(variants), batch)]
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(run, chunks))
    return [done.get(v.id, Result(v.id, "crash", "no result")) for v in variants]


def table(results: list[Result]) -> str:
    c = Counter(r.outcome for r in results)
    head = ["tried", "ok", "clean error", "other", "memory", "hang", "crash", "wrong pixels"]
    row = [len(results), c["ok"], c["clean"], c["other"], c["memory"], c["hang"], c["crash"], c["wrong"]]
    return " | ".join(head) + "\n" + " | ".join(str(v) for v in row)


# ================================================================================================
# worker
# ================================================================================================
def exercise(path: str, must_fail: list | None) -> str:
    """Open ``path`` and read it every way a job does; returns "ok" or "wrong" (raises on error)."""
    import numpy as np

    import wsi

    with wsi.open_slide(path) as s:
        if must_fail is not None:
            level, x, y, w, h = must_fail
            if level < s.level_count:
                try:
                    s.read_region((x, y), level, (w, h))
                except wsi.SlideError:
                    pass
                else:
                    return "wrong"
        for level in range(min(s.level_count, 4)):
            lw, lh = s.level_dimensions[level]
            ds = s.level_downsamples[level]
            s.read_region((0, 0), level, (min(lw, 300), min(lh, 300)))
            s.read_region((int(lw // 2 * ds), int(lh // 2 * ds)), level, (min(lw, 200), min(lh, 150)))
            tw, th = (s.level_tile_sizes or [(128, 128)] * s.level_count)[level]
            tw, th = max(1, min(tw, lw, 512)), max(1, min(th, lh, 512))
            locs = [(int(x * ds), int(y * ds)) for x, y in ((0, 0), (tw, 0), (0, th), (tw, th))]
            s.read_regions(locs, level, (tw, th), threads=2)
        if s.mpp is not None:
            s.read_region_mpp((0, 0), (64, 64), s.mpp * 2)
        s.get_thumbnail((128, 128))
        sizes = s.associated_image_sizes
        for name in s.associated_images:
            img = s.associated_images[name]
            assert isinstance(img, np.ndarray)
            if name in sizes and sizes[name] != (img.shape[1], img.shape[0]):
                raise AssertionError(f"associated image {name}: metadata {sizes[name]} != {img.shape}")
    return "ok"


def _probe(kind: str | None) -> None:
    """What the harness must contain, done on purpose (tests of the harness itself)."""
    if kind == "abort":
        os.abort()
    elif kind == "hang":
        time.sleep(3600)
    elif kind == "alloc":
        bytearray(1 << 40)  # far beyond RLIMIT_AS: MemoryError
    elif kind == "exit":
        os._exit(3)


def _worker(memory: int) -> None:
    import logging
    import warnings

    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    warnings.simplefilter("ignore")  # tifffile and zarr warn about the damage we made on purpose
    logging.disable(logging.CRITICAL)
    import wsi  # noqa: F401 - imported before the first variant is timed

    print(json.dumps({"ready": True}), flush=True)

    for line in sys.stdin:
        v = Variant(**json.loads(line))
        _probe(v.probe)
        try:
            outcome, detail = exercise(v.path, v.must_fail), ""
        except MemoryError as e:  # caught here, a MemoryError is still a failure of the variant
            outcome, detail = "memory", repr(e)[:300]
        except Exception as e:  # noqa: BLE001 - classified: a SlideError naming the file is the contract
            from wsi.errors import SlideError

            named = v.path in str(e) or Path(v.path).name in str(e)
            outcome = "clean" if isinstance(e, SlideError) and named else "other"
            detail = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(asdict(Result(v.id, outcome, detail))), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]))
