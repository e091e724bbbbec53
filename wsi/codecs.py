"""A JPEG array→bytes codec for zarr v3, registered as ``"slidestream.jpeg"``.

zarr v3 ships no JPEG codec. Importing this module registers :class:`JpegCodec` with
``zarr.registry.register_codec("slidestream.jpeg", ...)`` and does nothing else. The Zarr backend
and the converter import it; any other program that wants zarr-python to read a slidestream JPEG
store must ``import wsi.codecs`` first.

On disk (the ``codecs`` entry of an array's ``zarr.json``)::

    {"name": "slidestream.jpeg",
     "configuration": {"quality": 90, "colorspace": "ycbcr", "layout": "CYX"}}

Each chunk is **one plain baseline JPEG file** (SOI ... EOI) holding the chunk's pixels as an
interleaved (height, width, channels) image — any JPEG decoder reads it without slidestream:

- ``layout`` says how the chunk's array axes map onto the JPEG image: ``"CYX"`` (chunk shape
  (3, h, w): transpose the decoded (h, w, 3) image to (2, 0, 1)), ``"YXC"`` (chunk shape
  (h, w, 3) or (h, w, 1)) or ``"YX"`` (grayscale, chunk shape (h, w)). When not given it is
  inferred from the chunk shape.
- ``colorspace`` is how RGB is coded inside the JPEG: ``"ycbcr"`` (the usual, smaller) or ``"rgb"``
  (no colour transform; libjpeg then writes an Adobe APP14 marker with transform 0 so standard
  decoders return RGB). Decoding does not depend on this setting: the stream's own markers say it.
  Chunks copied from Aperio "JPEG/RGB" tiles carry that same APP14 marker.
- ``quality`` (1..100) is used when encoding only.

Chunks at the array edge are full chunk size (zarr's rule), padded with the fill value.
Only ``uint8`` arrays are supported. Decoding checks the stream's frame header against the chunk
shape before anything is allocated (:mod:`wsi.limits`).

The module also registers ``"slidestream.bounded"`` (:class:`BoundedCodec` with zarr,
:class:`BoundedNumcodec` with numcodecs): a read-only wrapper around a zstd/gzip/zlib/blosc codec
whose output is bounded by the chunk size. It is never written to a store: the Zarr backend
rewrites the metadata of arrays it reads through zarr-python to use it
(:func:`wsi.backends.zarr_meta.bounded_metadata`), so a decompression bomb fails instead of
allocating gigabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import imagecodecs
import numcodecs
import numpy as np
from numcodecs.abc import Codec as _Numcodec
from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

from .backends.zarr_meta import BOUNDED_CODEC_ID
from .limits import HeaderError, jpeg_header, output_bound, zarr_bytes_step

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec

JPEG_CODEC_ID = "slidestream.jpeg"
LAYOUTS = ("CYX", "YXC", "YX")
COLORSPACES = ("ycbcr", "rgb")


def infer_layout(shape: tuple[int, ...]) -> str:
    """Chunk shape → layout: (h, w) "YX"; (3|1, h, w) "CYX"; (h, w, 3|1) "YXC"."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        if shape[-1] in (1, 3):
            return "YXC"
        if shape[0] in (1, 3):
            return "CYX"
    raise ValueError(f"{JPEG_CODEC_ID}: chunk shape {shape} is not an image (h, w), (c, h, w) or (h, w, c)")


def encode_jpeg(image: np.ndarray, *, quality: int = 90, colorspace: str = "ycbcr") -> bytes:
    """JPEG bytes of an (h, w), (h, w, 1) or (h, w, 3) uint8 image."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and colorspace == "rgb":
        return bytes(imagecodecs.jpeg8_encode(image, level=quality, colorspace="rgb", outcolorspace="rgb"))
    return bytes(imagecodecs.jpeg8_encode(image, level=quality))


def decode_jpeg(data: bytes | memoryview, out: np.ndarray | None = None) -> np.ndarray:
    """Decode one JPEG stream to (h, w) or (h, w, 3) uint8 (into ``out`` when given)."""
    return imagecodecs.jpeg8_decode(data, out=out)


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Array→bytes codec: each uint8 chunk is one baseline JPEG image (see module docstring)."""

    is_fixed_size = False

    quality: int = 90
    colorspace: str = "ycbcr"
    layout: str | None = None

    def __init__(self, *, quality: int = 90, colorspace: str = "ycbcr", layout: str | None = None) -> None:
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"{JPEG_CODEC_ID}: quality must be an int in 1..100, got {quality!r}")
        if colorspace not in COLORSPACES:
            raise ValueError(f"{JPEG_CODEC_ID}: colorspace must be one of {COLORSPACES}, got {colorspace!r}")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"{JPEG_CODEC_ID}: layout must be one of {LAYOUTS}, got {layout!r}")
        object.__setattr__(self, "quality", quality)
        object.__setattr__(self, "colorspace", colorspace)
        object.__setattr__(self, "layout", layout)

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, JPEG_CODEC_ID, require_configuration=False)
        return cls(**(config or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        config: dict[str, JSON] = {"quality": self.quality, "colorspace": self.colorspace}
        if self.layout is not None:
            config["layout"] = self.layout
        return {"name": JPEG_CODEC_ID, "configuration": config}

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> Self:
        if self.layout is None:
            return replace(self, layout=infer_layout(tuple(array_spec.shape)))
        return self

    def validate(self, *, shape, dtype, chunk_grid) -> None:  # noqa: ANN001 - zarr's signature
        if dtype.to_native_dtype() != np.dtype("uint8"):
            raise ValueError(f"{JPEG_CODEC_ID} encodes uint8 arrays only, not {dtype}")

    # --- chunk <-> image ---------------------------------------------------------------------
    def _layout(self, shape: tuple[int, ...]) -> str:
        return self.layout or infer_layout(shape)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        shape = tuple(chunk_spec.shape)
        layout = self._layout(shape)
        data = chunk_bytes.as_numpy_array()
        h, w, _c, _p = jpeg_header(data.tobytes())
        want = shape[-2:] if layout in ("CYX", "YX") else shape[:2]
        if (h, w) != tuple(want):
            raise HeaderError(
                f"{JPEG_CODEC_ID}: JPEG stream declares {w}x{h}, the chunk is {want[1]}x{want[0]}"
            )
        img = decode_jpeg(data)
        if img.ndim == 2 and layout != "YX":
            img = img[..., None]
        if layout == "CYX":
            img = img.transpose(2, 0, 1)
        if img.shape != shape:
            if (
                img.ndim == 3
                and layout == "CYX"
                and img.shape[0] == 1
                and shape[0] == 3
                or img.ndim == 3
                and layout == "YXC"
                and img.shape[2] == 1
                and shape[2] == 3
            ):
                img = np.broadcast_to(img, shape)
            else:
                raise ValueError(f"{JPEG_CODEC_ID}: JPEG image {img.shape} does not fit chunk shape {shape}")
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(np.ascontiguousarray(img))

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        arr = np.asarray(chunk_array.as_numpy_array())
        layout = self._layout(tuple(arr.shape))
        if layout == "CYX":
            arr = arr.transpose(1, 2, 0)
        data = encode_jpeg(np.ascontiguousarray(arr), quality=self.quality, colorspace=self.colorspace)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError


register_codec(JPEG_CODEC_ID, JpegCodec)


def _bounded_step(codec: dict, key: str):
    step = zarr_bytes_step(codec.get(key) if isinstance(codec, dict) else None)
    if step is None:
        raise ValueError(f"{BOUNDED_CODEC_ID}: cannot bound codec {codec!r}")
    return step


@dataclass(frozen=True)
class BoundedCodec(BytesBytesCodec):
    """Read-only bytes→bytes codec: decodes the wrapped zstd/gzip/zlib/blosc ``codec`` (its zarr v3
    JSON) into at most :func:`wsi.limits.output_bound` of the chunk's size."""

    is_fixed_size = False

    codec: dict

    def __init__(self, *, codec: dict) -> None:
        _bounded_step(codec, "name")
        object.__setattr__(self, "codec", dict(codec))

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, BOUNDED_CODEC_ID)
        return cls(**config)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": BOUNDED_CODEC_ID, "configuration": {"codec": self.codec}}

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        n = math.prod(chunk_spec.shape) * chunk_spec.dtype.to_native_dtype().itemsize
        out = _bounded_step(self.codec, "name")(chunk_bytes.to_bytes(), output_bound(n))
        return chunk_spec.prototype.buffer.from_bytes(out)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer | None:
        raise NotImplementedError(f"{BOUNDED_CODEC_ID} is read-only")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError


class BoundedNumcodec(_Numcodec):
    """The same wrapper for zarr v2 arrays (numcodecs): ``codec`` is the wrapped compressor's
    config, ``max_bytes`` the most one chunk may decode to."""

    codec_id = BOUNDED_CODEC_ID

    def __init__(self, codec: dict, max_bytes: int):
        _bounded_step(codec, "id")
        self.codec, self.max_bytes = dict(codec), int(max_bytes)

    def decode(self, buf, out=None):
        data = _bounded_step(self.codec, "id")(bytes(memoryview(buf)), self.max_bytes)
        if out is not None:
            dst = memoryview(out).cast("B")
            dst[: len(data)] = data
            return out
        return data

    def encode(self, buf):
        raise NotImplementedError(f"{BOUNDED_CODEC_ID} is read-only")

    def get_config(self) -> dict:
        return {"id": self.codec_id, "codec": self.codec, "max_bytes": self.max_bytes}


register_codec(BOUNDED_CODEC_ID, BoundedCodec)
numcodecs.register_codec(BoundedNumcodec)
