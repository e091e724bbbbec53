"""TIFF byte-range backend: Aperio SVS, generic tiled pyramidal TIFF, OME-TIFF (either byte order,
SubIFD pyramids) and strip-organised TIFF, local or remote.

The directory chain is walked with a bound (:mod:`wsi.backends.tiff_ifd`), then parsed once
(:mod:`wsi.backends.tiff_meta`). A tile read fetches only that tile's bytes through the I/O core
(:mod:`wsi.byteio`) — ``os.pread`` on a raw file descriptor for local files (thread-safe, no Python
file object), one batch of concurrent, retried and verified ranged reads for all tiles a request
needs on remote filesystems — and decodes them with imagecodecs (libjpeg-turbo, OpenJPEG, zlib,
...), which releases the GIL, so reads from several threads run in parallel. Every stream's header
is checked against the tile geometry and every decompressor bounded by it before anything is
allocated (:mod:`wsi.limits`). A strip image is read as tiles one strip high and one image wide.

The backend has the optional raw-tiles capability (:class:`wsi.backends.base.RawTiles`:
``tile_grid``, ``compression``, ``raw_tile``, ``raw_jpeg_tile``; :mod:`wsi.backends.tiff_raw`) that
``convert`` and the GPU decode use. JPEG levels can be read at 1/2, 1/4, 1/8 in the DCT domain
(``_read_regions_scaled``), tiles can go through a decoded-tile cache (``tile_cache``), and every
decode is counted (``stats``; :mod:`wsi.decode`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np

from ..byteio import ByteSource, DecodePool, RetryPolicy
from ..decode import SCALES, decode_jpeg_scaled
from ..errors import (
    CorruptSlideError,
    DecodeLimitError,
    SlideError,
    UnreadableTileError,
    UnsupportedSlideError,
)
from ..limits import check_image, decompress
from .base import DEFAULT_DECODE_LIMIT, Backend
from .tiff_ifd import check_ifd_chain
from .tiff_meta import LevelInfo, parse_tiff
from .tiff_raw import TiffRawTiles

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_DECODE_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)
_PARALLEL_MIN_TILES = 4  # a single region touching fewer tiles is decoded in the calling thread


def _ycbcr_to_rgb(a: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YCbCr -> RGB (Aperio JPEG 2000 33003 codestreams carry no colour transform)."""
    f = a.astype(np.float32)
    y, cb, cr = f[..., 0], f[..., 1] - 128.0, f[..., 2] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class TiffBackend(TiffRawTiles, Backend):
    """Byte-range reader for TIFF-family slides. See the module docstring."""

    name = "tiff"
    counts_decodes = True

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict | None = None,
        decode_limit: int = DEFAULT_DECODE_LIMIT,
        retry: RetryPolicy | None = None,
    ):
        super().__init__(url)
        self._closed = False
        self._decode_limit = decode_limit
        self._pool = DecodePool("slidestream-tiff")
        self._src = ByteSource(url, storage_options, retry=retry)
        try:
            self._open()
        except BaseException:
            self._src.close()
            raise

    def _open(self) -> None:
        url, decode_limit = self.url, self._decode_limit
        try:
            size = self._src.size()  # None when an HTTP server does not say: the EOF check is skipped
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"slide not found: {url}") from None
        try:
            with self._src.open(size=size) as fh:
                magic = fh.read(4)
                if magic not in _TIFF_MAGIC:
                    raise UnsupportedSlideError(f"{url}: not a TIFF file (starts with {magic!r})", url)
                check_ifd_chain(fh, url, size)
                fh.seek(0)
                parsed = parse_tiff(fh, url, decode_limit, size)
        except SlideError:
            raise
        except (OSError, EOFError, ValueError, struct.error) as e:
            raise CorruptSlideError(
                f"{url}: cannot read the TIFF directory ({e}); the file is damaged", url
            ) from e
        self._levels: list[LevelInfo] = parsed.levels
        self._associated = parsed.associated
        # flat python lists: indexing them is the cheapest thing on the per-tile path
        self._tables = [(lv.offsets.ravel().tolist(), lv.counts.ravel().tolist()) for lv in self._levels]
        self._assoc_tables = {
            k: (v.offsets.ravel().tolist(), v.counts.ravel().tolist()) for k, v in self._associated.items()
        }
        self.vendor = parsed.vendor
        self.mpp = parsed.mpp
        self.properties = parsed.properties
        w0, h0 = self._levels[0].width, self._levels[0].height
        self.level_dimensions = [(lv.width, lv.height) for lv in self._levels]
        self.level_downsamples = [(w0 / lv.width + h0 / lv.height) / 2 for lv in self._levels]
        self.level_tile_sizes = [(lv.tile_w, lv.tile_h) for lv in self._levels]
        self._fd = self._src.fd()  # local files: the single-tile fast path preads it directly
        self._prefix: list[bytes | None] = [None] * len(self._levels)  # standalone-stream heads
        # per level, the few values the single-tile JPEG fast path of _read_region needs (None: no fast path)
        self._fast = [
            (
                lv.tile_w,
                lv.tile_h,
                lv.nx,
                *self._tables[i],
                lv.jpegtables,
                lv.jpeg_colorspace,
                lv.jpeg_outcolorspace,
            )
            if lv.compression == 7 and lv.tiled and lv.planar == 1 and lv.spp == 3 and lv.bits == 8
            else None
            for i, lv in enumerate(self._levels)
        ]

    # --- associated images -------------------------------------------------------------------
    @property
    def associated_image_names(self) -> list[str]:
        return list(self._associated)

    @property
    def associated_image_sizes(self) -> dict[str, tuple[int, int]]:
        return {k: (lv.width, lv.height) for k, lv in self._associated.items()}

    def read_associated(self, name: str) -> np.ndarray:
        lv = self._associated[name]
        nbytes = lv.width * lv.height * 3
        if nbytes > self._decode_limit:
            raise DecodeLimitError(
                f"{self.url}: associated image {name!r} declares {lv.width}x{lv.height} pixels "
                f"({nbytes / 2**20:.0f} MiB), above the decode limit of {self._decode_limit / 2**20:.0f} MiB; "
                f"raise decode_limit= if you trust this file",
                self.url,
            )
        tables = self._assoc_tables[name]
        return self._assemble(
            lv, f"associated image {name!r}", tables, 0, 0, lv.width, lv.height, self._getter(tables)
        )

    # --- byte ranges -------------------------------------------------------------------------
    def _get(self, tables: tuple[list[int], list[int]], i: int, level) -> bytes:
        """Bytes of flat tile index ``i`` (b"" for a sparse tile)."""
        off, n = tables[0][i], tables[1][i]
        if n == 0:
            return b""
        if self._fd is None:
            return self._fetch_remote(tables, [i], level)[i]
        try:
            data = os.pread(self._fd, n, off)
        except OSError as e:
            raise UnreadableTileError(
                f"{self.url}: level {level} tile {i}: read failed ({e})", self.url
            ) from e
        if len(data) != n:
            raise self._truncated(level, i, len(data), n, off)
        return data

    def _truncated(self, level, i: int, got: int, n: int, off: int) -> UnreadableTileError:
        return UnreadableTileError(
            f"{self.url}: level {level} tile {i}: file ends {got} bytes into a {n}-byte tile at offset "
            f"{off}; the file is truncated — copy it again",
            self.url,
        )

    def _fetch_remote(self, tables, idxs: list[int], level) -> dict[int, bytes]:
        """All non-empty tiles of ``idxs`` in one batch of concurrent ranged reads (retried and
        verified by the I/O core)."""
        offs, cnts = tables
        want = sorted({i for i in idxs if cnts[i] > 0})
        got: dict[int, bytes] = {i: b"" for i in idxs}
        if not want:
            return got
        if self._closed:
            raise SlideError(f"{self.url}: slide is closed", self.url)
        res = self._src.ranges([("", offs[i], offs[i] + cnts[i]) for i in want])
        for i, r in zip(want, res):
            if r is None:
                raise FileNotFoundError(f"slide not found: {self.url} (it was there when opened)")
            if len(r) != cnts[i]:
                raise self._truncated(level, i, len(r), cnts[i], offs[i])
            got[i] = r
        return got

    def _getter(self, tables, idxs: list[int] | None = None, level=0) -> Callable[[int], bytes]:
        if self._closed:
            raise SlideError(f"{self.url}: slide is closed", self.url)
        if self._fd is not None:
            return lambda i: self._get(tables, i, level)
        pre = self._fetch_remote(tables, idxs if idxs is not None else list(range(len(tables[0]))), level)
        return pre.__getitem__

    # --- decoding ----------------------------------------------------------------------------
    def _decode(self, lv: LevelInfo, level, get: Callable[[int], bytes], tx: int, ty: int) -> np.ndarray:
        """Decoded tile (rows, tile_w, 3) uint8; raises UnreadableTileError naming file/level/tile."""
        idx = ty * lv.nx + tx
        rows = lv.rows_in(ty)
        try:
            if lv.planar == 1:
                data = get(idx)
                if not data:
                    return np.full((rows, lv.tile_w, 3), 255, np.uint8)
                self.stats.add(1, rows * lv.tile_w)
                a = self._decode_samples(lv, data, rows, lv.spp)
            else:
                n = lv.nx * lv.ny
                planes = [get(p * n + idx) for p in range(lv.spp)]
                if not all(planes):
                    return np.full((rows, lv.tile_w, 3), 255, np.uint8)
                self.stats.add(1, rows * lv.tile_w)
                a = np.concatenate([self._decode_samples(lv, d, rows, 1) for d in planes], axis=2)
            if not rows <= a.shape[0] <= lv.tile_h or a.shape[1] != lv.tile_w:
                raise ValueError(f"decoded to {a.shape[1]}x{a.shape[0]}, expected {lv.tile_w}x{rows}")
            return self._to_rgb8(lv, a)
        except UnreadableTileError:
            raise
        except _DECODE_ERRORS as e:
            raise UnreadableTileError(
                f"{self.url}: cannot decode level {level} tile {idx} (column {tx}, row {ty}; {lv.codec}, {lv.page}): "
                f"{e}; the file is damaged — re-copy or re-export the slide",
                self.url,
            ) from e

    @staticmethod
    def _decode_samples(lv: LevelInfo, data: bytes, rows: int, spp: int) -> np.ndarray:
        """Decode one tile/strip (one plane when ``spp`` is 1 of a planar image). Nothing is
        allocated from the stream's own claims: an image codec's header must declare the tile's
        geometry, a decompressor's output is bounded by it (:mod:`wsi.limits`)."""
        c = lv.compression
        codec = lv.codec
        if codec in ("jpeg", "jpeg2000", "webp"):
            check_image(codec, data, lv.tile_w, (rows, lv.tile_h), (spp,) if codec != "webp" else None)
        if c == 7:
            a = imagecodecs.jpeg8_decode(
                data,
                tables=lv.jpegtables,
                colorspace=lv.jpeg_colorspace,
                outcolorspace=lv.jpeg_outcolorspace if spp > 1 else None,
            )
        elif codec == "jpeg2000":
            a = imagecodecs.jpeg2k_decode(data)
        elif codec == "webp":
            a = imagecodecs.webp_decode(data)
        else:
            n = rows * lv.tile_w * spp * lv.dtype.itemsize
            raw = decompress(codec, data, lv.tile_h * lv.tile_w * spp * lv.dtype.itemsize)
            if len(raw) < n:
                raise ValueError(f"{len(raw)} decoded bytes, expected {n}")
            a = np.frombuffer(raw, dtype=lv.dtype, count=n // lv.dtype.itemsize).reshape(rows, lv.tile_w, spp)
            if lv.predictor == 2:
                a = imagecodecs.delta_decode(a, axis=1)
        if a.ndim == 2:
            a = a[:, :, None]
        return a

    @staticmethod
    def _to_rgb8(lv: LevelInfo, a: np.ndarray) -> np.ndarray:
        if a.dtype.itemsize == 2:
            a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        elif a.dtype != np.uint8:
            a = a.astype(np.uint8)
        if lv.photometric == 3:
            return lv.colormap[a[..., 0]]
        if lv.compression == 33003:
            return _ycbcr_to_rgb(a[..., :3])
        c = a.shape[2]
        if lv.photometric in (0, 1) or c < 3:
            g = a[..., 0]
            if lv.photometric == 0:
                g = 255 - g
            return np.repeat(g[:, :, None], 3, axis=2)
        if c > 3:
            return np.ascontiguousarray(a[..., :3])
        return a

    def _decode_scaled(self, lv: LevelInfo, level, get, tx: int, ty: int, f: int) -> np.ndarray:
        """Tile decoded at 1/``f`` in the DCT domain (``jpeg_level`` levels only)."""
        idx = ty * lv.nx + tx
        th, tw = lv.tile_h // f, lv.tile_w // f
        data = get(idx)
        if not data:
            return np.full((th, tw, 3), 255, np.uint8)
        try:
            self.stats.add(1, th * tw)
            return decode_jpeg_scaled(self._jpeg_stream(level, idx, data), f, (lv.tile_h, lv.tile_w))
        except UnreadableTileError:
            raise
        except _DECODE_ERRORS as e:
            raise UnreadableTileError(
                f"{self.url}: cannot decode level {level} tile {idx} (column {tx}, row {ty}; jpeg at 1/{f}, "
                f"{lv.page}): {e}; the file is damaged — re-copy or re-export the slide",
                self.url,
            ) from e

    def _tile(self, lv: LevelInfo, level, get, tx: int, ty: int, scale: int = 1) -> np.ndarray:
        """A decoded tile (at 1/``scale``), through the tile cache when one is set (then read-only)."""
        cache = self.tile_cache
        if cache is not None:
            key = (self.url, level, tx, ty, scale)
            t = cache.get(key, self.stats)
            if t is not None:
                return t
        if scale == 1:
            t = self._decode(lv, level, get, tx, ty)
        else:
            t = self._decode_scaled(lv, level, get, tx, ty, scale)
        return t if cache is None else cache.put(key, t)

    # --- regions -----------------------------------------------------------------------------
    def _assemble(
        self,
        lv: LevelInfo,
        level,
        tables,
        x: int,
        y: int,
        w: int,
        h: int,
        get,
        parallel: bool = True,
        scale: int = 1,
    ) -> np.ndarray:
        """Region (h, w, 3) of ``lv`` from its tiles; with ``parallel`` (never from inside a pool task:
        that could deadlock the pool) tiles are decoded in the pool when there are many. With ``scale`` > 1
        the box is in 1/``scale`` coordinates and the tiles are decoded at that scale."""
        tw, th = lv.tile_w // scale, lv.tile_h // scale
        tx0, ty0, tx1, ty1 = x // tw, y // th, (x + w - 1) // tw, (y + h - 1) // th
        if tx0 == tx1 and ty0 == ty1:
            t = self._tile(lv, level, get, tx0, ty0, scale)
            ox, oy = x - tx0 * tw, y - ty0 * th
            if self.tile_cache is not None:  # never hand out the cached (read-only) array itself
                return np.array(t[oy : oy + h, ox : ox + w])
            if ox == 0 and oy == 0 and t.shape[0] == h and t.shape[1] == w:
                return t
            return np.ascontiguousarray(t[oy : oy + h, ox : ox + w])
        out = np.empty((h, w, 3), np.uint8)
        grid = [(tx, ty) for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]

        def paste(cells):
            for tx, ty in cells:
                t = self._tile(lv, level, get, tx, ty, scale)
                gx, gy = tx * tw, ty * th
                sx0, sy0 = max(x, gx), max(y, gy)
                sx1, sy1 = min(x + w, gx + tw), min(y + h, gy + th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = t[sy0 - gy : sy1 - gy, sx0 - gx : sx1 - gx]

        workers = min(os.cpu_count() or 1, 8) if parallel and len(grid) >= _PARALLEL_MIN_TILES else 1
        if workers < 2:
            paste(grid)
        else:
            pool = self._executor(workers)
            for f in [pool.submit(paste, grid[k::workers]) for k in range(workers)]:
                f.result()
        return out

    def _tile_idxs(self, lv: LevelInfo, boxes) -> list[int]:
        tw, th, n = lv.tile_w, lv.tile_h, lv.nx * lv.ny
        idxs = []
        for x, y, w, h in boxes:
            for ty in range(y // th, (y + h - 1) // th + 1):
                for tx in range(x // tw, (x + w - 1) // tw + 1):
                    i = ty * lv.nx + tx
                    if lv.planar == 2:  # one tile per sample plane
                        idxs.extend(p * n + i for p in range(lv.spp))
                    else:
                        idxs.append(i)
        return idxs

    def _read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        fast = self._fast[level]
        fd = self._fd
        if fast is not None and fd is not None and self.tile_cache is None:
            # one JPEG tile from a local file: pread + decode, nothing else (the common case of
            # tile-aligned streaming). Anything unusual falls through to the general path,
            # which also raises the descriptive errors.
            tw, th, nx, offs, cnts, tables, cs, ocs = fast
            tx, ty = x // tw, y // th
            if (x + w - 1) // tw == tx and (y + h - 1) // th == ty:
                i = ty * nx + tx
                n = cnts[i]
                data = os.pread(fd, n, offs[i]) if n else b""
                if len(data) == n and n:
                    # into a tile-sized array: a stream declaring another size fails in its header
                    # (and is reported by the general path below) before anything is allocated
                    t = np.empty((th, tw, 3), np.uint8)
                    try:
                        imagecodecs.jpeg8_decode(data, tables=tables, colorspace=cs, outcolorspace=ocs, out=t)
                    except _DECODE_ERRORS:
                        t = None
                    if t is not None:
                        self.stats.add(1, th * tw)
                        ox, oy = x - tx * tw, y - ty * th
                        if ox == 0 and oy == 0 and w == tw and h == th:
                            return t
                        return np.ascontiguousarray(t[oy : oy + h, ox : ox + w])
        if self._closed:
            raise SlideError(f"{self.url}: slide is closed", self.url)
        lv = self._levels[level]
        tables = self._tables[level]
        if self._fd is not None:
            get = lambda i: self._get(tables, i, level)  # noqa: E731
        else:
            get = self._fetch_remote(tables, self._tile_idxs(lv, [(x, y, w, h)]), level).__getitem__
        return self._assemble(lv, level, tables, x, y, w, h, get)

    def _read_regions(
        self, level: int, boxes: list[tuple[int, int, int, int]], threads: int
    ) -> list[np.ndarray]:
        """Many boxes at once: one batched fetch (remote), decode in ``threads`` threads, a few
        batches per thread rather than one task per tile. Tile-aligned full-tile JPEG boxes are
        decoded straight into one preallocated array."""
        lv = self._levels[level]
        tables = self._tables[level]
        if not boxes:
            return []
        get = self._getter(tables, self._tile_idxs(lv, boxes) if self._fd is None else None, level)
        tw, th = lv.tile_w, lv.tile_h
        direct = (
            lv.compression == 7
            and lv.planar == 1
            and lv.spp == 3
            and lv.bits == 8
            and lv.tiled
            and all(w == tw and h == th and x % tw == 0 and y % th == 0 for x, y, w, h in boxes)
        )
        out: list = [None] * len(boxes)
        if direct:
            buf = np.empty((len(boxes), th, tw, 3), np.uint8)
            tables_, cs, ocs = lv.jpegtables, lv.jpeg_colorspace, lv.jpeg_outcolorspace
            nx, jpeg8_decode, count = lv.nx, imagecodecs.jpeg8_decode, self.stats.add

            def work(ks):
                for k in ks:
                    x, y = boxes[k][0], boxes[k][1]
                    tx, ty = x // tw, y // th
                    data = get(ty * nx + tx)
                    if not data:
                        buf[k] = 255
                        continue
                    try:
                        jpeg8_decode(data, tables=tables_, colorspace=cs, outcolorspace=ocs, out=buf[k])
                    except _DECODE_ERRORS:
                        buf[k] = self._decode(lv, level, get, tx, ty)  # raises with file/level/tile
                    else:
                        count(1, tw * th)
                    out[k] = buf[k]
                return None
        else:

            def work(ks):
                for k in ks:
                    # threads=1 means the calling thread only: the loader calls from its own read threads,
                    # and handing tiles to a second pool there cost ~20% CPU per tile
                    out[k] = self._assemble(lv, level, tables, *boxes[k], get, parallel=False)
                return None

        n = len(boxes)
        self._run(work, n, threads)
        if direct:
            return [buf[k] for k in range(n)]
        return out

    def _read_regions_scaled(
        self, level: int, boxes: list[tuple[int, int, int, int]], factor: int, threads: int
    ) -> list[np.ndarray] | None:
        """Boxes read at 1/``factor`` with libjpeg-turbo's DCT-domain scaling (JPEG levels whose
        tile sides are multiples of ``factor``; every box a multiple of it). None otherwise."""
        lv = self._levels[level]
        if (
            factor not in SCALES
            or not self.jpeg_level(level)
            or lv.tile_w % factor
            or lv.tile_h % factor
            or any(v % factor for b in boxes for v in b)
        ):
            return None
        if not boxes:
            return []
        if self._closed:
            raise SlideError(f"{self.url}: slide is closed", self.url)
        tables = self._tables[level]
        get = self._getter(tables, self._tile_idxs(lv, boxes) if self._fd is None else None, level)
        out: list = [None] * len(boxes)

        def work(ks):
            for k in ks:
                x, y, w, h = (v // factor for v in boxes[k])
                out[k] = self._assemble(lv, level, tables, x, y, w, h, get, parallel=False, scale=factor)

        self._run(work, len(boxes), threads)
        return out

    def _run(self, work: Callable, n: int, threads: int) -> None:
        """``work(indices)`` over ``range(n)``: in the calling thread for ``threads`` 1, else a few
        batches per thread of the decode pool (not one task per tile)."""
        threads = max(1, min(int(threads), n))
        if threads == 1:
            work(range(n))
            return
        nb = min(n, threads * 2)
        pool = self._executor(threads)
        for f in [pool.submit(work, range(k, n, nb)) for k in range(nb)]:
            f.result()

    def _executor(self, workers: int) -> ThreadPoolExecutor:
        return self._pool.get(workers)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown()
        self._fd = None
        self._src.close()
