"""Tile-aligned placement: boxes on the encoded-tile grid of the level that serves their µm/px.

A 224-px tile at an arbitrary position of a level stored in 256-px JPEG tiles touches about four
encoded tiles (3.5 on average), and a 0.5 µm/px tile read from a 0.25 µm/px level touches about
nine. Placed on the grid, the same tile costs one decode (a 2×2 block for a 2× reduction), and the
freedom left inside the block — a random offset where the box is smaller than the block — keeps the
position random at sub-tile scale. For self-supervised streams, where a random crop inside a tile
is itself an augmentation, nothing is lost.

Pure numpy. The level a µm/px is read from and its box size follow exactly the rules of
:meth:`wsi.slide.Slide.region_for_mpp` (coarsest level at or below the requested µm/px; box side
``round(size × scale)``), and a level corner ``lx`` becomes the level-0 ``x`` with
``floor(x / downsample) == lx``, so the reader lands exactly on the grid also on levels whose
downsample is not an integer. Corners of reductions by 2, 4 or 8 are multiples of that factor, so
a scaled decode (:mod:`wsi.decode`) reads them at the output size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decode import SCALES

_LEVEL_TOL = 1e-6  # Slide.get_best_level_for_downsample's tolerance


@dataclass(frozen=True, slots=True)
class LevelGrid:
    """One pyramid level as the aligned samplers see it: its downsample from level 0, its size and
    its encoded-tile size (px of that level)."""

    downsample: float
    width: int
    height: int
    tile_w: int
    tile_h: int


def level_grids(slide: Any) -> tuple[LevelGrid, ...] | None:
    """The :class:`LevelGrid` s of an open slide (anything with ``level_downsamples``,
    ``level_dimensions`` and ``level_tile_sizes``), or None when it does not report tile sizes."""
    sizes = getattr(slide, "level_tile_sizes", None)
    if not sizes:
        return None
    return tuple(
        LevelGrid(float(ds), int(w), int(h), int(tw), int(th))
        for ds, (w, h), (tw, th) in zip(slide.level_downsamples, slide.level_dimensions, sizes)
    )


@dataclass(frozen=True, slots=True)
class LevelBox:
    """How a ``tile_size`` tile at one µm/px is read: the level, its box side (level px) and the
    exact reduction factor (2, 4, 8; 1 when the box is not an exact 2/4/8 multiple)."""

    level: int
    grid: LevelGrid
    side: int
    factor: int


def level_box(levels: Sequence[LevelGrid], base_mpp: float, mpp: float, tile_size: int) -> LevelBox:
    """The level and box side :meth:`wsi.slide.Slide.region_for_mpp` uses for this request."""
    want = mpp / base_mpp
    level = 0
    for i, g in enumerate(levels):
        if g.downsample <= want * (1 + _LEVEL_TOL):
            level = i
    g = levels[level]
    side = max(1, round(tile_size * (mpp / (base_mpp * g.downsample))))
    f = side // tile_size
    factor = f if f in SCALES and side == f * tile_size else 1
    return LevelBox(level, g, side, factor)


def to_level0(lx: np.ndarray, downsample: float) -> np.ndarray:
    """Level-0 coordinates ``x`` (int64) with ``floor(x / downsample) == lx`` (the smallest such)."""
    lx = np.asarray(lx, np.int64)
    x = np.ceil(lx * downsample - 1e-6).astype(np.int64)
    for _ in range(2):  # float rounding can land one off either way
        q = np.floor(x / downsample).astype(np.int64)
        x = np.where(q < lx, x + 1, np.where(q > lx, x - 1, x))
    return x


def aligned_corners(
    box: LevelBox, cx: np.ndarray, cy: np.ndarray, ux: np.ndarray, uy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level-0 corners ``(x, y, ok)`` of boxes placed on the encoded-tile grid near level-0 centres
    ``(cx, cy)``: the block of ``ceil(side / tile)`` tiles whose start is nearest the unaligned
    corner, clamped into the level, and an offset inside the block (uniform, from ``ux``/``uy`` in
    [0, 1), a multiple of the reduction factor) where the box is smaller than the block. ``ok`` is
    False where the level is smaller than the box."""
    g, side, f = box.grid, box.side, box.factor
    ds = g.downsample
    out = []
    ok = np.ones(len(cx), bool)
    for c, u, tile, size in ((cx, ux, g.tile_w, g.width), (cy, uy, g.tile_h, g.height)):
        n = -(-side // tile)
        last = (size - side) // tile  # last block start (in tiles) whose box fits in the level
        if last < 0:
            ok[:] = False
            out.append(np.zeros(len(c), np.int64))
            continue
        start = np.clip(np.rint((np.asarray(c) / ds - side / 2) / tile), 0, last).astype(np.int64)
        slack = np.minimum(n * tile - side, size - side - start * tile)
        off = np.floor(np.asarray(u) * (slack // f + 1)).astype(np.int64) * f
        out.append(to_level0(start * tile + np.minimum(off, slack - slack % f), ds))
    return out[0], out[1], ok


def grid_aligns(box: LevelBox, step: int, tile_size: int) -> bool:
    """Whether a grid of ``tile_size`` tiles with ``step`` (output px) can sit on the encoded-tile
    grid: the box side and the step, in level px, are each a multiple or a divisor of the tile."""
    g = box.grid
    step_l = step * box.side / tile_size
    if step_l != int(step_l):
        return False
    step_l = int(step_l)

    def fits(v: int, t: int) -> bool:
        return v % t == 0 or t % v == 0

    return all(fits(v, t) for v in (box.side, step_l) for t in (g.tile_w, g.tile_h))


def aligned_grid(box: LevelBox, step: int, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 corners (xs, ys) of a grid laid in level px from the level's origin (so on the
    encoded-tile grid when :func:`grid_aligns`), boxes fully inside the level."""
    g = box.grid
    step_l = int(round(step * box.side / tile_size))
    nx = (g.width - box.side) // step_l + 1 if box.side <= g.width else 0
    ny = (g.height - box.side) // step_l + 1 if box.side <= g.height else 0
    xs = to_level0(np.arange(max(nx, 0), dtype=np.int64) * step_l, g.downsample)
    ys = to_level0(np.arange(max(ny, 0), dtype=np.int64) * step_l, g.downsample)
    return xs, ys


def decoded_per_delivered(box: LevelBox, tile_size: int, scaled: bool) -> float:
    """Decoded pixels per delivered pixel of one aligned read (whole encoded tiles decoded, at
    1/factor with ``scaled``)."""
    g = box.grid
    n = math.ceil(box.side / g.tile_w) * math.ceil(box.side / g.tile_h)
    s = box.factor if scaled else 1
    return n * (g.tile_w // s) * (g.tile_h // s) / tile_size**2
