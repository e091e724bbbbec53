"""GPU decode for the loader and ``embed``: encoded tiles read in the workers, decoded on the GPU.

With ``decode="gpu"`` the read threads do not decode: for each tile they fetch the encoded JPEG
tiles its level box touches (byte ranges, one batch per tile; :meth:`raw_jpeg_tiles` of the TIFF
backend: standalone streams with the JPEGTables merged in) and describe how to cut the box out
(:class:`RawTile`). The process that owns the GPU decodes a whole batch of streams at once with
nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``), pastes each tile's streams into its
block, crops the box and resizes it to the output size on the GPU — the same geometry and the same
resize rules as the CPU path (:meth:`wsi.slide.Slide.read_regions_mpp`): an exact 2/4/8 reduction
is a box average rounded half up (PIL ``reduce``), anything else an antialiased bilinear resize.
Levels the GPU cannot take (not 8-bit 3-sample JPEG, RGB-coded with chroma subsampling, a box
outside the level, non-TIFF backends) are decoded in the worker as usual and travel as pixels.

Colour. Aperio "JPEG/RGB" tiles code R, G, B directly with no colour marker. The streams carry an
Adobe APP14 transform=0 marker (added by the backend), which libjpeg honours; whether nvJPEG does
is not documented, so RGB-coded streams (Adobe transform 0, or component ids 'R','G','B' without
JFIF: libjpeg's own rule) are decoded with ``ImageReadMode.UNCHANGED`` — nvJPEG's
``NVJPEG_OUTPUT_UNCHANGED``, the components as coded, no colour conversion — and YCbCr streams with
``ImageReadMode.RGB``. On the CPU torchvision's libjpeg gives RGB for both, so the same code with
``device="cpu"`` is the test of the byte handling, pasting, cropping and resizing.

Bounds (issue 12): every stream's frame header is checked against the tile geometry in the worker
before it is sent, so nvJPEG never allocates from a size the file declares.

Equality with the CPU decode: on the CPU (torchvision's libjpeg, islow IDCT) the pixels equal the
CPU path exactly for whole-tile and 2/4/8 reads and within 1 level for bilinear resizes. nvJPEG's
IDCT and chroma upsampling differ from libjpeg-turbo's: the stated tolerance for the GPU is a mean
absolute difference ≤ 1.0 and a 99.9th percentile ≤ 8 levels per channel (the GPU test asserts it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..decode import DecodeStats
from ..limits import HeaderError, check_image

if TYPE_CHECKING:
    import torch


@dataclass
class RawTile:
    """One tile as the GPU decode receives it: ``streams`` (row-major, ``cols`` × ``rows`` encoded
    tiles of ``tile_w`` × ``tile_h`` px; b"" = sparse, white), whether they are RGB-coded, the box to
    cut out of their block (``crop`` = x, y, w, h in block px) and the output side ``out_size``.
    ``pixels`` (CHW uint8) instead when the worker decoded the tile itself."""

    out_size: int
    streams: list[bytes] = field(default_factory=list)
    rgb: bool = False
    cols: int = 0
    rows: int = 0
    tile_w: int = 0
    tile_h: int = 0
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    pixels: np.ndarray | None = None


# --- worker side ---------------------------------------------------------------------------------
def _segments(data: bytes):
    """(marker, payload) of the segments before the first scan."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xDA or marker == 0xD9:
            return
        length = (data[i + 2] << 8) | data[i + 3]
        yield marker, data[i + 4 : i + 2 + length]
        i += 2 + length


def stream_colour(data: bytes) -> tuple[bool, bool]:
    """(RGB-coded, chroma-subsampled) of a 3-component JPEG stream, by libjpeg's rule: JFIF means
    YCbCr, an Adobe marker's transform 0 means RGB, else component ids 'R','G','B' mean RGB."""
    jfif, adobe, ids, sampling = False, None, (), ()
    for marker, p in _segments(data):
        if marker == 0xE0 and p[:5] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and p[:5] == b"Adobe" and len(p) >= 12:
            adobe = p[11]
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(p) >= 6:
            nc = p[5]
            comps = [p[6 + 3 * k : 9 + 3 * k] for k in range(nc) if len(p) >= 9 + 3 * k]
            ids = tuple(c[0] for c in comps)
            sampling = tuple(c[1] for c in comps)
    if jfif:
        rgb = False
    elif adobe is not None:
        rgb = adobe == 0
    else:
        rgb = ids == (82, 71, 66)
    return rgb, len(set(sampling)) > 1


def raw_tile(slide, level: int, box: tuple[int, int, int, int], out_size: int) -> RawTile | None:
    """The encoded tiles of a level box, or None when the GPU path cannot take this read."""
    raw = slide.raw_tiles
    lw, lh = slide.level_dimensions[level]
    x, y, w, h = box
    if raw is None or not hasattr(raw, "raw_jpeg_tiles") or not raw.jpeg_level(level):
        return None
    if x < 0 or y < 0 or x + w > lw or y + h > lh:
        return None
    tw, th, _, _ = raw.tile_grid(level)
    tx0, ty0, tx1, ty1 = x // tw, y // th, (x + w - 1) // tw, (y + h - 1) // th
    tiles = [(tx, ty) for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
    streams = raw.raw_jpeg_tiles(level, tiles)
    rgb = False
    for s in streams:
        if s:
            check_image("jpeg", s, tw, (th, th), (3,))  # before any decoder sees a declared size
            rgb, subsampled = stream_colour(s)
            if rgb and subsampled:
                return None  # UNCHANGED output needs full-size planes
    return RawTile(
        out_size, streams, rgb, tx1 - tx0 + 1, ty1 - ty0 + 1, tw, th, (x - tx0 * tw, y - ty0 * th, w, h)
    )


def read_raw_jobs(jobs: list[tuple], stats: DecodeStats) -> list[RawTile | BaseException]:
    """The reader's raw mode (runs in a read thread): a :class:`RawTile` or the error of each job
    ``(k, record, slide, level, level box)``; tiles the GPU path cannot take are decoded here.
    Pixels the GPU will decode are counted in ``stats`` (those decoded here count themselves)."""
    out: list[RawTile | BaseException] = []
    for _k, rec, slide, level, box in jobs:
        try:
            rt = raw_tile(slide, level, box, rec.out_size)
            if rt is None:
                img = slide.read_regions_mpp([(rec.x, rec.y)], (rec.out_size,) * 2, rec.mpp, threads=1)[0]
                rt = RawTile(rec.out_size, pixels=np.ascontiguousarray(img.transpose(2, 0, 1)))
            else:
                n = sum(1 for s in rt.streams if s)
                stats.add(n, n * rt.tile_w * rt.tile_h)
            out.append(rt)
        except (OSError, HeaderError) as e:
            out.append(e)
    return out


# --- GPU side ------------------------------------------------------------------------------------
def resize_chw(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, h, w) uint8 → (3, size, size) uint8 by the CPU path's rules (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    _, h, w = img.shape
    if h == size and w == size:
        return img
    k = w // size
    x = img[None].float()
    if k > 1 and w == k * size and h == k * size:
        y = torch.floor(F.avg_pool2d(x, k) + 0.5)
    else:
        y = torch.round(
            F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        )
    return y.clamp_(0, 255)[0].to(torch.uint8)


def decode_raw_tiles(raws: list[RawTile], device: str | torch.device = "cuda") -> torch.Tensor:
    """A batch of :class:`RawTile` s as a (B, 3, S, S) uint8 tensor on ``device``: all their streams
    decoded in one batched call per colour coding, pasted, cropped and resized there."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if not raws:
        raise ValueError("decode_raw_tiles needs at least one tile")
    size = raws[0].out_size
    if any(r.out_size != size for r in raws):
        raise ValueError("all tiles of a batch must have the same output size")
    groups: dict[bool, list[tuple[int, int, torch.Tensor]]] = {True: [], False: []}
    for i, r in enumerate(raws):
        for j, s in enumerate(r.streams):
            if s:
                groups[r.rgb].append((i, j, torch.frombuffer(bytearray(s), dtype=torch.uint8)))
    decoded: dict[tuple[int, int], torch.Tensor] = {}
    for rgb, items in groups.items():
        if items:
            mode = ImageReadMode.UNCHANGED if rgb else ImageReadMode.RGB
            with warnings.catch_warnings():
                # torchvision 0.29 (pinned) deprecates its image codecs in favour of TorchCodec; the
                # nvJPEG batch decode still works and is what this module is built on
                warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
                outs = decode_jpeg([t for _i, _j, t in items], mode=mode, device=device)
            for (i, j, _t), o in zip(items, outs):
                decoded[i, j] = o
    out = torch.empty((len(raws), 3, size, size), dtype=torch.uint8, device=device)
    for i, r in enumerate(raws):
        if r.pixels is not None:
            out[i] = torch.from_numpy(r.pixels).to(device)
            continue
        tw, th = r.tile_w, r.tile_h
        block = torch.full((3, r.rows * th, r.cols * tw), 255, dtype=torch.uint8, device=device)
        for j in range(len(r.streams)):
            t = decoded.get((i, j))
            if t is None:
                continue
            if tuple(t.shape) != (3, th, tw):
                raise HeaderError(f"a JPEG tile decoded to {tuple(t.shape)}, expected (3, {th}, {tw})")
            ty, tx = divmod(j, r.cols)
            block[:, ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw] = t
        x, y, w, h = r.crop
        out[i] = resize_chw(block[:, y : y + h, x : x + w], size)
    return out
