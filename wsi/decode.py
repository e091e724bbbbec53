"""Decode accounting, the decoded-tile cache and libjpeg-turbo's scaled JPEG decode.

- :class:`DecodeStats`: how many encoded tiles a reader decoded and how many pixels that produced,
  plus the cache's hits and misses. A backend counts into one (``Slide.decode_stats``); the loader
  gives every slide it opens the same one, so a worker's figure covers all its slides. Decoded
  pixels per delivered pixel is the measure of wasted decoding: 1.0 means every decoded pixel was
  delivered at the output resolution.
- :class:`TileCache`: a bounded LRU of decoded tiles (bytes, not entries, are bounded), keyed by
  slide, level, tile and decode scale, shared by the slides of one process (``Slide.tile_cache``).
  It pays where reads overlap (grids with overlap, a grid whose tiles straddle encoded tiles,
  sliding windows); a random stream almost never reads a tile twice, so it is off there.
- :func:`decode_jpeg_scaled`: a JPEG stream decoded at 1/2, 1/4 or 1/8 of its size in the DCT
  domain (libjpeg-turbo's reduced IDCT, through simplejpeg). Only the inverse transform, colour
  conversion and upsampling shrink; entropy decoding costs the same, so the saving depends on the
  stream (measured by ``slidestream bench read``). The pixels differ from decode-then-box-average:
  on RGB-coded 4:4:4 tiles by at most a few levels (mean ≈ 0.1), on YCbCr 4:2:0 tiles more at
  colour edges, where chroma is scaled in the DCT domain too (mean ≈ 1, rare maxima of tens).

Thread safety: both classes take a lock per update; a decode costs hundreds of microseconds, the
lock well under one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

#: reduction factors that libjpeg-turbo decodes in the DCT domain (1/2, 1/4, 1/8 of each side)
SCALES = (2, 4, 8)


class DecodeStats:
    """Counters of one reader (or of every slide a loader process opened). See the module docstring."""

    __slots__ = ("_lock", "tiles", "pixels", "cache_hits", "cache_misses")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tiles = 0
        self.pixels = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def add(self, tiles: int, pixels: int) -> None:
        """Count ``tiles`` decoded tiles that produced ``pixels`` pixels (at the decoded scale)."""
        with self._lock:
            self.tiles += tiles
            self.pixels += pixels

    def count_cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "decoded_tiles": self.tiles,
                "decoded_px": self.pixels,
                "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses,
            }

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__ if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        for k, v in state.items():
            setattr(self, k, v)


class TileCache:
    """A bounded LRU of decoded tiles: at most ``max_bytes`` of pixel data (a tile larger than the
    bound is never kept). Cached arrays are read-only; callers copy before writing.

    ``get``/``put`` count hits and misses here and, when given, in a :class:`DecodeStats`. Two
    threads that miss the same tile at the same time both decode it (both count as misses)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._d: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Hashable, stats: DecodeStats | None = None) -> np.ndarray | None:
        with self._lock:
            a = self._d.get(key)
            if a is None:
                self.misses += 1
            else:
                self.hits += 1
                self._d.move_to_end(key)
        if stats is not None:
            stats.count_cache(a is not None)
        return a

    def put(self, key: Hashable, a: np.ndarray) -> np.ndarray:
        """Keep ``a`` (made read-only) and evict the least recently used tiles beyond the bound."""
        a.flags.writeable = False
        if a.nbytes > self.max_bytes:
            return a
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._d[key] = a
            self.nbytes += a.nbytes
            while self.nbytes > self.max_bytes:
                _, ev = self._d.popitem(last=False)
                self.nbytes -= ev.nbytes
        return a

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.nbytes = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def decode_jpeg_scaled(stream: bytes, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Decode a complete JPEG stream (tables merged in, colour marker present) at ``1/factor``
    (2, 4 or 8) of its ``shape`` = (height, width), both multiples of ``factor``, as (h, w, 3)
    uint8 RGB. The stream's frame header must declare ``shape`` and 3 components
    (:class:`wsi.limits.HeaderError` otherwise, before anything is decoded); the output buffer is
    allocated from ``shape``, never from the stream."""
    import simplejpeg

    from .limits import check_image

    if factor not in SCALES:
        raise ValueError(f"scaled JPEG decode supports factors {SCALES}, got {factor}")
    h, w = shape[0] // factor, shape[1] // factor
    if h * factor != shape[0] or w * factor != shape[1]:
        raise ValueError(f"tile {shape[1]}x{shape[0]} is not a multiple of the factor {factor}")
    check_image("jpeg", stream, shape[1], (shape[0], shape[0]), (3,))
    out = np.empty((h, w, 3), np.uint8)
    a = simplejpeg.decode_jpeg(stream, colorspace="RGB", min_height=h, min_width=w, buffer=out, strict=True)
    if a.shape != out.shape:
        raise ValueError(f"scaled decode gave {a.shape[1]}x{a.shape[0]}, expected {w}x{h}")
    return a
