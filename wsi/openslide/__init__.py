"""An OpenSlide drop-in on slidestream's readers: ``import wsi.openslide as openslide``.

Code written for openslide-python (CLAM, TRIDENT, eva, Deep Zoom viewers) runs unchanged on
slidestream's backends (byte-range TIFF reads, Zarr, remote URLs, TIFFs OpenSlide refuses) by
changing that one import. The objects behave as openslide-python's do:

- :class:`OpenSlide` (also for ``bytes`` and ``os.PathLike`` paths and fsspec URLs), :func:`open_slide`
  (falls back to :class:`ImageSlide` for plain images), ``detect_format``, the exceptions
  (openslide-python's own classes, so ``except openslide.OpenSlideError`` catches both), the
  ``PROPERTY_NAME_*`` constants, :class:`OpenSlideCache` and ``set_cache``.
- ``read_region`` returns an RGBA PIL image, transparent outside the level; a level outside
  ``0..level_count-1`` gives a transparent image, a zero-sized region an empty one, a negative size
  :class:`OpenSlideError`; the ICC profile is attached as ``info['icc_profile']``.
- Properties: the vendor's keys plus the ``openslide.*`` and ``tiff.*`` keys OpenSlide reports
  (comment, icc-size, associated image sizes, level keys, mpp, objective power, bounds of sparse
  TIFFs, quickhash-1), numbers formatted as OpenSlide formats them; ``color_profile``.
- Errors are sticky: once a read fails, every later call except ``close()`` raises the same
  :class:`OpenSlideError`. After ``close()`` every call (a second ``close()`` included) raises
  ``ctypes.ArgumentError('argument 1: ValueError: Passing closed slide object')``, as
  openslide-python's handle checks do.

Deliberate differences (see ``tests/test_openslide_compat.py`` for the measured ones):

- Reads above level 0 at a location that is not a multiple of the level's downsample are sampled
  at the fractional offset with bilinear weights, as OpenSlide's cairo painting does, in floating
  point rather than pixman's fixed point: pixels differ from OpenSlide's by at most a few grey
  levels (measured in ``tests/test_openslide_compat.py``). Integer offsets are identical.
- Tiles a sparse TIFF does not store are white and opaque, not transparent (slidestream's readers
  return RGB); the area outside the level is transparent as in OpenSlide.
- ``set_cache`` accepts an :class:`OpenSlideCache` and does nothing: slidestream's readers keep no
  decoded-tile cache (the OS page cache holds the encoded bytes).
- One ``read_region`` may not exceed 2^28 pixels (:data:`wsi.slide.MAX_REGION_PIXELS`).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import openslide as _openslide
from openslide import (
    PROPERTY_NAME_BACKGROUND_COLOR,
    PROPERTY_NAME_BARCODE,
    PROPERTY_NAME_BOUNDS_HEIGHT,
    PROPERTY_NAME_BOUNDS_WIDTH,
    PROPERTY_NAME_BOUNDS_X,
    PROPERTY_NAME_BOUNDS_Y,
    PROPERTY_NAME_COMMENT,
    PROPERTY_NAME_MPP_X,
    PROPERTY_NAME_MPP_Y,
    PROPERTY_NAME_OBJECTIVE_POWER,
    PROPERTY_NAME_QUICKHASH1,
    PROPERTY_NAME_VENDOR,
    AbstractSlide,
    ImageSlide,
    OpenSlideError,
    OpenSlideUnsupportedFormatError,
    OpenSlideVersionError,
)
from PIL import Image

from ..errors import SlideError, UnsupportedSlideError
from ..slide import Slide
from ..slide import open_slide as _wsi_open
from ._tiffprops import format_double, tiff_properties

__version__ = _openslide.__version__
__library_version__ = f"slidestream (openslide-python {_openslide.__version__} API)"

__all__ = [
    "PROPERTY_NAME_BACKGROUND_COLOR",
    "PROPERTY_NAME_BARCODE",
    "PROPERTY_NAME_BOUNDS_HEIGHT",
    "PROPERTY_NAME_BOUNDS_WIDTH",
    "PROPERTY_NAME_BOUNDS_X",
    "PROPERTY_NAME_BOUNDS_Y",
    "PROPERTY_NAME_COMMENT",
    "PROPERTY_NAME_MPP_X",
    "PROPERTY_NAME_MPP_Y",
    "PROPERTY_NAME_OBJECTIVE_POWER",
    "PROPERTY_NAME_QUICKHASH1",
    "PROPERTY_NAME_VENDOR",
    "AbstractSlide",
    "ImageSlide",
    "OpenSlide",
    "OpenSlideCache",
    "OpenSlideError",
    "OpenSlideUnsupportedFormatError",
    "OpenSlideVersionError",
    "open_slide",
]

_CLOSED = "argument 1: ValueError: Passing closed slide object"
_NUMERIC = (".downsample", "mpp-x", "mpp-y")


class OpenSlideCache:
    """openslide-python's tile-cache object; accepted by ``set_cache``, which does nothing here."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError("Incorrect type")
        if capacity < 0:
            raise ValueError("Value out of range")
        self._capacity = capacity

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self._capacity!r})"


class _LiveMap(Mapping):
    """A mapping whose every access goes through the slide's state checks (closed, sticky error)."""

    def __init__(self, slide: OpenSlide, get_keys, get_item):
        self._slide, self._keys, self._get = slide, get_keys, get_item

    def __getitem__(self, key: str):
        self._slide._check()
        if key not in self._keys():
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        self._slide._check()
        return iter(self._keys())

    def __len__(self) -> int:
        self._slide._check()
        return len(self._keys())

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {dict(self)!r}>"


class OpenSlide(AbstractSlide):
    """An open whole-slide image, read by slidestream, with openslide-python's behaviour.

    ``filename`` may be a ``str``, ``bytes`` or ``os.PathLike`` path, or any URL
    :func:`wsi.open_slide` takes (an addition). Keyword arguments go to :func:`wsi.open_slide`."""

    def __init__(self, filename: str | bytes | os.PathLike, **open_options: Any):
        AbstractSlide.__init__(self)
        self._filename = filename
        path = os.fsdecode(filename) if isinstance(filename, bytes) else os.fspath(filename)
        try:
            self._slide: Slide = _wsi_open(path, **open_options)
        except (FileNotFoundError, UnsupportedSlideError):
            raise OpenSlideUnsupportedFormatError("Unsupported or missing image file") from None
        except (SlideError, OSError, ValueError) as e:
            raise OpenSlideError(str(e)) from None
        self._path = path
        self._closed = False
        self._error: str | None = None
        self._lock = threading.Lock()
        self._props: dict[str, str] | None = None
        self._associated: dict[str, Image.Image] = {}
        self._profile = self._load_profile()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self._filename!r})"

    @classmethod
    def detect_format(cls, filename: str | bytes | os.PathLike) -> str | None:
        """The vendor of a slide file, or None: slidestream's reading, else OpenSlide's detection."""
        path = os.fsdecode(filename) if isinstance(filename, bytes) else os.fspath(filename)
        try:
            with _wsi_open(path) as s:
                return s.vendor
        except (SlideError, OSError, ValueError):
            pass
        try:
            return _openslide.OpenSlide.detect_format(path)
        except (OSError, ValueError, ctypes.ArgumentError):
            return None

    # --- state ----------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise ctypes.ArgumentError(_CLOSED)
        if self._error is not None:
            raise OpenSlideError(self._error)

    def _fail(self, e: BaseException) -> None:
        """Latch the first failure, as OpenSlide does, and raise it."""
        with self._lock:
            if self._error is None:
                self._error = str(e) or type(e).__name__
        raise OpenSlideError(self._error) from None

    def close(self) -> None:
        """Close the slide; any later use, a second close included, raises ``ctypes.ArgumentError``."""
        if self._closed:
            raise ctypes.ArgumentError(_CLOSED)
        self._closed = True
        self._slide.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False:
            self._slide.close()

    # --- geometry -------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        self._check()
        return self._slide.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        self._check()
        return tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        self._check()
        return tuple(float(d) for d in self._slide.level_downsamples)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """OpenSlide's rule: the last level whose downsample is not above ``downsample``."""
        ds = self.level_downsamples
        if downsample < ds[0]:
            return 0
        for i in range(1, len(ds)):
            if downsample < ds[i]:
                return i - 1
        return len(ds) - 1

    # --- metadata -------------------------------------------------------------------------------
    @property
    def properties(self) -> Mapping[str, str]:
        return _LiveMap(self, lambda: list(self._properties()), lambda k: self._properties()[k])

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        return _LiveMap(self, lambda: list(self._slide.associated_images), self._associated_image)

    def _associated_image(self, name: str) -> Image.Image:
        try:
            rgb = self._slide.associated_images[name]
        except KeyError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure latches, as in OpenSlide
            self._fail(e)
        image = Image.fromarray(np.ascontiguousarray(rgb)).convert("RGBA")
        if self._profile is not None:
            image.info["icc_profile"] = self._profile
        return image

    def _properties(self) -> dict[str, str]:
        if self._props is None:
            props = dict(self._slide.properties)
            if self._slide.backend == "tiff":
                extra, _ = tiff_properties(
                    self._path,
                    list(self.level_dimensions),
                    list(self._slide.associated_images),
                    props.get(PROPERTY_NAME_VENDOR),
                )
                props.pop("aperio.Header", None)  # slidestream's own key; OpenSlide has none
                props.update(extra)
            for key, value in list(props.items()):
                if key.startswith("openslide.") and key.endswith(_NUMERIC):
                    props[key] = _number(value)
            self._props = dict(sorted(props.items()))
        return self._props

    def _load_profile(self) -> bytes | None:
        if self._slide.backend == "tiff":
            try:
                return tiff_properties(self._path, [], [], None)[1]
            except (OSError, ValueError):
                return None
        if self._slide.backend == "openslide":
            # the profile's bytes as OpenSlide hands them out (slidestream's OpenSlide backend does
            # not expose them; a Backend.icc_profile hook would avoid this second handle)
            from openslide import lowlevel

            handle = lowlevel.open(self._path)
            try:
                return lowlevel.read_icc_profile(handle) if lowlevel.read_icc_profile.available else None
            finally:
                lowlevel.close(handle)
        return None

    # --- pixels ---------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA image of ``size`` level pixels with its top-left at level-0 ``location``.

        Where ``location / downsample`` is fractional the level is sampled at that offset with
        bilinear weights on premultiplied RGBA, as OpenSlide's cairo painting does."""
        self._check()
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise OpenSlideError(f"negative width ({w}) or negative height ({h}) not allowed")
        if w == 0 or h == 0:
            return Image.new("RGBA", (w, h))
        out = np.zeros((h, w, 4), np.uint8)
        if isinstance(level, (int, np.integer)) and 0 <= level < self._slide.level_count:
            ds = self._slide.level_downsamples[level]
            x, y = location
            # as OpenSlide: a negative origin shifts the destination by the whole level pixels it
            # spans (truncated) and the level is then read from 0
            tx = int(-x / ds) if x < 0 else 0
            ty = int(-y / ds) if y < 0 else 0
            x, y = max(x, 0), max(y, 0)
            if w - tx > 0 and h - ty > 0:
                out[ty:, tx:] = self._sample(level, x / ds, y / ds, w - tx, h - ty)
        region = Image.fromarray(out, "RGBA")
        if self._profile is not None:
            region.info["icc_profile"] = self._profile
        return region

    def _sample(self, level: int, fx: float, fy: float, w: int, h: int) -> np.ndarray:
        """(h, w, 4) level pixels from the fractional level position (fx, fy)."""
        x, y = math.floor(fx), math.floor(fy)
        ax, ay = fx - x, fy - y
        if ax == 0 and ay == 0:
            return self._rgba(level, x, y, w, h)
        return _bilinear(self._rgba(level, x, y, w + 1, h + 1), ax, ay)

    def _rgba(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 4) uint8 of level pixels (x, y)...; transparent outside the level."""
        out = np.zeros((h, w, 4), np.uint8)
        ds = self._slide.level_downsamples[level]
        lw, lh = self._slide.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 > x0 and y1 > y0:
            try:
                rgb = self._slide.read_region((x0 * ds, y0 * ds), level, (x1 - x0, y1 - y0))
            except Exception as e:  # noqa: BLE001 - any read failure latches, as in OpenSlide
                self._fail(e)
            out[y0 - y : y1 - y, x0 - x : x1 - x, :3] = rgb
            out[y0 - y : y1 - y, x0 - x : x1 - x, 3] = 255
        return out

    def set_cache(self, cache: OpenSlideCache) -> None:
        """Accepts an :class:`OpenSlideCache` (or openslide-python's); slidestream keeps no tile cache."""
        self._check()
        if not isinstance(cache, (OpenSlideCache, _openslide.OpenSlideCache)):
            raise TypeError("Not a cache object")


def _number(value: str) -> str:
    """A numeric property in OpenSlide's format; a value that is not a number is kept as written."""
    try:
        return format_double(float(value))
    except ValueError:
        return value


def _bilinear(rgba: np.ndarray, ax: float, ay: float) -> np.ndarray:
    """(h+1, w+1, 4) uint8 -> (h, w, 4) sampled ``(ax, ay)`` of a pixel right/down of the origin,
    interpolating premultiplied colour (transparent neighbours do not darken an edge)."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    pm = np.concatenate([rgba[..., :3].astype(np.float32) * a, rgba[..., 3:4].astype(np.float32)], -1)
    t = (pm[:-1, :-1] * (1 - ax) + pm[:-1, 1:] * ax) * (1 - ay) + (
        pm[1:, :-1] * (1 - ax) + pm[1:, 1:] * ax
    ) * ay
    alpha = t[..., 3:4]
    rgb = np.where(alpha > 0, t[..., :3] * 255.0 / np.maximum(alpha, 1e-6), 0.0)
    return np.clip(np.rint(np.concatenate([rgb, alpha], -1)), 0, 255).astype(np.uint8)


def open_slide(filename: str | bytes | os.PathLike) -> OpenSlide | ImageSlide:
    """A whole-slide image as :class:`OpenSlide`, anything else PIL opens as :class:`ImageSlide`."""
    try:
        return OpenSlide(filename)
    except OpenSlideUnsupportedFormatError:
        return ImageSlide(filename)
