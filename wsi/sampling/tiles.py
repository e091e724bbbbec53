"""Tile sampling over tissue: which level-0 boxes to read, at which µm/px, in which order.

Everything here is pure numpy (no I/O, no torch): samplers turn slide geometry (level-0 size,
µm/px, tissue mask, label map) into :class:`TileRecord` s. :mod:`wsi.loader` reads them.
:mod:`wsi.sampling.labels` samples inside annotated areas instead (segmentation).

- :func:`grid_coords` / :func:`grid_records`: a row-major grid (stride or overlap) of full tiles
  inside the slide whose tissue fraction is at least ``min_tissue``.
- :class:`RandomSampler`: an endless stream, uniform over tissue, for self-supervised training.
  Multi-magnification: each sample's target µm/px is drawn from ``mpps`` (``mpp_weights``).
- :func:`iter_grid`: the grid of many slides cut into disjoint shards.

Sharding and determinism. A *shard* is one (DDP rank, DataLoader worker) pair:
``shard = rank * num_workers + worker_id`` of ``num_shards = world_size * num_workers``
(:func:`shard_index`). In grid mode the tiles of all slides, in slide order then row-major, get a
running index ``g`` and shard ``g % num_shards`` owns tile ``g``: every tile once, across shards.
In random mode the ``k``-th sample of a shard is a deterministic function of
``(seed, epoch, shard, k)``: candidates are drawn in blocks from ``np.random.default_rng((seed,
epoch, shard, block))`` and rejected against the mask, so resuming at ``k`` regenerates (cheaply,
no pixels are read) and skips exactly ``k`` samples.

Policy for a requested µm/px finer than a slide's finest level (level 0): with ``upsample=False``
that µm/px is *skipped for that slide* (random mode renormalises the remaining weights; grid
mode emits no tiles at that µm/px for that slide; a slide left with no µm/px is skipped and
logged); with ``upsample=True`` level 0 is read and upsampled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..tissue.masks import TissueMask
from .aligned import LevelBox, LevelGrid, aligned_corners, aligned_grid, grid_aligns, level_box

log = logging.getLogger(__name__)

DEFAULT_MPPS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
_MPP_TOL = 1e-3  # relative: 0.2499 µm/px counts as 0.25


@dataclass(frozen=True, slots=True)
class TileRecord:
    """One tile to read: level-0 top-left ``(x, y)``, level-0 footprint side ``size0`` (px), the
    target µm/px and the output side in px (``out_size`` px at ``mpp`` cover ``size0`` level-0 px)."""

    slide_id: str
    x: int
    y: int
    size0: float
    mpp: float
    out_size: int


@dataclass(frozen=True, slots=True)
class SlideGeometry:
    """What a sampler needs to know about one slide."""

    slide_id: str
    dimensions: tuple[int, int]  # level-0 (w, h)
    base_mpp: float  # µm/px of level 0
    mask: TissueMask | None = None  # None: the whole slide counts as tissue
    labels: LabelMap | None = None  # coarse class labels of annotated slides (segmentation)
    #: the pyramid's levels and encoded-tile sizes (aligned sampling); None: unknown, never aligned
    levels: tuple[LevelGrid, ...] | None = None


@dataclass(frozen=True, slots=True)
class LabelMap:
    """Class labels of a whole slide on a coarse grid: ``labels[r, c]`` is the class (0..n-1, or
    :data:`IGNORE_LABEL` where nothing counts) of level-0 area ``[c·d, (c+1)·d) × [r·d, (r+1)·d)``
    with ``d = downsample``."""

    labels: np.ndarray  # (h, w) uint8
    downsample: float


#: label of pixels that count for no class (unannotated area when unannotated pixels are ignored)
IGNORE_LABEL = 255


def footprint0(tile_size: int, mpp: float, base_mpp: float) -> float:
    """Level-0 side (px) of a ``tile_size`` px tile at ``mpp`` on a slide whose level 0 is ``base_mpp``."""
    return tile_size * mpp / base_mpp


def usable_mpps(base_mpp: float, mpps: Sequence[float], upsample: bool) -> list[int]:
    """Indices of ``mpps`` a slide with level-0 ``base_mpp`` can serve under the upsample policy."""
    if upsample:
        return list(range(len(mpps)))
    return [i for i, m in enumerate(mpps) if m >= base_mpp * (1 - _MPP_TOL)]


def shard_index(rank: int, world_size: int, worker_id: int, num_workers: int) -> tuple[int, int]:
    """``(shard, num_shards)`` of DataLoader worker ``worker_id`` (of ``num_workers``, 0 counts as
    1) on DDP rank ``rank`` (of ``world_size``)."""
    nw = max(1, num_workers)
    if not (0 <= rank < world_size and 0 <= worker_id < nw):
        raise ValueError(f"bad shard: rank {rank} of {world_size}, worker {worker_id} of {nw}")
    return rank * nw + worker_id, world_size * nw


# --- grid ------------------------------------------------------------------------------------
def _grid_step(tile_size: int, overlap: int, stride: int | None) -> int:
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    step = stride if stride is not None else tile_size - overlap
    if step <= 0:
        raise ValueError(
            f"grid stride must be positive (tile_size {tile_size}, overlap {overlap}, stride {stride})"
        )
    return step


def grid_coords(
    slide_dims: tuple[int, int],
    mask: TissueMask | None,
    *,
    base_mpp: float,
    mpp: float,
    tile_size: int = 224,
    overlap: int = 0,
    stride: int | None = None,
    min_tissue: float = 0.4,
    levels: Sequence[LevelGrid] | None = None,
) -> np.ndarray:
    """Level-0 top-left corners (N, 2) int64 of a row-major grid of full tiles.

    Tiles are ``tile_size`` px at ``mpp`` (level-0 side ``tile_size * mpp / base_mpp``); the step
    is ``stride`` px at ``mpp`` or ``tile_size - overlap``. Only tiles that lie fully inside the
    slide and whose tissue fraction (``mask.fractions``) is at least ``min_tissue`` are kept; with
    ``mask=None`` every tile is kept.

    With ``levels`` (the slide's :class:`LevelGrid` s) the grid is laid on the encoded-tile grid
    of the level that serves ``mpp`` when the tile size allows (:func:`wsi.sampling.aligned.grid_aligns`:
    the tile's and the step's level footprint each a multiple or a divisor of the encoded tile), so
    every grid tile decodes whole encoded tiles only; otherwise the plain grid is returned.
    """
    step = _grid_step(tile_size, overlap, stride)
    if not (base_mpp > 0 and mpp > 0):
        raise ValueError(f"mpp and base_mpp must be positive, got {mpp}, {base_mpp}")
    W, H = int(slide_dims[0]), int(slide_dims[1])
    size0 = footprint0(tile_size, mpp, base_mpp)
    box = level_box(levels, base_mpp, mpp, tile_size) if levels else None
    if box is not None and grid_aligns(box, step, tile_size):
        xs, ys = aligned_grid(box, step, tile_size)
    else:
        step0 = step * mpp / base_mpp
        # 1e-9 guards against 3.0000000001 tiles becoming 2
        nx = math.floor((W - size0) / step0 + 1e-9) + 1 if size0 <= W else 0
        ny = math.floor((H - size0) / step0 + 1e-9) + 1 if size0 <= H else 0
        xs = np.floor(np.arange(max(nx, 0)) * step0 + 1e-9).astype(np.int64)
        ys = np.floor(np.arange(max(ny, 0)) * step0 + 1e-9).astype(np.int64)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1)
    if mask is not None:
        keep = mask.fractions(coords[:, 0], coords[:, 1], size0, size0) >= min_tissue
        coords = coords[keep]
    return coords


def grid_records(
    slide_id: str,
    slide_dims: tuple[int, int],
    mask: TissueMask | None,
    *,
    base_mpp: float,
    mpp: float,
    tile_size: int = 224,
    overlap: int = 0,
    stride: int | None = None,
    min_tissue: float = 0.4,
    levels: Sequence[LevelGrid] | None = None,
) -> list[TileRecord]:
    """:func:`grid_coords` as :class:`TileRecord` s (row-major, deterministic)."""
    coords = grid_coords(
        slide_dims,
        mask,
        base_mpp=base_mpp,
        mpp=mpp,
        tile_size=tile_size,
        overlap=overlap,
        stride=stride,
        min_tissue=min_tissue,
        levels=levels,
    )
    size0 = footprint0(tile_size, mpp, base_mpp)
    return [TileRecord(slide_id, int(x), int(y), size0, float(mpp), tile_size) for x, y in coords.tolist()]


def iter_grid(
    geometries: Iterable[SlideGeometry | None],
    *,
    mpps: Sequence[float],
    tile_size: int = 224,
    overlap: int = 0,
    stride: int | None = None,
    min_tissue: float = 0.4,
    upsample: bool = False,
    shard: int = 0,
    num_shards: int = 1,
    start: int = 0,
    aligned: bool = False,
) -> Iterator[tuple[int, TileRecord]]:
    """``(k, record)`` for the grid tiles of shard ``shard``: slides in order, then each usable
    µm/px in ``mpps`` order, then row-major; tile ``g`` of that global order belongs to shard
    ``g % num_shards`` and is that shard's ``k``-th tile. The first ``start`` are skipped (resume).
    ``None`` geometries (slides that could not be opened) contribute no tiles. ``aligned``: each
    slide's grid on its encoded-tile grid where the tile size allows (:func:`grid_coords`)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} not in 0..{num_shards - 1}")
    g0 = 0  # global index of the first tile of the current (slide, mpp) grid
    for geo in geometries:
        if geo is None:
            continue
        idx = usable_mpps(geo.base_mpp, mpps, upsample)
        if not idx:
            log.warning(
                "%s: finest level is %.4g µm/px, coarser than every requested mpp %s; skipped "
                "(pass upsample=True to upsample)",
                geo.slide_id,
                geo.base_mpp,
                list(mpps),
            )
        for i in idx:
            coords = grid_coords(
                geo.dimensions,
                geo.mask,
                base_mpp=geo.base_mpp,
                mpp=mpps[i],
                tile_size=tile_size,
                overlap=overlap,
                stride=stride,
                min_tissue=min_tissue,
                levels=geo.levels if aligned else None,
            )
            n = len(coords)
            first = (shard - g0) % num_shards  # first local position owned by this shard
            mine = coords[first::num_shards]
            k0 = (g0 + first - shard) // num_shards  # this shard's index of mine[0]
            g0 += n
            if k0 + len(mine) <= start:
                continue
            size0 = footprint0(tile_size, mpps[i], geo.base_mpp)
            skip = max(0, start - k0)
            for j, (x, y) in enumerate(mine[skip:].tolist(), start=k0 + skip):
                yield j, TileRecord(geo.slide_id, x, y, size0, float(mpps[i]), tile_size)


# --- random ----------------------------------------------------------------------------------
class _SlideDraw:
    """Per-slide precomputation for random draws: tissue pixel indices and usable mpps."""

    __slots__ = ("geo", "tissue", "mask_w", "mpp_idx", "cum_w", "boxes")

    def __init__(self, geo: SlideGeometry, mpps: Sequence[float], weights: np.ndarray, upsample: bool):
        self.geo = geo
        self.mpp_idx = np.asarray(usable_mpps(geo.base_mpp, mpps, upsample), np.int64)
        w = weights[self.mpp_idx] if len(self.mpp_idx) else np.zeros(0)
        self.cum_w = np.cumsum(w) / w.sum() if len(w) and w.sum() > 0 else np.zeros(0)
        if geo.mask is not None:
            self.tissue = np.flatnonzero(geo.mask.mask.ravel())
            self.mask_w = geo.mask.mask.shape[1]
        else:
            self.tissue = None
            self.mask_w = 0
        self.boxes: dict[int, LevelBox] = {}  # mpp index -> how it is read (aligned sampling)

    def box(self, m: int, mpp: float, tile_size: int) -> LevelBox:
        if m not in self.boxes:
            self.boxes[m] = level_box(self.geo.levels, self.geo.base_mpp, mpp, tile_size)
        return self.boxes[m]

    @property
    def usable(self) -> bool:
        return len(self.cum_w) > 0 and (self.tissue is None or len(self.tissue) > 0)


#: candidate blocks a RandomSampler draws per call (vectorised together; the sequence is unchanged)
_GROUP = 4


class RandomSampler:
    """Endless uniform-over-tissue multi-magnification tile stream.

    ``geometry(i)`` returns the :class:`SlideGeometry` of slide ``i`` (or None if it cannot be
    opened); it is called lazily, once per slide, the first time slide ``i`` is drawn — except with
    ``slide_weighting="area"`` (slides weighted by tissue area in µm²), which needs every slide up
    front. ``"uniform"`` draws slides with equal probability.

    Each candidate: slide by weight; µm/px from the slide's usable ``mpps`` (``mpp_weights``,
    renormalised; see the module docstring for the upsample policy); a centre uniform over the
    mask's tissue pixels (uniform inside the pixel); the ``out_size`` box around it, clamped into
    the slide; rejected unless its tissue fraction is at least ``min_tissue``. Candidates of slides
    that are unusable (no geometry, no usable µm/px, empty mask) are dropped.

    ``aligned=True`` places each box on the encoded-tile grid of the level that serves its µm/px
    (:mod:`wsi.sampling.aligned`): the block of encoded tiles nearest the drawn centre, with a
    uniform offset inside it where the box is smaller — one decode per delivered tile (2×2 for a
    2× reduction) instead of about four (nine). Slides whose geometry has no ``levels`` are
    sampled unaligned. The unaligned stream is the same with or without this option's code path:
    aligned mode draws its offsets from two extra numbers per candidate.
    """

    def __init__(
        self,
        slide_ids: Sequence[str],
        geometry: Callable[[int], SlideGeometry | None],
        *,
        mpps: Sequence[float] = DEFAULT_MPPS,
        mpp_weights: Sequence[float] | None = None,
        tile_size: int = 224,
        min_tissue: float = 0.4,
        slide_weighting: str = "uniform",
        upsample: bool = False,
        seed: int = 0,
        block: int = 64,
        aligned: bool = False,
    ):
        if not slide_ids:
            raise ValueError("RandomSampler needs at least one slide")
        if not mpps or any(not (m > 0) for m in mpps):
            raise ValueError(f"mpps must be positive µm/px values, got {mpps!r}")
        w = np.ones(len(mpps)) if mpp_weights is None else np.asarray(mpp_weights, np.float64)
        if w.shape != (len(mpps),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"mpp_weights must be {len(mpps)} non-negative numbers, not all 0; got {mpp_weights!r}"
            )
        if slide_weighting not in ("uniform", "area"):
            raise ValueError(f"slide_weighting must be 'uniform' or 'area', got {slide_weighting!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.slide_ids = list(slide_ids)
        self._geometry = geometry
        self.mpps = tuple(float(m) for m in mpps)
        self.mpp_weights = w
        self.tile_size = int(tile_size)
        self.min_tissue = float(min_tissue)
        self.slide_weighting = slide_weighting
        self.upsample = upsample
        self.seed = int(seed)
        self.block = int(block)
        self.aligned = bool(aligned)
        self._draws: dict[int, _SlideDraw | None] = {}
        self._slide_p: np.ndarray | None = None

    def _draw(self, i: int) -> _SlideDraw | None:
        if i not in self._draws:
            geo = self._geometry(i)
            d = _SlideDraw(geo, self.mpps, self.mpp_weights, self.upsample) if geo is not None else None
            if d is not None and not d.usable:
                log.warning(
                    "%s: no tile can be drawn (finest level %.4g µm/px vs mpps %s, tissue px %s); skipped",
                    geo.slide_id,
                    geo.base_mpp,
                    list(self.mpps),
                    None if d.tissue is None else len(d.tissue),
                )
                d = None
            self._draws[i] = d
        return self._draws[i]

    def slide_probabilities(self) -> np.ndarray:
        if self._slide_p is None:
            n = len(self.slide_ids)
            if self.slide_weighting == "uniform":
                p = np.full(n, 1.0 / n)
            else:
                area = np.zeros(n)
                for i in range(n):
                    d = self._draw(i)
                    if d is None:
                        continue
                    g = d.geo
                    px = (
                        g.mask.tissue_area_level0()
                        if g.mask is not None
                        else g.dimensions[0] * g.dimensions[1]
                    )
                    area[i] = px * g.base_mpp**2
                if area.sum() <= 0:
                    raise ValueError(
                        "no slide has tissue to sample from (all masks empty or slides unreadable)"
                    )
                p = area / area.sum()
            self._slide_p = p
        return self._slide_p

    def _exhausted(self) -> bool:
        """All slides drawn at least once and none usable."""
        return len(self._draws) == len(self.slide_ids) and all(d is None for d in self._draws.values())

    def block_records(self, epoch: int, shard: int, b: int) -> list[TileRecord]:
        """The accepted records of candidate block ``b`` (deterministic in seed, epoch, shard, b)."""
        return self.blocks_records(epoch, shard, [b])[0]

    def blocks_records(self, epoch: int, shard: int, bs: Sequence[int]) -> list[list[TileRecord]]:
        """:meth:`block_records` of several blocks at once: each block's candidates come from its
        own generator, as one at a time, and are placed and tested together (every step is per
        candidate), so the records are the same and the per-call numpy overhead is paid once."""
        p = self.slide_probabilities()
        B = self.block
        draws = []
        for b in bs:
            rng = np.random.default_rng((self.seed, int(epoch), int(shard), int(b)))
            si = rng.choice(len(p), size=B, p=p)
            um = rng.random(B)
            u = rng.random((B, 3))
            ua = rng.random((B, 2)) if self.aligned else None
            draws.append((si, um, u, ua))
        si = np.concatenate([d[0] for d in draws])
        um = np.concatenate([d[1] for d in draws])
        u = np.concatenate([d[2] for d in draws])
        ua = np.concatenate([d[3] for d in draws]) if self.aligned else None
        n = len(si)
        xs = np.zeros(n, np.int64)
        ys = np.zeros(n, np.int64)
        mpp_i = np.full(n, -1, np.int64)
        size0 = np.zeros(n)
        ok = np.zeros(n, bool)
        for s in np.unique(si):
            d = self._draw(int(s))
            if d is None:
                continue
            sel = np.flatnonzero(si == s)
            g = d.geo
            mi = d.mpp_idx[np.minimum(np.searchsorted(d.cum_w, um[sel], side="right"), len(d.cum_w) - 1)]
            sz = self.tile_size * np.asarray(self.mpps)[mi] / g.base_mpp
            W, H = g.dimensions
            if d.tissue is not None:
                pix = d.tissue[np.minimum((u[sel, 0] * len(d.tissue)).astype(np.int64), len(d.tissue) - 1)]
                my, mx = np.divmod(pix, d.mask_w)
                ds = g.mask.downsample
                cx, cy = (mx + u[sel, 1]) * ds, (my + u[sel, 2]) * ds
            else:
                cx, cy = u[sel, 1] * W, u[sel, 2] * H
            x = np.floor(np.clip(cx - sz / 2, 0, np.maximum(W - sz, 0))).astype(np.int64)
            y = np.floor(np.clip(cy - sz / 2, 0, np.maximum(H - sz, 0))).astype(np.int64)
            good = np.ones(len(sel), bool)
            if ua is not None and g.levels:
                for m in np.unique(mi):
                    k = mi == m
                    box = d.box(int(m), self.mpps[m], self.tile_size)
                    x[k], y[k], good[k] = aligned_corners(box, cx[k], cy[k], ua[sel[k], 0], ua[sel[k], 1])
            if g.mask is not None:
                for m in np.unique(mi):
                    k = mi == m
                    good[k] &= g.mask.fractions(x[k], y[k], sz[k][0], sz[k][0]) >= self.min_tissue
            xs[sel], ys[sel], mpp_i[sel], size0[sel], ok[sel] = x, y, mi, sz, good
        sid, mpps, ts = self.slide_ids, self.mpps, self.tile_size
        out = []
        for j in range(len(bs)):
            part = slice(j * B, (j + 1) * B)
            keep = ok[part]
            out.append(
                [
                    TileRecord(sid[s], x, y, z, mpps[m], ts)
                    for s, x, y, z, m in zip(
                        si[part][keep].tolist(),
                        xs[part][keep].tolist(),
                        ys[part][keep].tolist(),
                        size0[part][keep].tolist(),
                        mpp_i[part][keep].tolist(),
                    )
                ]
            )
        return out

    def iter(
        self, epoch: int, shard: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, TileRecord]]:
        """``(k, record)`` for k = start, start+1, ... (< stop when given) of shard ``shard``.

        Raises ``ValueError`` when no slide can produce a tile, and stops with a logged error when
        1000 consecutive candidate blocks yield nothing (``min_tissue`` unreachable)."""
        k = 0
        b = 0
        empty = 0
        ahead: list[list[TileRecord]] = []
        while stop is None or k < stop:
            if not ahead:  # blocks are drawn GROUP at a time; the sequence is the same as one by one
                ahead = self.blocks_records(epoch, shard, range(b, b + _GROUP))[::-1]
            recs = ahead.pop()
            b += 1
            if not recs:
                if self._exhausted():
                    raise ValueError(f"none of the {len(self.slide_ids)} slides can produce a tile")
                empty += 1
                if empty >= 1000:
                    log.error(
                        "no candidate tile passed min_tissue=%s in %d blocks; stopping the stream",
                        self.min_tissue,
                        empty,
                    )
                    return
                continue
            empty = 0
            if k + len(recs) <= start:
                k += len(recs)
                continue
            for r in recs:
                if k >= start:
                    if stop is not None and k >= stop:
                        return
                    yield k, r
                k += 1

    def records(self, epoch: int, shard: int, n: int, start: int = 0) -> list[TileRecord]:
        """The first ``n`` records from ``start`` (convenience for tests and plots)."""
        return [r for _, r in self.iter(epoch, shard, start=start, stop=start + n)]
