"""Tile sampling inside annotated areas (segmentation): a class-balanced random stream for
training and a thinned grid of annotated tiles for validation.

Both work on a slide's :class:`~wsi.sampling.tiles.LabelMap` (class labels on a coarse grid of the
whole slide, computed once per slide by the loader from the slide's annotations) and produce
:class:`~wsi.sampling.tiles.TileRecord` s at one µm/px, with the same sharding and determinism as
the tissue samplers (:mod:`wsi.sampling.tiles`):

- :class:`LabelSampler`: each candidate picks a slide (uniformly among slides with labels), then a
  class — uniformly over the classes present on that slide when ``class_balance`` is on, else in
  proportion to their area — then a position uniform inside that class's area (a label-map pixel,
  uniform inside it), and the ``tile_size`` box around it, clamped into the slide. The ``k``-th
  record of a shard is a function of ``(seed, epoch, shard, k)``: candidates come in blocks from
  ``np.random.default_rng((seed, epoch, shard, block))``, so a resumed stream regenerates (no
  pixels read) and skips exactly ``k`` records.
- :func:`iter_label_grid`: the row-major grid of tiles (stride = tile footprint) of each slide
  whose label-map window holds any pixel that is not :data:`~wsi.sampling.tiles.IGNORE_LABEL`,
  evenly thinned to at most ``max_tiles`` over all slides (deterministic), tile ``g`` owned by
  shard ``g % num_shards``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from .tiles import IGNORE_LABEL, SlideGeometry, TileRecord, footprint0

log = logging.getLogger(__name__)


def coarse_downsample(dimensions: tuple[int, int], base_mpp: float, tile_size: int, mpp: float) -> float:
    """Level-0 px per label-map px for a slide: an eighth of a tile's footprint, at most 1024 px
    on the slide's long side, never finer than level 0."""
    W, H = dimensions
    return max(footprint0(tile_size, mpp, base_mpp) / 8, max(W, H) / 1024, 1.0)


class _SlideLabels:
    """Per-slide precomputation: the classes present, their pixels and area shares."""

    __slots__ = ("classes", "freq", "geo", "pixels", "width")

    def __init__(self, geo: SlideGeometry, n_classes: int):
        lab = geo.labels.labels
        self.geo = geo
        self.width = lab.shape[1]
        flat = lab.ravel()
        self.classes: list[int] = []
        self.pixels: list[np.ndarray] = []
        for c in range(n_classes):
            px = np.flatnonzero(flat == c)
            if len(px):
                self.classes.append(c)
                self.pixels.append(px)
        counts = np.array([len(p) for p in self.pixels], np.float64)
        self.freq = np.cumsum(counts) / counts.sum() if len(counts) else counts


class LabelSampler:
    """Endless class-balanced stream of tiles inside annotated areas (see the module docstring).

    ``geometry(i)`` returns the :class:`SlideGeometry` (with ``labels``) of slide ``i`` or None; it
    is called once per slide, for every slide, on the first draw."""

    def __init__(
        self,
        slide_ids: Sequence[str],
        geometry: Callable[[int], SlideGeometry | None],
        *,
        n_classes: int,
        mpp: float,
        tile_size: int,
        class_balance: bool = True,
        seed: int = 0,
        block: int = 64,
    ):
        if not slide_ids:
            raise ValueError("LabelSampler needs at least one slide")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.slide_ids = list(slide_ids)
        self._geometry = geometry
        self.n_classes = int(n_classes)
        self.mpp = float(mpp)
        self.tile_size = int(tile_size)
        self.class_balance = bool(class_balance)
        self.seed = int(seed)
        self.block = int(block)
        self._slides: list[_SlideLabels] | None = None

    def _usable(self) -> list[_SlideLabels]:
        if self._slides is None:
            slides = []
            for i in range(len(self.slide_ids)):
                geo = self._geometry(i)
                if geo is None or geo.labels is None:
                    continue
                s = _SlideLabels(geo, self.n_classes)
                if s.classes:
                    slides.append(s)
                else:
                    log.warning("%s: no annotated pixel of classes 0..%d", geo.slide_id, self.n_classes - 1)
            if not slides:
                raise ValueError(
                    f"no annotated pixels of classes 0..{self.n_classes - 1} in any of the "
                    f"{len(self.slide_ids)} slides; check the classes and the class map"
                )
            self._slides = slides
        return self._slides

    def block_records(self, epoch: int, shard: int, b: int) -> list[TileRecord]:
        """The records of candidate block ``b`` (deterministic in seed, epoch, shard, b)."""
        slides = self._usable()
        rng = np.random.default_rng((self.seed, int(epoch), int(shard), int(b)))
        out = []
        for _ in range(self.block):
            s = slides[int(rng.integers(len(slides)))]
            if self.class_balance:
                k = int(rng.integers(len(s.classes)))
            else:
                k = min(int(np.searchsorted(s.freq, rng.random(), side="right")), len(s.classes) - 1)
            px = s.pixels[k]
            j = int(px[int(rng.integers(len(px)))])
            r, c = divmod(j, s.width)
            g = s.geo
            ds = g.labels.downsample
            cx, cy = (c + rng.random()) * ds, (r + rng.random()) * ds
            W, H = g.dimensions
            size = footprint0(self.tile_size, self.mpp, g.base_mpp)
            x = round(float(np.clip(cx - size / 2, 0, max(0.0, W - size))))
            y = round(float(np.clip(cy - size / 2, 0, max(0.0, H - size))))
            out.append(TileRecord(g.slide_id, int(x), int(y), size, self.mpp, self.tile_size))
        return out

    def iter(
        self, epoch: int, shard: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, TileRecord]]:
        """``(k, record)`` for k = start, start+1, ... (< stop when given) of shard ``shard``."""
        b, k = divmod(int(start), self.block)
        k = b * self.block
        while stop is None or k < stop:
            for r in self.block_records(epoch, shard, b):
                if k >= start:
                    if stop is not None and k >= stop:
                        return
                    yield k, r
                k += 1
            b += 1


def label_grid(
    geometries: Sequence[SlideGeometry | None], *, mpp: float, tile_size: int, max_tiles: int
) -> list[TileRecord]:
    """The annotated tiles of the validation grid over all slides (see the module docstring)."""
    records: list[TileRecord] = []
    for geo in geometries:
        if geo is None or geo.labels is None:
            continue
        lab, ds = geo.labels.labels, geo.labels.downsample
        W, H = geo.dimensions
        size = footprint0(tile_size, mpp, geo.base_mpp)
        for y in np.arange(0, max(1.0, H - size + 1), size):
            for x in np.arange(0, max(1.0, W - size + 1), size):
                r0, c0 = int(y // ds), int(x // ds)
                r1, c1 = max(r0 + 1, math.ceil((y + size) / ds)), max(c0 + 1, math.ceil((x + size) / ds))
                if (lab[r0:r1, c0:c1] != IGNORE_LABEL).any():
                    records.append(
                        TileRecord(
                            geo.slide_id, round(float(x)), round(float(y)), size, float(mpp), tile_size
                        )
                    )
    if len(records) > max_tiles:
        keep = np.linspace(0, len(records) - 1, max_tiles).round().astype(int)
        records = [records[k] for k in keep]
    return records


def iter_label_grid(
    geometries: Iterable[SlideGeometry | None],
    *,
    mpp: float,
    tile_size: int,
    max_tiles: int,
    shard: int = 0,
    num_shards: int = 1,
    start: int = 0,
) -> Iterator[tuple[int, TileRecord]]:
    """``(k, record)`` of shard ``shard`` over :func:`label_grid` (tile ``g`` → shard
    ``g % num_shards``), the first ``start`` skipped (resume)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} not in 0..{num_shards - 1}")
    mine = label_grid(list(geometries), mpp=mpp, tile_size=tile_size, max_tiles=max_tiles)[shard::num_shards]
    for k, rec in enumerate(mine):
        if k >= start:
            yield k, rec


__all__ = ["LabelSampler", "coarse_downsample", "iter_label_grid", "label_grid"]
