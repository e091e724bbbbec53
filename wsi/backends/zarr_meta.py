"""Zarr metadata for the Zarr backend: parse a v3 ``zarr.json`` or v2 ``.zarray`` into the geometry,
chunk-key encoding and codec chain of one array, and decode one chunk with that chain (the
``slidestream.jpeg`` codec via imagecodecs, zstd/blosc/gzip/crc32c via numcodecs). Layouts not
handled here are flagged with ``fallback_reason`` and read through zarr-python."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import CorruptSlideError, UnsupportedSlideError


class _Unhandled(Exception):
    """Internal: this layout is read through zarr-python instead of the fast path."""


# --------------------------------------------------------------------------------------------
# chunk decoding
# --------------------------------------------------------------------------------------------
def _bytes_codec(cfg: dict) -> Any:
    """A numcodecs object decoding one zarr v3 bytes→bytes codec, or raise _Unhandled."""
    import numcodecs

    name, conf = cfg.get("name"), cfg.get("configuration") or {}
    if name == "zstd":
        return numcodecs.Zstd(level=conf.get("level", 0))
    if name == "blosc":
        return numcodecs.Blosc()
    if name == "gzip":
        return numcodecs.GZip(level=conf.get("level", 5))
    if name == "crc32c":
        return "crc32c"
    raise _Unhandled(name)


def _strip_crc32c(data: bytes) -> bytes:
    import google_crc32c

    body, crc = data[:-4], int.from_bytes(data[-4:], "little")
    if google_crc32c.value(body) != crc:
        raise ValueError("crc32c checksum mismatch")
    return body


@dataclass
class _Array:
    """One multiscale level: geometry, key encoding and how its chunks decode."""

    key: str  # path of the array inside the store
    shape: tuple[int, ...]
    axes: list[str]
    chunk: tuple[int, ...]  # inner chunk shape
    fill: int
    v2: bool
    sep: str  # chunk key separator
    kind: str  # "jpeg" | "raw"
    jpeg_layout: str = "YXC"
    bytes_codecs: list = field(default_factory=list)  # decode order (already reversed)
    order: str = "C"
    shard: tuple[int, ...] | None = None  # shard shape when sharded
    index_crc: bool = False
    index_at_end: bool = True
    fallback_reason: str | None = None

    @cached_property
    def yi(self) -> int:
        return self.axes.index("y")

    @cached_property
    def xi(self) -> int:
        return self.axes.index("x")

    @cached_property
    def ci(self) -> int | None:
        return self.axes.index("c") if "c" in self.axes else None

    @cached_property
    def channels(self) -> int:
        return 1 if self.ci is None else self.shape[self.ci]

    @cached_property
    def chunk_hw(self) -> tuple[int, int]:
        return self.chunk[self.yi], self.chunk[self.xi]

    @cached_property
    def size(self) -> tuple[int, int]:
        return self.shape[self.xi], self.shape[self.yi]

    def chunk_key(self, coords: tuple[int, ...]) -> str:
        if self.v2:
            return (
                f"{self.key}/{self.sep.join(map(str, coords))}"
                if self.key
                else self.sep.join(map(str, coords))
            )
        body = self.sep.join(("c", *map(str, coords)))
        return f"{self.key}/{body}" if self.key else body

    def coords(self, cy: int, cx: int) -> tuple[int, ...]:
        out = [0] * len(self.shape)
        out[self.yi], out[self.xi] = cy, cx
        return tuple(out)

    def decode(self, data: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk bytes → (ch, cw, C) uint8 (C = channels), into ``out`` when that fits."""
        if self.kind == "jpeg":
            import imagecodecs

            ch, cw = self.chunk_hw
            if self.channels == 3 and out is None:
                out = np.empty((ch, cw, 3), np.uint8)  # bounds what a lying JPEG header can allocate
            img = imagecodecs.jpeg8_decode(data, out=out if self.channels == 3 else None)
            if img.ndim == 2:
                img = img[..., None]
            if img.shape[0] != ch or img.shape[1] != cw or img.shape[2] not in (1, self.channels):
                raise ValueError(f"JPEG image {img.shape} does not fit chunk {self.chunk}")
            return img
        for c in self.bytes_codecs:
            data = _strip_crc32c(data) if c == "crc32c" else c.decode(data)
        arr = np.frombuffer(data, np.uint8)
        if arr.size != math.prod(self.chunk):
            raise ValueError(f"chunk holds {arr.size} bytes, expected {math.prod(self.chunk)}")
        arr = arr.reshape(self.chunk, order=self.order)
        return _to_yxc(arr, self)


def _to_yxc(arr: np.ndarray, a: _Array) -> np.ndarray:
    """An array with ``a.axes`` (other axes at index 0) → (h, w, C) view."""
    index = tuple(slice(None) if n in ("y", "x", "c") else 0 for n in a.axes)
    arr = arr[index]
    kept = [n for n in a.axes if n in ("y", "x", "c")]
    if "c" not in kept:
        return arr.transpose(kept.index("y"), kept.index("x"))[..., None]
    return arr.transpose(kept.index("y"), kept.index("x"), kept.index("c"))


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.shape[2] == 3:
        return img
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def parse_array(key: str, meta: dict, axes: list[str], url: str) -> _Array:
    """Build an :class:`_Array` from a v3 ``zarr.json`` or v2 ``.zarray`` document."""
    v2 = meta.get("zarr_format") == 2
    shape = tuple(int(s) for s in meta["shape"])
    if len(axes) != len(shape):
        raise CorruptSlideError(f"{url}: array {key!r} has {len(shape)} dims but {len(axes)} axes", url)
    if v2:
        dtype = np.dtype(meta["dtype"])
        chunk = tuple(int(c) for c in meta["chunks"])
        sep = meta.get("dimension_separator", ".")
        fill = meta.get("fill_value")
        a = _Array(key, shape, axes, chunk, int(fill or 0), True, sep, "raw", order=meta.get("order", "C"))
        codecs = [*(meta.get("filters") or []), *([meta["compressor"]] if meta.get("compressor") else [])]
        try:
            import numcodecs

            a.bytes_codecs = [numcodecs.get_codec(dict(c)) for c in reversed(codecs)]
        except (ValueError, KeyError, TypeError) as e:
            a.fallback_reason = f"v2 codec: {e}"
    else:
        dtype = np.dtype(meta["data_type"]) if meta.get("data_type") in ("uint8", "int8") else None
        grid = meta["chunk_grid"]
        if grid.get("name") != "regular":
            raise UnsupportedSlideError(f"{url}: array {key!r} uses chunk grid {grid.get('name')!r}", url)
        outer = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        kenc = meta.get("chunk_key_encoding", {"name": "default"})
        sep = (kenc.get("configuration") or {}).get(
            "separator", "/" if kenc.get("name") == "default" else "."
        )
        codecs = list(meta["codecs"])
        shard = None
        index_crc, index_at_end = False, True
        if codecs and codecs[0].get("name") == "sharding_indexed":
            conf = codecs[0]["configuration"]
            shard, chunk, codecs = outer, tuple(int(c) for c in conf["chunk_shape"]), list(conf["codecs"])
            index_codecs = [c.get("name") for c in conf.get("index_codecs", [])]
            index_crc = "crc32c" in index_codecs
            index_at_end = conf.get("index_location", "end") == "end"
            if [n for n in index_codecs if n not in ("bytes", "crc32c")]:
                raise UnsupportedSlideError(
                    f"{url}: shard index codecs {index_codecs} are not supported", url
                )
        else:
            chunk = outer
        if kenc.get("name") == "v2":
            a = _Array(key, shape, axes, chunk, 0, True, sep, "raw", shard=shard)
        else:
            a = _Array(key, shape, axes, chunk, 0, False, sep, "raw", shard=shard)
        a.index_crc, a.index_at_end = index_crc, index_at_end
        fill = meta.get("fill_value", 0)
        a.fill = int(fill) if isinstance(fill, (int, float)) else 0
        first = codecs[0].get("name") if codecs else None
        try:
            if first == "slidestream.jpeg":
                a.kind = "jpeg"
                layout = (codecs[0].get("configuration") or {}).get("layout")
                a.jpeg_layout = layout or (
                    "YX" if len(chunk) == 2 else "CYX" if chunk[0] in (1, 3) else "YXC"
                )
                if len(codecs) > 1:
                    raise _Unhandled("codecs after slidestream.jpeg")
            elif first == "bytes":
                a.bytes_codecs = [_bytes_codec(c) for c in reversed(codecs[1:])]
            else:
                raise _Unhandled(str(first))
        except _Unhandled as e:
            a.fallback_reason = f"codec {e}"
    if dtype is None or dtype != np.uint8:
        raise UnsupportedSlideError(
            f"{url}: array {key!r} has data type {meta.get('dtype', meta.get('data_type'))}; slidestream "
            f"reads 8-bit RGB/gray images (rescale to uint8 when converting)",
            url,
        )
    if a.ci is not None and a.channels not in (1, 3, 4):
        raise UnsupportedSlideError(
            f"{url}: array {key!r} has {a.channels} channels; expected 1, 3 or 4", url
        )
    if a.ci is not None and a.chunk[a.ci] != a.channels and a.fallback_reason is None:
        a.fallback_reason = "chunks split along the channel axis"
    return a


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------
def _axis_names(axes: list) -> list[str]:
    return [(a["name"] if isinstance(a, dict) else str(a)).lower() for a in axes]


def _scale(transforms: list | None) -> list[float] | None:
    for t in transforms or []:
        if t.get("type") == "scale" and "scale" in t:
            return [float(s) for s in t["scale"]]
    return None


def _default_axes(shape: Sequence[int]) -> list[str]:
    if len(shape) == 2:
        return ["y", "x"]
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return ["y", "x", "c"]
    if len(shape) == 3:
        return ["c", "y", "x"]
    return ["t", "c", "z", "y", "x"][-len(shape) :]
