"""Synthetic slides for tests, benchmarks and demos: real TIFF pyramids written with tifffile.

``write_tiff_pyramid`` writes Aperio-like SVS, generic pyramidal TIFF or OME-TIFF (SubIFD pyramid),
little- or big-endian, tiled or strip-organised, with JPEG (Aperio's RGB-coded "JPEG/RGB" with shared
JPEGTables, or ordinary YCbCr JPEG), deflate, LZW, zstd or no compression. ``mirror_tile`` builds
large slides from real pixels; ``load_demo_pixels`` reads a slide's level 0. No torch here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .atomic import atomic_path

APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"
_COMPRESSIONS = {"jpeg": "jpeg", "deflate": "zlib", "lzw": "lzw", "zstd": "zstd", "none": None}


def mirror_tile(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Fill a (h, w) canvas (``size`` is (w, h)) with ``img`` and its mirror images, so the
    tissue/background ratio and texture of a real slide carry over without seams."""
    w, h = int(size[0]), int(size[1])
    top = np.concatenate([img, img[:, ::-1]], axis=1)
    block = np.concatenate([top, top[::-1]], axis=0)
    reps = (-(-h // block.shape[0]), -(-w // block.shape[1])) + (1,) * (img.ndim - 2)
    return np.ascontiguousarray(np.tile(block, reps)[:h, :w])


def load_demo_pixels(path: str | os.PathLike) -> np.ndarray:
    """Level 0 of a slide as an RGB uint8 array (through :func:`wsi.open_slide`)."""
    from .slide import open_slide

    with open_slide(path) as s:
        return s.read_region((0, 0), 0, s.dimensions)


def _jpeg_segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """Split a JPEG stream into [(marker, bytes)] up to and including SOS + scan."""
    out, i = [], 2
    while True:
        marker = jpeg[i + 1]
        length = struct.unpack(">H", jpeg[i + 2 : i + 4])[0]
        if marker == 0xDA:
            out.append((marker, jpeg[i:]))
            return out
        out.append((marker, jpeg[i : i + 2 + length]))
        i += 2 + length


def aperio_jpeg_tile(tile: np.ndarray, quality: int) -> tuple[bytes, bytes]:
    """(JPEGTables, abbreviated stream) of one tile coded like Aperio "JPEG/RGB": RGB components
    (ids 0, 1, 2), 4:4:4, no JFIF/Adobe marker — a decoder not told the colour space assumes YCbCr."""
    import imagecodecs

    jpeg = imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="rgb", outcolorspace="rgb", subsampling="444"
    )
    tables, body = b"", b""
    for marker, seg in _jpeg_segments(jpeg):
        if marker in (0xDB, 0xC4):  # DQT, DHT -> JPEGTables
            tables += seg
        elif marker == 0xC0:  # SOF0: component ids -> 0, 1, 2
            b = bytearray(seg)
            for k in range(b[9]):
                b[10 + 3 * k] = k
            body += bytes(b)
        elif marker == 0xDA:  # SOS: component selectors -> 0, 1, 2
            b = bytearray(seg)
            for k in range(b[4]):
                b[5 + 2 * k] = k
            body += bytes(b)
    return b"\xff\xd8" + tables + b"\xff\xd9", b"\xff\xd8" + body


def _chunks(a: np.ndarray, tile: int, tiled: bool) -> list[np.ndarray]:
    """Tiles (padded white to full size, as TIFF requires) or strips (last one shorter)."""
    h, w = a.shape[:2]
    if not tiled:
        return [a[y : y + tile] for y in range(0, h, tile)]
    out = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = a[y : y + tile, x : x + tile]
            if t.shape[:2] != (tile, tile):
                p = np.full((tile, tile, a.shape[2]), 255, np.uint8)
                p[: t.shape[0], : t.shape[1]] = t
                t = p
            out.append(np.ascontiguousarray(t))
    return out


def _aperio_jpeg_level(a: np.ndarray, tile: int, tiled: bool, quality: int) -> tuple[bytes, list[bytes]]:
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as ex:
        res = list(
            ex.map(lambda t: aperio_jpeg_tile(np.ascontiguousarray(t), quality), _chunks(a, tile, tiled))
        )
    tables = {t for t, _ in res}
    if len(tables) != 1:
        raise RuntimeError("JPEG tiles do not share quantisation/Huffman tables")
    return tables.pop(), [b for _, b in res]


def _level_arrays(level0: np.ndarray, downsamples, level_sizes) -> list[np.ndarray]:
    from .slide import resize_rgb

    h, w = level0.shape[:2]
    if level_sizes is None:
        level_sizes = [(max(1, round(w / d)), max(1, round(h / d))) for d in downsamples]
    out = []
    for lw, lh in level_sizes:
        out.append(level0 if (lw, lh) == (w, h) else resize_rgb(level0, (int(lw), int(lh))))
    return out


def write_tiff_pyramid(
    path: str | os.PathLike,
    level0: np.ndarray,
    *,
    tile: int = 256,
    downsamples: Sequence[float] = (1, 4, 16),
    level_sizes: Sequence[tuple[int, int]] | None = None,
    compression: str = "jpeg",
    quality: int = 90,
    mpp: float | None = 0.5,
    flavor: str = "aperio",
    byteorder: str = "<",
    tiled: bool = True,
    jpeg_rgb: bool = True,
    associated: bool = True,
) -> list[np.ndarray]:
    """Write a real pyramidal TIFF and return the level arrays that were encoded.

    ``level0`` is (h, w, 3) uint8 RGB. Levels are ``downsamples`` of level 0 (resized with PIL) or
    explicit ``level_sizes`` [(w, h), ...] (level 0 first; non-integer downsamples allowed).
    ``flavor``: "aperio" (SVS: ImageDescription with MPP/AppMag, thumbnail in IFD 1, label and
    macro when ``associated``), "generic" (levels as successive directories, mpp in the resolution
    tags, what OpenSlide calls generic-tiff) or "ome" (OME-XML with PhysicalSizeX, levels in SubIFDs).
    ``tiled=False`` writes strips of ``tile`` rows. ``compression="jpeg"`` with ``jpeg_rgb=True``
    writes Aperio "JPEG/RGB" tiles (RGB-coded, shared JPEGTables); ``jpeg_rgb=False`` ordinary
    YCbCr JPEG. mpp=None writes no resolution metadata.
    """
    import tifffile

    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {list(_COMPRESSIONS)}, got {compression!r}")
    if flavor not in ("aperio", "generic", "ome"):
        raise ValueError(f"flavor must be aperio, generic or ome, got {flavor!r}")
    if level0.ndim != 3 or level0.shape[2] != 3 or level0.dtype != np.uint8:
        raise ValueError(f"level0 must be an (h, w, 3) uint8 array, got {level0.shape} {level0.dtype}")
    levels = _level_arrays(np.ascontiguousarray(level0), downsamples, level_sizes)
    h0, w0 = levels[0].shape[:2]
    comp = _COMPRESSIONS[compression]

    def options(a: np.ndarray, i: int) -> dict:
        """tifffile.write arguments for level ``i``; JPEG/RGB tiles are encoded here."""
        kw: dict = {"photometric": "rgb", "metadata": None}
        kw["tile" if tiled else "rowsperstrip"] = (tile, tile) if tiled else tile
        if compression == "jpeg" and jpeg_rgb:
            tables, chunks = _aperio_jpeg_level(a, tile, tiled, quality)
            kw.update(
                data=iter(chunks),
                shape=a.shape,
                dtype=np.uint8,
                compression="jpeg",
                jpegtables=tables,
                subsampling=(1, 1),
                compressionargs={"outcolorspace": "rgb"},
            )
        else:
            kw["data"] = a
            if compression == "jpeg":
                kw.update(
                    compression="jpeg", compressionargs={"level": quality}, subsampling=(2, 2)
                )  # YCbCr 4:2:0
            elif comp is not None:
                kw["compression"] = comp
                if compression == "lzw":
                    kw["predictor"] = True  # exercise the horizontal predictor
        if mpp is not None and flavor == "generic":
            ds = w0 / a.shape[1]
            kw.update(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
        return kw

    path = Path(path)
    bigtiff = sum(a.nbytes for a in levels) > 2**31
    with (  # written under a temporary name, renamed when complete (wsi.atomic)
        atomic_path(path) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=bigtiff, byteorder=byteorder, ome=flavor == "ome") as tw,
    ):
        if flavor == "aperio":
            qname = f"JPEG/RGB Q={quality}" if compression == "jpeg" else compression.upper()
            meta = (
                f"|AppMag = 20|MPP = {mpp}|Filename = synthetic"
                if mpp is not None
                else "|Filename = synthetic"
            )
            for i, a in enumerate(levels):
                h, w = a.shape[:2]
                size = "" if i == 0 else f" -> {w}x{h}"
                desc = f"{APERIO_HEADER}{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}){size} {qname}{meta if i == 0 else ''}"
                kw = options(a, i)
                tw.write(kw.pop("data"), description=desc, **kw)
                if i == 0:  # thumbnail in IFD 1, stripped, as in real SVS files
                    th = _level_arrays(levels[-1], (max(1.0, levels[-1].shape[1] / 256),), None)[0]
                    tw.write(
                        th,
                        photometric="rgb",
                        compression="jpeg",
                        compressionargs={"level": 90},
                        rowsperstrip=16,
                        metadata=None,
                        description=f"{APERIO_HEADER}{w0}x{h0} -> {th.shape[1]}x{th.shape[0]} - {meta}",
                    )
            if associated:
                rng = np.random.default_rng(0)
                label = rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)
                tw.write(
                    label,
                    photometric="rgb",
                    compression="lzw",
                    predictor=True,
                    rowsperstrip=32,
                    subfiletype=1,
                    metadata=None,
                    description=f"{APERIO_HEADER}label 100x120",
                )
                macro = _level_arrays(levels[-1], (max(1.0, levels[-1].shape[1] / 200),), None)[0]
                tw.write(
                    macro,
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": 90},
                    rowsperstrip=16,
                    subfiletype=9,
                    metadata=None,
                    description=f"{APERIO_HEADER}macro {macro.shape[1]}x{macro.shape[0]}",
                )
        elif flavor == "generic":
            for i, a in enumerate(levels):
                kw = options(a, i)
                tw.write(kw.pop("data"), subfiletype=0 if i == 0 else 1, **kw)
        else:
            kw = options(levels[0], 0)
            kw.pop("metadata")
            ome_meta: dict = {"axes": "YXS", "Name": "synthetic"}
            if mpp is not None:
                ome_meta.update(
                    PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm"
                )
            tw.write(kw.pop("data"), subifds=len(levels) - 1, metadata=ome_meta, **kw)
            for i, a in enumerate(levels[1:], start=1):
                kw = options(a, i)
                tw.write(kw.pop("data"), subfiletype=1, **kw)
    return levels
