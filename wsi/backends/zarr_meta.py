"""Zarr metadata for the Zarr backend: parse a v3 ``zarr.json`` or v2 ``.zarray`` into the geometry,
chunk-key encoding and codec chain of one array, and decode one chunk with that chain (the
``slidestream.jpeg`` codec via imagecodecs, zstd/blosc/gzip/zlib/crc32c with outputs bounded by the
chunk size, :mod:`wsi.limits`). Layouts not handled here are flagged with ``fallback_reason`` and
read through zarr-python, with metadata rewritten (:func:`bounded_metadata`) so that zarr-python's
decompressors are bounded too; a codec that cannot be bounded is refused when the slide is opened.
Every key the metadata names is checked to stay inside the store (:func:`store_key`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import CorruptSlideError, UnsupportedSlideError
from ..limits import (
    SAFE_V2_FILTERS,
    HeaderError,
    jpeg_header,
    output_bound,
    strip_crc32c,
    zarr_bytes_step,
)

BOUNDED_CODEC_ID = "slidestream.bounded"  # see wsi.codecs.BoundedCodec


class _Unhandled(Exception):
    """Internal: this layout is read through zarr-python instead of the fast path."""


def store_key(url: str, key: Any, *, allow_root: bool = False) -> str:
    """``key`` (a path from the store's own metadata) as a key inside the store, or
    ``CorruptSlideError``: absolute paths, ``..``/``.`` segments, backslashes and URLs would read
    outside the store."""
    k = str(key).strip("/") if isinstance(key, (str, int)) else None
    if k == "" and allow_root:
        return ""
    parts = k.split("/") if k else [""]
    if k is None or any(p in ("", ".", "..") for p in parts) or "\\" in k or ":" in k or "\x00" in k:
        raise CorruptSlideError(
            f"{url}: the metadata names the path {key!r}, which is not a path inside the store; "
            f"the store is damaged or hostile",
            url,
        )
    return k


# --------------------------------------------------------------------------------------------
# chunk decoding
# --------------------------------------------------------------------------------------------
def _bytes_codec(cfg: dict) -> Any:
    """A bounded decoder ``(data, max_bytes) -> bytes`` for one zarr v3 bytes→bytes codec, or
    raise _Unhandled."""
    step = zarr_bytes_step(cfg.get("name"))
    if step is None:
        raise _Unhandled(cfg.get("name"))
    return step


def _v2_codec(cfg: dict) -> Any:
    """A bounded decoder for one v2 numcodecs filter/compressor config, or raise _Unhandled."""
    cid = cfg.get("id")
    step = zarr_bytes_step(cid) if cid != "crc32c" else None
    if step is not None:
        return step
    if cid in SAFE_V2_FILTERS:
        import numcodecs

        try:
            codec = numcodecs.get_codec(dict(cfg))
        except (ValueError, KeyError, TypeError) as e:
            raise _Unhandled(f"{cid} ({e})") from e
        return lambda data, _n: bytes(codec.decode(data))
    raise _Unhandled(cid)


_strip_crc32c = strip_crc32c


class _Unbounded(Exception):
    """Internal: a codec zarr-python would decode without a bound on its output."""


def _bounded_v3_codecs(codecs: list) -> list:
    out = []
    for c in codecs:
        name = c.get("name") if isinstance(c, dict) else None
        if name in ("bytes", "transpose", "crc32c", "slidestream.jpeg"):
            out.append(c)
        elif name == "sharding_indexed":
            conf = dict(c.get("configuration") or {})
            conf["codecs"] = _bounded_v3_codecs(list(conf.get("codecs") or []))
            conf["index_codecs"] = _bounded_v3_codecs(list(conf.get("index_codecs") or []))
            out.append({"name": name, "configuration": conf})
        elif zarr_bytes_step(name) is not None:
            out.append({"name": BOUNDED_CODEC_ID, "configuration": {"codec": c}})
        else:
            raise _Unbounded(name)
    return out


def bounded_metadata(meta: dict) -> dict:
    """A copy of an array's ``zarr.json`` / ``.zarray`` whose decompressors are wrapped in the
    ``slidestream.bounded`` codec (registered by :mod:`wsi.codecs`), so zarr-python decodes no
    chunk beyond its declared size. Raises _Unbounded for a codec that cannot be bounded."""
    meta = dict(meta)
    if meta.get("zarr_format") == 2:
        filters = list(meta.get("filters") or [])
        for f in filters:
            if not isinstance(f, dict) or f.get("id") not in SAFE_V2_FILTERS:
                raise _Unbounded(f.get("id") if isinstance(f, dict) else f)
        comp = meta.get("compressor")
        if comp:
            if zarr_bytes_step(comp.get("id")) is None or comp.get("id") == "crc32c":
                raise _Unbounded(comp.get("id"))
            n = math.prod(int(c) for c in meta["chunks"]) * np.dtype(meta["dtype"]).itemsize
            meta["compressor"] = {"id": BOUNDED_CODEC_ID, "codec": comp, "max_bytes": output_bound(n)}
        return meta
    meta["codecs"] = _bounded_v3_codecs(list(meta.get("codecs") or []))
    return meta


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
    bytes_codecs: list = field(default_factory=list)  # bounded decoders, decode order (already reversed)
    order: str = "C"
    shard: tuple[int, ...] | None = None  # shard shape when sharded
    index_crc: bool = False
    index_at_end: bool = True
    fallback_reason: str | None = None
    fallback_meta: dict | None = None  # the metadata zarr-python reads the fallback with (bounded)

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

    @cached_property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunk)  # uint8

    def decode(self, data: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk bytes → (ch, cw, C) uint8 (C = channels), into ``out`` when that fits. Nothing is
        allocated beyond the chunk's size: a JPEG header must declare the chunk's shape, every
        decompressor's output is bounded."""
        if self.kind == "jpeg":
            import imagecodecs

            ch, cw = self.chunk_hw
            if self.channels == 3 and out is None:
                out = np.empty((ch, cw, 3), np.uint8)  # bounds what a lying JPEG header can allocate
            if self.channels != 3:
                h, w, c, _ = jpeg_header(data)
                if (h, w) != (ch, cw) or c not in (1, self.channels):
                    raise HeaderError(
                        f"JPEG stream declares {w}x{h}x{c}, the chunk is {cw}x{ch}x{self.channels}"
                    )
            img = imagecodecs.jpeg8_decode(data, out=out if self.channels == 3 else None)
            if img.ndim == 2:
                img = img[..., None]
            if img.shape[0] != ch or img.shape[1] != cw or img.shape[2] not in (1, self.channels):
                raise ValueError(f"JPEG image {img.shape} does not fit chunk {self.chunk}")
            return img
        bound = output_bound(self.chunk_nbytes)
        for step in self.bytes_codecs:
            data = step(data, bound)
        arr = np.frombuffer(data, np.uint8)
        if arr.size != self.chunk_nbytes:
            raise ValueError(f"chunk holds {arr.size} bytes, expected {self.chunk_nbytes}")
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
            a.bytes_codecs = [_v2_codec(dict(c)) for c in reversed(codecs)]
        except _Unhandled as e:
            a.fallback_reason = f"v2 codec {e}"
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
    if (
        any(c <= 0 for c in a.chunk)
        or any(s < 0 for s in a.shape)
        or (a.shard and any(c <= 0 for c in a.shard))
    ):
        raise CorruptSlideError(f"{url}: array {key!r} declares chunks {a.chunk} for shape {a.shape}", url)
    if a.fallback_reason is not None:
        try:
            a.fallback_meta = bounded_metadata(meta)
        except _Unbounded as e:
            raise UnsupportedSlideError(
                f"{url}: array {key!r} uses codec {e}, which slidestream cannot read with bounded memory; "
                f"rewrite the store with `slidestream convert` (zstd, blosc, gzip or JPEG chunks)",
                url,
            ) from e
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
