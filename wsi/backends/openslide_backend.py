"""OpenSlide backend: for formats the byte-range backends cannot map (MRXS, VMS, SCN, BIF, DICOM,
NDPI, ...) and the pixel reference in tests. Local files only (OpenSlide opens paths)."""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import CorruptSlideError, UnreadableTileError, UnsupportedSlideError
from .base import DEFAULT_DECODE_LIMIT, Backend


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    if "://" in url:
        return None
    return url


def rgba_to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """Composite premultiplied-by-OpenSlide RGBA onto white (OpenSlide's RGBA is not premultiplied
    once converted to PIL, so this is the usual alpha blend)."""
    if rgba.shape[2] == 3:
        return rgba
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    a = alpha.astype(np.uint16)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _raise_unsupported_encoding(url: str, what: str, e: Exception) -> None:
    """OpenSlide's "Unsupported ..." refusals (a TIFF compression, a DICOM transfer syntax) are
    :class:`UnsupportedSlideError`; other errors are left to the caller."""
    if "unsupported" in str(e).lower():
        raise UnsupportedSlideError(
            f"{url}: OpenSlide recognises {what} slide but does not support its encoding ({e}); "
            f"convert it to OME-TIFF/OME-Zarr (QuPath, bfconvert)",
            url,
        ) from e


class OpenSlideBackend(Backend):
    name = "openslide"

    def __init__(
        self, url: str, *, storage_options: dict | None = None, decode_limit: int = DEFAULT_DECODE_LIMIT
    ):
        super().__init__(url)
        import openslide

        path = _local_path(url)
        if path is None:
            raise UnsupportedSlideError(
                f"{url}: OpenSlide reads local files only; download the slide first", url
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"slide not found: {url}")
        try:
            fmt = openslide.OpenSlide.detect_format(path)
        except openslide.OpenSlideError as e:
            _raise_unsupported_encoding(url, "this", e)
            raise CorruptSlideError(f"{url}: OpenSlide could not inspect the file: {e}", url) from e
        if fmt is None:
            raise UnsupportedSlideError(
                f"{url}: not a format OpenSlide knows; convert it to OME-TIFF/OME-Zarr (QuPath, bfconvert)",
                url,
            )
        try:
            self._osr = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise UnsupportedSlideError(f"{url}: {e}", url) from e
        except openslide.OpenSlideError as e:
            _raise_unsupported_encoding(url, f"a {fmt}", e)
            raise CorruptSlideError(
                f"{url}: OpenSlide detected a {fmt} slide but cannot open it ({e}); the file or one of its "
                f"companion files is damaged or incomplete — copy the slide again",
                url,
            ) from e
        self._error_cls = openslide.OpenSlideError
        self.vendor = fmt
        self.level_dimensions = [tuple(map(int, d)) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.properties = dict(self._osr.properties)
        mpp = self.properties.get("openslide.mpp-x")
        try:
            v = float(mpp) if mpp is not None else None
            self.mpp = v if v is not None and math.isfinite(v) and v > 0 else None
        except ValueError:
            self.mpp = None
        tw = [
            self.properties.get(f"openslide.level[{i}].tile-width") for i in range(len(self.level_dimensions))
        ]
        th = [
            self.properties.get(f"openslide.level[{i}].tile-height")
            for i in range(len(self.level_dimensions))
        ]
        if all(tw) and all(th):
            self.level_tile_sizes = [(int(a), int(b)) for a, b in zip(tw, th)]
        for w, h in self.level_dimensions:
            if w <= 0 or h <= 0:
                raise CorruptSlideError(f"{url}: level with empty size {w}x{h}", url)

    @property
    def associated_image_names(self) -> list[str]:
        return list(self._osr.associated_images.keys())

    def read_associated(self, name: str) -> np.ndarray:
        return np.asarray(self._osr.associated_images[name].convert("RGB"))

    def _read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        try:
            img = self._osr.read_region(loc, level, (w, h))
        except self._error_cls as e:
            raise UnreadableTileError(
                f"{self.url}: OpenSlide cannot read level {level} region at ({x}, {y}) size {w}x{h}: {e}; "
                f"the slide is damaged (OpenSlide handles stay in error: reopen after fixing the file)",
                self.url,
            ) from e
        return rgba_to_rgb_white(np.asarray(img))

    def close(self) -> None:
        self._osr.close()
