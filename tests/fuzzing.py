"""The harness that runs the hostile-file corpus of issue 12 (tests/fuzz_corpus.py) with crashes
contained.

Harness: :func:`run_corpus` runs variants in slide workers — the same
:class:`pipelines.runtime.SlideWorker` the batch jobs use: a worker process with a memory limit
(``RLIMIT_DATA``) and a per-variant time limit, restarted when it dies. Each variant is one call
(:func:`run_variant`); a variant whose worker crashes, exceeds its memory or stops answering is
recorded as ``crash``, ``memory`` or ``hang`` and the rest go on in a new worker. Outcomes:
``ok``; ``clean`` (a ``SlideError`` subclass whose message names the file); ``other`` (any other
exception, or a message not naming the file); ``memory``; ``hang``; ``crash``; ``wrong`` (a tile
whose stream header disagrees with the tile geometry returned pixels).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("ok", "clean", "other", "memory", "hang", "crash", "wrong")
MEMORY_LIMIT = 3 << 30  # data segment of one worker (an idle worker with every library loaded: ~0.2 GiB)
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
_KIND = {"Timeout": "hang", "MemoryLimit": "memory"}


def run_corpus(
    variants: list[Variant],
    *,
    workers: int = 2,
    batch: int = 40,
    memory: int = MEMORY_LIMIT,
    time_limit: float = TIME_LIMIT,
) -> list[Result]:
    """Run every variant (see the module docstring); returns one Result per variant, in order.
    ``workers`` slide workers run ``batch`` variants at a time each."""
    from pipelines.runtime import IsolationConfig, SlideWorker, WorkerFailure

    limits = IsolationConfig(memory_gb=memory / 2**30, stall_timeout_s=time_limit, slide_timeout_s=time_limit)
    done: dict[str, Result] = {}

    def run(chunk: list[Variant]) -> None:
        with SlideWorker(limits.memory_gb, preload=("wsi",), echo=False) as w:
            for v in chunk:
                try:
                    done[v.id] = w.call(run_variant, v, what=v.id, url=v.path, limits=limits)
                except WorkerFailure as e:
                    kind = _KIND.get(e.error_class, "crash")
                    done[v.id] = Result(v.id, kind, f"{kind}: {e.error_class} {w.output_tail()}"[:300])

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


def run_variant(v: Variant) -> Result:
    """One variant, in a slide worker: :func:`exercise` and its outcome."""
    import logging
    import warnings

    _probe(v.probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile and zarr warn about the damage we made on purpose
        logging.disable(logging.CRITICAL)
        try:
            outcome, detail = exercise(v.path, v.must_fail), ""
        except MemoryError as e:  # caught here, a MemoryError is still a failure of the variant
            outcome, detail = "memory", repr(e)[:300]
        except Exception as e:  # noqa: BLE001 - classified: a SlideError naming the file is the contract
            from wsi.errors import SlideError

            named = v.path in str(e) or Path(v.path).name in str(e)
            outcome = "clean" if isinstance(e, SlideError) and named else "other"
            detail = f"{type(e).__name__}: {e}"[:300]
        finally:
            logging.disable(logging.NOTSET)
    return Result(v.id, outcome, detail)
