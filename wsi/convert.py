"""Convert a slide to OME-Zarr: NGFF 0.5 multiscales on zarr v3, sharded (chunk = one tile).

Layout of ``DST.zarr`` (read back by :class:`wsi.backends.zarr_backend.ZarrBackend`, by
zarr-python after ``import wsi.codecs`` for JPEG chunks, or by any NGFF 0.5 reader)::

    zarr.json        group; attributes.ome = {version "0.5", multiscales, omero (RGB channels)}
                     attributes.slidestream = {source, vendor, mpp, properties (the source's,
                     str → str), associated_images, codec, tile_size, conversion (per level:
                     mode, tiles copied / re-encoded, seconds, bytes)}
    0/, 1/, ...      one uint8 array per level, axes (c, y, x) — NGFF orders channel before
                     space; tiles are still read as (h, w, 3) RGB by the backend. Chunk
                     (3, tile, tile), shard (3, tile·n, tile·n) with n = shard_tiles (smaller for
                     small levels), fill value 255 (white), index at the shard's end
                     (bytes little-endian + crc32c, zarr's default). Scale transforms carry
                     µm/px (unit "micrometer") when the source has mpp, plain downsamples
                     otherwise.
    associated/NAME  the source's associated images (label, macro, thumbnail) as (h, w, 3) arrays.

Codecs: ``jpeg`` (``slidestream.jpeg``, see :mod:`wsi.codecs`), ``zstd`` and ``blosc`` (zarr
built-ins, lossless), ``none`` (raw bytes). Shards are assembled here (chunks in row-major order,
then the index) and written as whole objects: zarr-python costs milliseconds per chunk, this costs
the encode. **JPEG pass-through:** when the source's backend has the optional raw-tiles capability
(:class:`wsi.backends.base.RawTiles`, asked for through ``Slide.raw_tiles``) and a level is
JPEG-tiled with the same tile size, a chunk is the source tile's own JPEG stream (tables merged) —
no decode, no re-encode, the scanner's pixels bit for bit. Everything else is read through the
public ``Slide.read_level_region``.

Levels: by default the source's levels, then 2× reductions until the longest side is at most
1024 px; ``levels=(1, 4, 16)`` asks for explicit downsamples. A level the source lacks is built
from the nearest finer level already written (4 chunks per output tile), so memory and reads stay
bounded. The store is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import codecs as _codecs
from .atomic import atomic_path
from .backends.zarr_backend import ZarrBackend
from .limits import HeaderError, jpeg_header
from .slide import Slide, open_slide, resize_rgb

CODECS = ("jpeg", "zstd", "blosc", "none")
MIN_SIDE = 1024  # default pyramids stop once the longest side is at most this
_MAX_U64 = 2**64 - 1


# --------------------------------------------------------------------------------------------
# chunk encoders and the shard writer
# --------------------------------------------------------------------------------------------
def _zarr_codecs(codec: str, quality: int) -> dict[str, Any]:
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

    if codec == "jpeg":
        return {"serializer": _codecs.JpegCodec(quality=quality, layout="CYX"), "compressors": None}
    if codec == "zstd":
        return {"serializer": BytesCodec(endian=None), "compressors": ZstdCodec(level=5)}
    if codec == "blosc":
        return {
            "serializer": BytesCodec(endian=None),
            "compressors": BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle", typesize=1),
        }
    return {"serializer": BytesCodec(endian=None), "compressors": None}


def _encoder(codec: str, quality: int):
    """tile (tile, tile, 3) uint8 → chunk bytes for a (3, tile, tile) chunk."""
    import numcodecs

    if codec == "jpeg":
        return lambda t: _codecs.encode_jpeg(t, quality=quality)
    planar = lambda t: np.ascontiguousarray(t.transpose(2, 0, 1)).tobytes()  # noqa: E731
    if codec == "zstd":
        z = numcodecs.Zstd(level=5)
        return lambda t: bytes(z.encode(planar(t)))
    if codec == "blosc":
        b = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)
        return lambda t: bytes(b.encode(planar(t)))
    return planar


def shard_bytes(chunks: dict[tuple[int, int], bytes], n_y: int, n_x: int) -> bytes:
    """A zarr v3 shard: chunks in row-major order, then the index ((1, n_y, n_x, 2) little-endian
    uint64 offset/length, 2^64-1 for absent chunks) and its crc32c."""
    import google_crc32c

    index = np.full((1, n_y, n_x, 2), _MAX_U64, dtype="<u8")
    parts, pos = [], 0
    for (iy, ix), data in sorted(chunks.items()):
        index[0, iy, ix] = (pos, len(data))
        parts.append(data)
        pos += len(data)
    ib = index.tobytes()
    parts.append(ib)
    parts.append(google_crc32c.value(ib).to_bytes(4, "little"))
    return b"".join(parts)


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's SOF marker, or None when not found."""
    try:
        h, w, c, _ = jpeg_header(data)
    except HeaderError:
        return None
    return h, w, c


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------
def _plan(
    dims0: tuple[int, int],
    src_ds: Sequence[float],
    src_dims: Sequence[tuple[int, int]],
    levels: Sequence[float] | None,
) -> list[tuple[float, tuple[int, int], int | None]]:
    """[(downsample, (w, h), source level or None)] for each output level."""
    W, H = dims0
    out: list[tuple[float, tuple[int, int], int | None]] = []
    if levels is None:
        out = [(float(d), tuple(src_dims[i]), i) for i, d in enumerate(src_ds)]
        while max(out[-1][1]) > MIN_SIDE:
            d = out[-1][0] * 2
            out.append((d, (max(1, int(W // d)), max(1, int(H // d))), None))
        return out
    for d in sorted(float(v) for v in levels):
        if not (d >= 1 and math.isfinite(d)):
            raise ValueError(f"level downsamples must be >= 1, got {d}")
        match = next((i for i, s in enumerate(src_ds) if abs(s / d - 1) < 1e-3), None)
        dims = tuple(src_dims[match]) if match is not None else (max(1, int(W // d)), max(1, int(H // d)))
        out.append((d, dims, match))
    return out


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "image"


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------
def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    tile: int = 256,
    codec: str = "jpeg",
    quality: int = 90,
    shard_tiles: int = 16,
    levels: Sequence[float] | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    progress: bool = True,
    backend: str = "auto",
    mpp: float | None = None,
    threads: int | None = None,
) -> str:
    """Write ``src`` (any slide ``open_slide`` reads, local or remote) as OME-Zarr at ``dst``
    (a local directory, written under a temporary name and renamed). Returns ``dst``.

    ``storage_options``, ``backend`` and ``mpp`` (overrides the source's µm/px) apply to the
    source; ``threads`` bounds the read/encode threads (default: all cores). ``levels`` are downsamples relative
    to level 0 (default: the source's levels, then 2× down to ≤ 1024 px). See the module
    docstring for the layout and JPEG pass-through.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
    if not (isinstance(tile, int) and 16 <= tile <= 4096 and tile % 16 == 0):
        raise ValueError(f"tile must be a multiple of 16 between 16 and 4096, got {tile!r}")
    if not (isinstance(shard_tiles, int) and shard_tiles >= 1):
        raise ValueError(f"shard_tiles must be a positive int, got {shard_tiles!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality!r}")
    if "://" in str(dst) and not str(dst).startswith("file://"):
        raise ValueError(f"convert writes local directories only, got {dst}; convert locally, then upload")
    dst = Path(str(dst).removeprefix("file://"))
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    threads = threads or max(1, os.cpu_count() or 1)
    t0 = time.perf_counter()
    with (
        open_slide(src, storage_options=storage_options, backend=backend, mpp=mpp) as slide,
        atomic_path(dst, overwrite=overwrite) as tmp,
        ThreadPoolExecutor(threads, thread_name_prefix="convert") as pool,
    ):
        try:
            _Writer(
                slide,
                tmp,
                tile=tile,
                codec=codec,
                quality=quality,
                shard_tiles=shard_tiles,
                pool=pool,
                threads=threads,
                progress=progress,
            ).run(levels, t0)
        except BaseException:
            # An interrupt (Ctrl-C) stops this thread while zarr's event loop may still be writing
            # into the temporary store; let it finish so the store can be removed completely.
            pool.shutdown(wait=True, cancel_futures=True)
            _drain_zarr_loop()
            raise
    return str(dst)


def _drain_zarr_loop(timeout: float = 10.0) -> None:
    """Wait until zarr's background event loop has no pending tasks (best effort)."""
    import asyncio

    from zarr.core import sync

    loop = sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def _wait_others() -> None:
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        if others:
            await asyncio.wait(others, timeout=timeout)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(_wait_others(), loop).result(timeout + 1)


class _Writer:
    def __init__(self, slide, root: Path, *, tile, codec, quality, shard_tiles, pool, threads, progress):
        self.slide, self.root, self.tile, self.codec, self.quality = slide, root, tile, codec, quality
        self.n, self.pool, self.threads, self.progress = shard_tiles, pool, threads, progress
        self.raw = slide.raw_tiles  # the source's encoded tiles, when its backend offers them
        self.encode = _encoder(codec, quality)

    def run(self, levels, t0: float) -> None:
        import zarr
        from tqdm import tqdm

        slide, tile = self.slide, self.tile
        plan = _plan(slide.dimensions, slide.level_downsamples, slide.level_dimensions, levels)
        group = zarr.open_group(zarr.storage.LocalStore(self.root), mode="w", zarr_format=3)
        total = sum(math.ceil(w / tile) * math.ceil(h / tile) for _, (w, h), _ in plan)
        bar = tqdm(
            total=total,
            unit="tile",
            desc=f"convert {Path(str(slide.url)).name}",
            disable=not self.progress,
            file=None,
        )
        report = []
        written: list[tuple[float, tuple[int, int], Slide]] = []
        try:
            for i, (d, (w, h), src_level) in enumerate(plan):
                lt = time.perf_counter()
                sy, sx = min(self.n, math.ceil(h / tile)), min(self.n, math.ceil(w / tile))
                group.create_array(
                    str(i),
                    shape=(3, h, w),
                    chunks=(3, tile, tile),
                    shards=(3, tile * sy, tile * sx),
                    dtype="uint8",
                    fill_value=255,
                    dimension_names=("c", "y", "x"),
                    **_zarr_codecs(self.codec, self.quality),
                )
                stats = self._write_level(i, (w, h), d, src_level, (sy, sx), written, bar)
                stats.update(
                    path=str(i), width=w, height=h, downsample=d, seconds=round(time.perf_counter() - lt, 3)
                )
                report.append(stats)
                written.append((d, (w, h), Slide(ZarrBackend(str(self.root), array=str(i)))))
        finally:
            bar.close()
            for _, _, b in written:
                b.close()
        assoc = self._write_associated(group)
        self._write_attributes(group, plan, report, assoc, t0)

    # --- one level ------------------------------------------------------------------------
    def _write_level(self, i, size, d, src_level, shard, written, bar) -> dict:
        tile = self.tile
        w, h = size
        nty, ntx = math.ceil(h / tile), math.ceil(w / tile)
        passthrough = self._can_passthrough(src_level, size)
        counts = {"passthrough_tiles": 0, "reencoded_tiles": 0, "generated_tiles": 0}
        if src_level is not None:
            counts["mode"] = "passthrough" if passthrough else "reencoded"
        else:
            counts["mode"] = "generated"
        for sy0 in range(0, nty, shard[0]):
            for sx0 in range(0, ntx, shard[1]):
                tiles = [
                    (ty, tx)
                    for ty in range(sy0, min(sy0 + shard[0], nty))
                    for tx in range(sx0, min(sx0 + shard[1], ntx))
                ]
                chunks: dict[tuple[int, int], bytes] = {}
                for b0 in range(0, len(tiles), 32):
                    batch = tiles[b0 : b0 + 32]
                    for (ty, tx), data, kind in self._encode_batch(
                        batch, size, d, src_level, passthrough, written
                    ):
                        chunks[(ty - sy0, tx - sx0)] = data
                        counts[kind] += 1
                    bar.update(len(batch))
                key = self.root / str(i) / "c" / "0" / str(sy0 // shard[0]) / str(sx0 // shard[1])
                key.parent.mkdir(parents=True, exist_ok=True)
                key.write_bytes(shard_bytes(chunks, shard[0], shard[1]))
        return counts

    def _can_passthrough(self, src_level, size) -> bool:
        b = self.raw
        if self.codec != "jpeg" or src_level is None or b is None:
            return False
        try:
            if b.compression(src_level) != "jpeg":
                return False
            tw, th, _, _ = b.tile_grid(src_level)
        except (AttributeError, ValueError, KeyError):
            return False
        return tw == th == self.tile and tuple(self.slide.level_dimensions[src_level]) == tuple(size)

    def _encode_batch(self, batch, size, d, src_level, passthrough, written):
        """[(tile, chunk bytes, counter name)] for the (ty, tx) tiles of ``batch``. Each task reads,
        decodes and encodes one tile through the slide's thread-safe ``read_level_region``."""
        tile = self.tile
        w, h = size
        boxes = [
            (tx * tile, ty * tile, min(tile, w - tx * tile), min(tile, h - ty * tile)) for ty, tx in batch
        ]
        if src_level is None:
            read = self._generator(d, written)
            kind = "generated_tiles"
        else:
            read = lambda box: self.slide.read_level_region(src_level, box[:2], box[2:])  # noqa: E731
            kind = "reencoded_tiles"
        if not passthrough:
            return [
                (t, e, kind)
                for t, e in zip(batch, self.pool.map(lambda b: self._encode_tile(read(b)), boxes))
            ]

        def copy(j: int) -> tuple[bytes, str]:
            ty, tx = batch[j]
            raw = self.raw.raw_jpeg_tile(src_level, tx, ty)
            if raw and _jpeg_size(raw) == (tile, tile, 3):
                return raw, "passthrough_tiles"
            return self._encode_tile(read(boxes[j])), "reencoded_tiles"

        return [(t, *r) for t, r in zip(batch, self.pool.map(copy, range(len(batch))))]

    def _encode_tile(self, pix: np.ndarray) -> bytes:
        t = self.tile
        if pix.shape[0] != t or pix.shape[1] != t:
            full = np.full((t, t, 3), 255, np.uint8)
            full[: pix.shape[0], : pix.shape[1]] = pix
            pix = full
        return self.encode(pix)

    def _generator(self, d, written):
        """box → pixels at downsample ``d``, reduced from the nearest finer level: an output level
        already written (read back from the new store, 4 chunks per tile for 2×) or a source level."""
        # (downsample, prefer source on ties, backend, level, (w, h))
        cands = [(bd, 0, b, 0, bs) for bd, bs, b in written if bd <= d * (1 + 1e-6)]
        cands += [
            (sd, 1, self.slide, li, self.slide.level_dimensions[li])
            for li, sd in enumerate(self.slide.level_downsamples)
            if sd <= d * (1 + 1e-6)
        ]
        bd, _, ref, level, (bw, bh) = max(cands, key=lambda c: (c[0], c[1]))
        f = d / bd
        fi = round(f) if abs(f - round(f)) < 1e-9 else None

        def read(box):
            x, y, w, h = box
            x0, y0 = math.floor(x * f), math.floor(y * f)
            x1, y1 = min(bw, math.ceil((x + w) * f)), min(bh, math.ceil((y + h) * f))
            pix = ref.read_level_region(level, (x0, y0), (max(1, x1 - x0), max(1, y1 - y0)))
            return _reduce(pix, (w, h), fi)

        return read

    # --- metadata ---------------------------------------------------------------------------
    def _write_associated(self, group) -> list[str]:
        import zarr

        names = []
        for name in self.slide.associated_images:
            img = np.ascontiguousarray(self.slide.associated_images[name])
            safe = _safe_name(name)
            group.create_array(
                f"associated/{safe}",
                data=img,
                chunks=img.shape,
                compressors=zarr.codecs.ZstdCodec(level=5),
                dimension_names=("y", "x", "c"),
            )
            names.append(safe)
        return names

    def _write_attributes(self, group, plan, report, assoc, t0) -> None:
        from importlib.metadata import PackageNotFoundError, version

        slide = self.slide
        mpp = slide.mpp
        unit = {"unit": "micrometer"} if mpp else {}
        base = mpp or 1.0
        try:
            ver = version("slidestream")
        except PackageNotFoundError:
            ver = "unknown"
        nbytes = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        multiscale = {
            "name": Path(str(slide.url)).name,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", **unit},
                {"name": "x", "type": "space", **unit},
            ],
            "datasets": [
                {
                    "path": str(i),
                    "coordinateTransformations": [{"type": "scale", "scale": [1.0, base * d, base * d]}],
                }
                for i, (d, _, _) in enumerate(plan)
            ],
            "metadata": {"method": "slidestream convert", "version": ver},
        }
        omero = {
            "channels": [
                {
                    "label": n,
                    "color": c,
                    "active": True,
                    "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                }
                for n, c in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
            ],
            "rdefs": {"model": "color"},
        }
        group.attrs.update(
            {
                "ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero},
                "slidestream": {
                    "format": 1,
                    "source": str(slide.url),
                    "source_backend": slide.backend,
                    "vendor": slide.vendor,
                    "mpp": mpp,
                    "properties": dict(slide.properties),
                    "associated_images": assoc,
                    "codec": self.codec,
                    "quality": self.quality,
                    "tile_size": self.tile,
                    "source_level_downsamples": list(slide.level_downsamples),
                    "conversion": {
                        "levels": report,
                        "seconds": round(time.perf_counter() - t0, 3),
                        "bytes": nbytes,
                        "slidestream_version": ver,
                    },
                },
            }
        )


def _reduce(img: np.ndarray, size: tuple[int, int], factor: int | None) -> np.ndarray:
    """Downsample ``img`` to ``size`` (w, h): PIL box reduce for integer factors, else antialiased
    resize."""
    from PIL import Image

    if factor is not None and factor > 1:
        small = np.asarray(Image.fromarray(img).reduce(factor))
        if small.shape[1] >= size[0] and small.shape[0] >= size[1]:
            return small[: size[1], : size[0]]
    return resize_rgb(img, size)
