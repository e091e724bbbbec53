"""``open_slide`` and the :class:`Slide` interface.

``Slide`` keeps OpenSlide's names (``dimensions``, ``level_count``, ``level_dimensions``,
``level_downsamples``, ``properties``, ``associated_images``, ``get_thumbnail``,
``get_best_level_for_downsample``, ``read_region``) so users already know them. Differences from
OpenSlide, on purpose:

- ``read_region`` returns an RGB ``uint8`` numpy array of shape (H, W, 3); areas outside the slide
  or without data are white (OpenSlide returns transparent RGBA).
- ``get_thumbnail`` and ``associated_images`` values are RGB numpy arrays too.

Additions: ``mpp`` (µm/px at level 0), ``level_mpp(level)``, ``read_region_mpp`` (reads at a target
µm/px from the best level and resizes with antialiasing), ``read_regions`` (many regions at once,
fetched and decoded concurrently), ``read_regions_mpp`` (the batched µm/px read every job's tiles
go through; ``scaled=True`` decodes 2×/4×/8× reductions in the JPEG DCT domain), ``decode_stats``
and ``tile_cache`` (decode counters and an optional decoded-tile cache, :mod:`wsi.decode`),
``vendor``, ``backend``, ``url``, ``close()``.

Coordinates are level-0 pixels (x, y of the top-left corner) everywhere.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .backends.base import DEFAULT_DECODE_LIMIT, Backend, RawTiles
from .backends.detect import candidates
from .byteio import RetryPolicy
from .decode import SCALES, DecodeStats, TileCache
from .errors import (
    DecodeLimitError,
    RegionOutOfBoundsError,
    SlideError,
    UnsupportedSlideError,
    missing_mpp,
)

#: backend name -> "module:Class"; imported lazily so a missing optional library only matters
#: when that backend is used.
BACKENDS: dict[str, str] = {
    "tiff": "wsi.backends.tiff:TiffBackend",
    "zarr": "wsi.backends.zarr_backend:ZarrBackend",
    "openslide": "wsi.backends.openslide_backend:OpenSlideBackend",
}

MAX_REGION_PIXELS = 1 << 28  # one read_region call may not ask for more than 256 Mpx
MAX_THUMBNAIL_SOURCE_PIXELS = 1 << 36  # a thumbnail reads at most this much of its source level
MAX_MPP = 1e6  # µm/px: larger metadata values are nonsense (1 m per pixel) and ignored


def _backend_class(name: str) -> type[Backend]:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def open_slide(
    path_or_url: str | os.PathLike,
    *,
    storage_options: dict | None = None,
    mpp: float | None = None,
    backend: str = "auto",
    decode_limit: int = DEFAULT_DECODE_LIMIT,
    retry: RetryPolicy | None = None,
) -> Slide:
    """Open a whole-slide image from a local path or any fsspec URL.

    ``backend='auto'`` picks the fastest backend that can read the file: Zarr stores go to the
    Zarr backend, TIFF-family files to the TIFF byte-range backend, everything else (MRXS, VMS,
    NDPI, DICOM, ...) to OpenSlide; if the first choice refuses the file *as unsupported* the next
    one is tried (a file refused as damaged or oversized is never handed on). ``mpp`` overrides the
    slide's µm/px metadata. ``decode_limit`` bounds the bytes one declared tile, chunk or associated
    image may decode to. ``retry`` sets how remote reads retry and time out (default
    :data:`wsi.byteio.DEFAULT_RETRY`).

    A local path is taken literally (``#``, ``?`` and ``::`` are file-name characters); a URL is
    anything with ``://``. Errors are :class:`~wsi.errors.SlideError` subclasses naming the file
    (``RemoteIOError`` when the network kept failing), or ``FileNotFoundError``.
    """
    url = os.fspath(path_or_url)
    if backend == "auto":
        names = candidates(url, storage_options, retry)
        if not names:
            raise UnsupportedSlideError(
                f"{url}: this format can only be read by OpenSlide, which needs a local file; "
                f"download it first or convert it with `slidestream convert`",
                url,
            )
    else:
        _backend_class(backend)  # validates the name
        names = [backend]
    errors: list[str] = []
    for i, name in enumerate(names):
        try:
            impl = _backend_class(name)(
                url, storage_options=storage_options, decode_limit=decode_limit, retry=retry
            )
        except UnsupportedSlideError as e:
            errors.append(f"{name}: {e}")
            if i + 1 < len(names):
                continue
            if len(errors) == 1:
                raise
            raise UnsupportedSlideError(
                f"no backend can open {url} ({'; '.join(errors)}); convert it to OME-Zarr or "
                f"OME-TIFF with QuPath/bfconvert, or check that the file is complete",
                url,
            ) from e
        return Slide(impl, mpp=mpp)
    raise AssertionError("unreachable")  # pragma: no cover


class _AssociatedImages(Mapping):
    def __init__(self, backend: Backend):
        self._backend = backend
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in self._backend.associated_image_names:
                raise KeyError(name)
            self._cache[name] = self._backend.read_associated(name)
        return self._cache[name]

    def __iter__(self):
        return iter(self._backend.associated_image_names)

    def __len__(self) -> int:
        return len(self._backend.associated_image_names)


class Slide:
    """A whole-slide image pyramid. Create with :func:`open_slide`."""

    def __init__(self, backend: Backend, *, mpp: float | None = None):
        self._b = backend
        if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
            raise ValueError(f"mpp must be a positive number of µm/px, got {mpp!r}")
        meta = backend.mpp
        # metadata claiming a non-finite or absurd µm/px (over a metre per pixel) counts as absent
        if meta is not None and not (math.isfinite(meta) and 0 < meta <= MAX_MPP):
            meta = None
        self._mpp = float(mpp) if mpp is not None else meta
        self._closed = False

    # --- context manager ------------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._b.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.url!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )

    # --- OpenSlide names ------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self._b.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._b.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._b.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._b.level_downsamples)

    @property
    def properties(self) -> Mapping[str, str]:
        return self._b.properties

    @property
    def associated_images(self) -> Mapping[str, np.ndarray]:
        """Name → RGB array, decoded on first access (bounded by the decode limit)."""
        return _AssociatedImages(self._b)

    @property
    def associated_image_sizes(self) -> dict[str, tuple[int, int]]:
        """Name → (width, height) of each associated image, from metadata: nothing is decoded.
        (Addition: OpenSlide's ``openslide_get_associated_image_dimensions``.)"""
        sizes = self._b.associated_image_sizes
        return {n: tuple(sizes[n]) for n in self._b.associated_image_names if n in sizes}

    @property
    def raw_tiles(self) -> RawTiles | None:
        """The backend's raw encoded tiles when it has that optional capability
        (:class:`wsi.backends.base.RawTiles`), else None."""
        return self._b if isinstance(self._b, RawTiles) else None

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample not above ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    # --- additions ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._b.url

    @property
    def backend(self) -> str:
        return self._b.name

    @property
    def vendor(self) -> str | None:
        return self._b.vendor

    @property
    def mpp(self) -> float | None:
        """µm/px at level 0 (metadata, or the ``mpp=`` given to :func:`open_slide`)."""
        return self._mpp

    @property
    def level_tile_sizes(self) -> list[tuple[int, int]] | None:
        return self._b.level_tile_sizes

    @property
    def decode_stats(self) -> DecodeStats | None:
        """Tiles and pixels this slide's reader decoded, and its tile-cache hits/misses (None for a
        backend that does not count: OpenSlide, Zarr). Assign a :class:`wsi.decode.DecodeStats` to
        count several slides into one."""
        return self._b.stats if self._b.counts_decodes else None

    @decode_stats.setter
    def decode_stats(self, stats: DecodeStats) -> None:
        self._b.stats = stats

    @property
    def tile_cache(self) -> TileCache | None:
        """The decoded-tile cache reads go through (None: none). Assign a
        :class:`wsi.decode.TileCache` (it may be shared by several slides); backends that do not
        decode tiles themselves (OpenSlide, Zarr) ignore it."""
        return self._b.tile_cache

    @tile_cache.setter
    def tile_cache(self, cache: TileCache | None) -> None:
        self._b.tile_cache = cache

    def require_mpp(self) -> float:
        if self._mpp is None:
            raise missing_mpp(self.url)
        return self._mpp

    def level_mpp(self, level: int) -> float:
        self._check_level(level)
        return self.require_mpp() * self.level_downsamples[level]

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose µm/px is at or below ``mpp`` (so we only ever downsample).

        Falls back to level 0 when the request is finer than level 0.
        """
        base = self.require_mpp()
        return self.get_best_level_for_downsample(mpp / base)

    # --- pixels ---------------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.level_count:
            raise RegionOutOfBoundsError(
                f"{self.url}: level {level!r} does not exist; the slide has levels 0..{self.level_count - 1}",
                self.url,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"{self.url}: slide is closed", self.url)

    def _level_box(self, location: Sequence[float], level: int, size: Sequence[int]) -> tuple[int, ...]:
        self._check_open()
        self._check_level(level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise RegionOutOfBoundsError(
                f"{self.url}: region size must be positive, got {tuple(size)}", self.url
            )
        if w * h > MAX_REGION_PIXELS:
            raise RegionOutOfBoundsError(
                f"{self.url}: region {w}x{h} is larger than {MAX_REGION_PIXELS} pixels; read it in tiles",
                self.url,
            )
        ds = self._b.level_downsamples[level]
        return math.floor(location[0] / ds), math.floor(location[1] / ds), w, h

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read a level rectangle, padding whatever lies outside the level with white."""
        lw, lh = self._b.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._b._read_region(level, x, y, w, h)
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._b._read_region(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_level_region(self, level: int, location: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """Like :meth:`read_region`, but ``location`` is in pixels *of that level* (what a writer
        of a level, such as ``convert``, works in). White outside the level."""
        _, _, w, h = self._level_box((0, 0), level, size)
        return self._read_level(level, int(location[0]), int(location[1]), w, h)

    def read_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size`` level pixels whose top-left is level-0 ``location``.

        Like OpenSlide, the region may extend past the slide: those pixels are white.
        """
        return self._read_level(level, *self._level_box(location, level, size))

    def read_regions(
        self,
        locations: Sequence[Sequence[int]],
        level: int,
        size: Sequence[int],
        *,
        threads: int = 2,
    ) -> list[np.ndarray]:
        """Several equally sized regions of one level, fetched and decoded concurrently."""
        boxes = [self._level_box(loc, level, size) for loc in locations]
        lw, lh = self._b.level_dimensions[level]
        inside = [b for b in boxes if b[0] >= 0 and b[1] >= 0 and b[0] + b[2] <= lw and b[1] + b[3] <= lh]
        if len(inside) == len(boxes):
            return self._b._read_regions(level, boxes, threads)
        return [self._read_level(level, *b) for b in boxes]

    def region_for_mpp(
        self, location: Sequence[int], size: Sequence[int], mpp: float, *, allow_upsample: bool = True
    ):
        """(level, level box) that :meth:`read_region_mpp` reads for this request."""
        base = self.require_mpp()
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ValueError(f"mpp must be positive, got {mpp!r}")
        if not allow_upsample and mpp < base * (1 - 1e-3):
            raise RegionOutOfBoundsError(
                f"{self.url}: requested {mpp} µm/px but the finest level is {base:.4g} µm/px; "
                f"allow upsampling or ask for a coarser mpp",
                self.url,
            )
        level = self.best_level_for_mpp(mpp)
        ds = self._b.level_downsamples[level]
        scale = mpp / (base * ds)  # level px per output px (>= 1 unless upsampling)
        lw = max(1, round(size[0] * scale))
        lh = max(1, round(size[1] * scale))
        return level, (math.floor(location[0] / ds), math.floor(location[1] / ds), lw, lh)

    def read_region_mpp(
        self,
        location: Sequence[int],
        size: Sequence[int],
        mpp: float,
        *,
        allow_upsample: bool = True,
        scaled: bool = False,
    ) -> np.ndarray:
        """Region of ``size`` output pixels at ``mpp`` µm/px, top-left at level-0 ``location``.

        Reads the coarsest level at or below the requested µm/px and resizes with antialiasing
        (PIL's bilinear filter widens with the scale factor, so downsampling is area-weighted; an
        exact 2×/4×/8× reduction averages blocks). ``scaled=True`` decodes such a reduction in the
        JPEG DCT domain instead, where it can (see :meth:`read_regions_mpp`).
        """
        if scaled:
            return self.read_regions_mpp([location], size, mpp, allow_upsample=allow_upsample, scaled=True)[0]
        self._check_open()
        level, (x, y, lw, lh) = self.region_for_mpp(location, size, mpp, allow_upsample=allow_upsample)
        w, h = int(size[0]), int(size[1])
        if lw * lh > MAX_REGION_PIXELS:
            raise RegionOutOfBoundsError(
                f"{self.url}: region too large at {mpp} µm/px; read it in tiles", self.url
            )
        img = self._read_level(level, x, y, lw, lh)
        return resize_rgb(img, (w, h))

    def read_regions_mpp(
        self,
        locations: Sequence[Sequence[int]],
        size: Sequence[int],
        mpp: float,
        *,
        allow_upsample: bool = True,
        threads: int = 2,
        scaled: bool = False,
    ) -> list[np.ndarray]:
        """Several regions of ``size`` output pixels at ``mpp`` µm/px (top-left corners at level-0
        ``locations``), batched: one :meth:`read_regions` call per level box size (tiles fetched
        and decoded concurrently in ``threads`` threads), then each resized as
        :meth:`read_region_mpp` does — the pixels equal ``read_region_mpp`` tile by tile.

        ``scaled=True``: a region whose level box is exactly 2, 4 or 8 times the output size, inside
        the level and on that factor's grid (corner and size multiples of it: what tile-aligned
        sampling produces), is decoded at the output size in the JPEG DCT domain (libjpeg-turbo's
        scaled IDCT; TIFF-family JPEG levels whose tile sides are multiples of the factor) instead
        of decoded in full and box-averaged. Pixels then differ from the exact read by a few levels
        (:mod:`wsi.decode` states the difference); every other region is read exactly."""
        self._check_open()
        w, h = int(size[0]), int(size[1])
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, loc in enumerate(locations):
            level, (_x, _y, lw, lh) = self.region_for_mpp(loc, size, mpp, allow_upsample=allow_upsample)
            if lw * lh > MAX_REGION_PIXELS:
                raise RegionOutOfBoundsError(
                    f"{self.url}: region too large at {mpp} µm/px; read it in tiles", self.url
                )
            groups.setdefault((level, lw, lh), []).append(i)
        out: list[np.ndarray | None] = [None] * len(locations)
        for (level, lw, lh), idx in groups.items():
            f = lw // w
            if scaled and f in SCALES and lw == f * w and lh == f * h:
                idx = self._read_scaled(out, locations, idx, level, (lw, lh), f, threads)
            if not idx:
                continue
            imgs = self.read_regions([locations[i] for i in idx], level, (lw, lh), threads=threads)
            for i, img in zip(idx, imgs):
                out[i] = resize_rgb(img, (w, h))
        return out  # type: ignore[return-value]

    def _read_scaled(
        self, out, locations, idx: list[int], level: int, lsize, f: int, threads: int
    ) -> list[int]:
        """Fill ``out[i]`` for the regions of ``idx`` the backend can decode at 1/``f``; returns the
        indices left for the exact path."""
        lw, lh = self._b.level_dimensions[level]
        boxes = {i: self._level_box(locations[i], level, lsize) for i in idx}
        on_grid = [
            i
            for i, (x, y, bw, bh) in boxes.items()
            if x >= 0 and y >= 0 and x + bw <= lw and y + bh <= lh and x % f == 0 and y % f == 0
        ]
        imgs = (
            self._b._read_regions_scaled(level, [boxes[i] for i in on_grid], f, threads) if on_grid else None
        )
        if imgs is None:
            return idx
        for i, img in zip(on_grid, imgs):
            out[i] = img
        done = set(on_grid)
        return [i for i in idx if i not in done]

    def get_thumbnail(self, size: Sequence[int]) -> np.ndarray:
        """An RGB array that fits in ``size`` (w, h), keeping the aspect ratio (OpenSlide's rule).

        Reads the level closest to the needed downsample, in bands, so memory stays bounded even
        for single-level slides.
        """
        self._check_open()
        W, H = self.dimensions
        ds = max(W / size[0], H / size[1], 1.0)
        out_w, out_h = max(1, round(W / ds)), max(1, round(H / ds))
        level = self.get_best_level_for_downsample(ds)
        lw, lh = self.level_dimensions[level]
        if lw * lh > MAX_THUMBNAIL_SOURCE_PIXELS:
            raise DecodeLimitError(
                f"{self.url}: a thumbnail would read level {level} of {lw}x{lh} pixels (no coarser level "
                f"exists); the file is damaged, or build a pyramid with `slidestream convert`",
                self.url,
            )
        factor = max(1, int((ds / self.level_downsamples[level]) // 1))
        # integer box-reduce each block (a multiple of the factor on both sides, so memory stays
        # bounded however wide the level is), then one antialiased resize of the small result
        band = max(factor, (4096 // factor) * factor)
        rows = []
        for y in range(0, lh, band):
            bh = min(band, lh - y)
            cols = [
                box_reduce(self._read_level(level, x, y, min(band, lw - x), bh), factor)
                for x in range(0, lw, band)
            ]
            rows.append(np.concatenate(cols, axis=1))
        small = np.concatenate(rows, axis=0)
        return resize_rgb(small, (out_w, out_h))


def box_reduce(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f×f blocks (edges use partial blocks)."""
    if f <= 1:
        return a
    h, w = a.shape[:2]
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = a.shape[0] // f, a.shape[1] // f
    r = a.reshape(hh, f, ww, f, -1).mean(axis=(1, 3))
    return np.round(r).astype(np.uint8)


def resize_rgb(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Antialiased resize of an (h, w, C) uint8 array to ``size`` (w, h). No-op when equal.

    An exact integer reduction (the loader's 2x reads: 448 -> 224 px) averages k x k blocks
    (PIL ``reduce``, a box filter, as slide pyramids are built), about 4x faster than the
    bilinear filter used for every other factor."""
    w, h = int(size[0]), int(size[1])
    ih, iw = img.shape[0], img.shape[1]
    if iw == w and ih == h:
        return img
    from PIL import Image

    k = iw // w if w else 0
    if k > 1 and iw == k * w and ih == k * h:
        return np.asarray(Image.fromarray(img).reduce(k))
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
