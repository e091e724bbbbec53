"""OpenSlide backend: for formats the byte-range backends cannot map (MRXS, VMS, SCN, BIF, DICOM,
NDPI, ...) and the pixel reference in tests. Local files only (OpenSlide opens paths).

OpenSlide allocates what a file declares, and an allocation GLib cannot make aborts the process. So
the geometry OpenSlide reports is checked against the decode limit before any pixel is read (each
level's tile size, each associated image's size), and every OpenSlide error is wrapped in a
``SlideError`` subclass naming the file."""

from __future__ import annotations

import math
import os

import numpy as np

from ..byteio import RetryPolicy, local_path
from ..errors import CorruptSlideError, DecodeLimitError, UnreadableTileError, UnsupportedSlideError
from .base import DEFAULT_DECODE_LIMIT, Backend


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
        self,
        url: str,
        *,
        storage_options: dict | None = None,
        decode_limit: int = DEFAULT_DECODE_LIMIT,
        retry: RetryPolicy | None = None,
    ):
        super().__init__(url)
        import openslide

        path = local_path(url)
        if path is None:
            raise UnsupportedSlideError(
                f"{url}: OpenSlide reads local files only; download the slide first", url
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"slide not found: {url}")
        self._decode_limit = decode_limit
        self._error_cls = openslide.OpenSlideError
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
        try:
            self._describe(fmt)
        except openslide.OpenSlideError as e:
            self._osr.close()
            raise CorruptSlideError(f"{url}: OpenSlide cannot describe the {fmt} slide ({e})", url) from e
        except BaseException:
            self._osr.close()
            raise

    def _describe(self, fmt: str) -> None:
        """Metadata, and the geometry checks that must pass before OpenSlide reads any pixel."""
        url = self.url
        self.vendor = fmt
        self.level_dimensions = [tuple(map(int, d)) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.properties = dict(self._osr.properties)
        if not self.level_dimensions:
            raise CorruptSlideError(f"{url}: OpenSlide reports no levels", url)
        mpp = self.properties.get("openslide.mpp-x")
        try:
            v = float(mpp) if mpp is not None else None
            self.mpp = v if v is not None and math.isfinite(v) and v > 0 else None
        except ValueError:
            self.mpp = None
        n = len(self.level_dimensions)
        tw = [self.properties.get(f"openslide.level[{i}].tile-width") for i in range(n)]
        th = [self.properties.get(f"openslide.level[{i}].tile-height") for i in range(n)]
        if all(tw) and all(th):
            try:
                self.level_tile_sizes = [(int(a), int(b)) for a, b in zip(tw, th)]
            except ValueError as e:
                raise CorruptSlideError(f"{url}: OpenSlide reports a malformed tile size ({e})", url) from e
        for i, ((w, h), ds) in enumerate(zip(self.level_dimensions, self.level_downsamples)):
            if w <= 0 or h <= 0:
                raise CorruptSlideError(f"{url}: level with empty size {w}x{h}", url)
            if not (math.isfinite(ds) and ds > 0):
                raise CorruptSlideError(f"{url}: level {i} has downsample {ds}", url)
        for i, (w, h) in enumerate(self.level_tile_sizes or []):
            self._check_size(f"level {i} tiles of", w, h)
        self._assoc_sizes = {}
        names = list(self._osr.associated_images.keys())
        try:
            from openslide import lowlevel

            handle = self._osr._osr  # openslide-python keeps the C handle here; the sizes are metadata
            for name in names:
                self._assoc_sizes[name] = tuple(
                    map(int, lowlevel.get_associated_image_dimensions(handle, name))
                )
        except (AttributeError, ImportError):
            self._assoc_sizes = {}
        self._assoc_names = names

    def _check_size(self, what: str, w: int, h: int) -> None:
        nbytes = int(w) * int(h) * 4  # OpenSlide decodes to 32-bit ARGB
        if w <= 0 or h <= 0:
            raise CorruptSlideError(f"{self.url}: OpenSlide reports {what} {w}x{h} pixels", self.url)
        if nbytes > self._decode_limit:
            raise DecodeLimitError(
                f"{self.url}: OpenSlide reports {what} {w}x{h} pixels ({nbytes / 2**20:.0f} MiB decoded), above "
                f"the decode limit of {self._decode_limit / 2**20:.0f} MiB; raise decode_limit= if you trust "
                f"this file",
                self.url,
            )

    @property
    def associated_image_names(self) -> list[str]:
        return list(self._assoc_names)

    @property
    def associated_image_sizes(self) -> dict[str, tuple[int, int]]:
        return dict(self._assoc_sizes)

    def read_associated(self, name: str) -> np.ndarray:
        if name not in self._assoc_names:
            raise KeyError(name)
        size = self._assoc_sizes.get(name)
        if size is None:
            raise DecodeLimitError(f"{self.url}: the size of associated image {name!r} is unknown", self.url)
        self._check_size(f"associated image {name!r} of", *size)
        try:
            img = self._osr.associated_images[name]
        except self._error_cls as e:
            raise UnreadableTileError(
                f"{self.url}: OpenSlide cannot read associated image {name!r}: {e}; the slide is damaged",
                self.url,
            ) from e
        return np.asarray(img.convert("RGB"))

    def _read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        # the first level-0 pixel at or after level pixel (x, y): OpenSlide then draws the level from
        # a position in [x, x + 1) (exactly x on integer levels), never before the requested pixel
        loc = (math.ceil(x * ds - 1e-9), math.ceil(y * ds - 1e-9))
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
