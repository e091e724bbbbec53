"""The reading side of ``slidestream segment predict``: which windows a slide is predicted in and
their pixels, as uint8 batches. It runs in the job's slide worker (:mod:`pipelines.runtime`), so a
native crash, a hang or runaway memory while reading a slide fails that slide, not the job; the
model stays in the job's process (:mod:`pipelines.segment.predict`).

Windows of ``tile`` px at ``mpp`` step by ``tile - overlap`` over the slide, row by row; windows
without tissue are skipped (their pixels are background).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class WindowGrid:
    """Window starts in output pixels at ``mpp`` (``xs``, ``ys``), the output size ``(W, H)`` and
    ``scale`` (level-0 px per output px)."""

    xs: list[int]
    ys: list[int]
    width: int
    height: int
    scale: float

    @property
    def n_windows(self) -> int:
        return len(self.xs) * len(self.ys)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    n = max(1, math.ceil(max(0, length - tile) / stride) + 1)
    return [i * stride for i in range(n)]


def window_grid(
    dimensions: tuple[int, int], base_mpp: float, *, mpp: float, tile: int, overlap: int
) -> WindowGrid:
    """The windows covering a slide of level-0 ``dimensions`` at ``base_mpp`` µm/px."""
    W0, H0 = dimensions
    scale = mpp / base_mpp
    W, H = max(1, math.ceil(W0 / scale)), max(1, math.ceil(H0 / scale))
    stride = tile - overlap
    return WindowGrid(_starts(W, tile, stride), _starts(H, tile, stride), W, H, scale)


@dataclass
class WindowBatch:
    """Windows of one row read together: columns ``cols`` of row ``row``, ``images`` (B, tile,
    tile, 3) uint8; ``skipped``: windows of the row left out for lack of tissue (counted once);
    ``cache_hits``/``cache_misses``: the slide's decoded-tile cache counts since the first batch."""

    row: int
    cols: list[int]
    images: np.ndarray
    skipped: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


#: the decoded-tile cache a slide gets for sliding windows when it has none (bytes)
WINDOW_CACHE_BYTES = 64 << 20


def window_batches(
    slide: Any,
    grid: WindowGrid,
    *,
    mpp: float,
    tile: int,
    tissue: Any = None,
    batch_size: int = 8,
    read_threads: int = 2,
) -> Iterator[WindowBatch]:
    """The windows of ``grid`` with tissue, row by row, ``batch_size`` at a time: each batch is one
    :meth:`wsi.Slide.read_regions_mpp` call (tiles decoded in ``read_threads`` threads).
    Overlapping windows share encoded tiles, so a slide without a decoded-tile cache gets one
    (:data:`WINDOW_CACHE_BYTES`) and each encoded tile is decoded about once instead of once per
    window touching it; each batch carries the cache's counts so far."""
    from wsi.decode import TileCache

    if slide.tile_cache is None:
        slide.tile_cache = TileCache(WINDOW_CACHE_BYTES)
    cache = slide.tile_cache
    hits0, misses0 = cache.hits, cache.misses

    def counts() -> dict[str, int]:
        return {"cache_hits": cache.hits - hits0, "cache_misses": cache.misses - misses0}

    s = grid.scale
    for r, y in enumerate(grid.ys):
        todo = [
            c
            for c, x in enumerate(grid.xs)
            if tissue is None or tissue.fraction(x * s, y * s, tile * s, tile * s) > 0
        ]
        skipped = len(grid.xs) - len(todo)
        if not todo:
            yield WindowBatch(r, [], np.zeros((0, tile, tile, 3), np.uint8), skipped, **counts())
        for k in range(0, len(todo), batch_size):
            part = todo[k : k + batch_size]
            locs = [(round(grid.xs[c] * s), round(y * s)) for c in part]
            imgs = slide.read_regions_mpp(locs, (tile, tile), mpp, threads=read_threads)
            yield WindowBatch(r, part, np.stack(imgs), skipped if k == 0 else 0, **counts())


def read_windows(
    url: str,
    *,
    slide_mpp: float | None,
    tissue_method: str,
    mpp: float,
    tile: int,
    overlap: int,
    batch_size: int,
    read_threads: int = 2,
) -> Iterator[Any]:
    """Open ``url``, compute its tissue mask (``tissue_method``; ``"none"``: every window) and
    yield ``{"dimensions", "mpp"}`` of the slide, then its :class:`WindowBatch` es."""
    from wsi.slide import open_slide

    with open_slide(url, mpp=slide_mpp) as slide:
        tmask = None
        if tissue_method != "none":
            from wsi.tissue import tissue_mask

            tmask = tissue_mask(slide, method=tissue_method)
        base = slide.require_mpp()
        yield {"dimensions": tuple(int(v) for v in slide.dimensions), "mpp": float(base)}
        grid = window_grid(slide.dimensions, base, mpp=mpp, tile=tile, overlap=overlap)
        yield from window_batches(
            slide, grid, mpp=mpp, tile=tile, tissue=tmask, batch_size=batch_size, read_threads=read_threads
        )


def read_thumbnail(url: str, size: tuple[int, int], slide_mpp: float | None = None) -> np.ndarray:
    """The slide's thumbnail fitting ``size`` (w, h)."""
    from wsi.slide import open_slide

    with open_slide(url, mpp=slide_mpp) as slide:
        return slide.get_thumbnail(size)
