"""Feature files: one ``<slide_id>.h5`` per slide, compatible with CLAM and TRIDENT.

Layout (plain h5py can read it)::

    features  float32 (N, D)   one row per tile
    coords    int64   (N, 2)   level-0 (x, y) of each tile's top-left corner; attrs patch_size,
                               patch_level (CLAM's names) when the writer is given them
    attrs     mpp, tile_size_px, tile_size_level0, level, encoder, encoder_weights_sha256,
              slidestream_version, slide_url, slide_size, slide_mtime, slide_sha256 (optional),
              tissue_method, n_tiles, complete=True, ... (any extra JSON-able attributes)

:class:`FeatureWriter` appends rows to resizable datasets in a temporary file and renames it to the
final name only in :meth:`FeatureWriter.close` after ``complete`` is set: a file under its final
name is always complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import temp_name

_SUFFIXES = (
    ".ome.tiff",
    ".ome.tif",
    ".ome.zarr",
    ".zarr",
    ".svs",
    ".tiff",
    ".tif",
    ".ndpi",
    ".mrxs",
    ".vms",
    ".scn",
    ".bif",
    ".dcm",
    ".h5",
)


def _id_char(ch: str) -> str:
    if ch.isalnum() or ch in "._-":
        return ch
    if ch.isspace():
        return "_"
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def safe_slide_id(url: str) -> str:
    """A file-name-safe slide id from a path or URL: the last path component without its slide
    suffix. Letters and digits of any script, '.', '_' and '-' are kept (NFC-normalised), white
    space becomes '_', every other character its UTF-8 bytes as ``%XX`` — so ``a#b.tif``,
    ``a?b.tif`` and ``a%b.tif`` keep distinct ids. A URL's query and fragment are not part of the
    name (its path is percent-decoded first); a local path is taken literally (``#``, ``?`` and
    ``::`` are characters of the file name). Never empty, never starts with '.', never contains a
    path separator, so ``DIR/<id>.h5`` always stays inside ``DIR``."""
    import unicodedata
    import urllib.parse

    s = str(url)
    if s.startswith("file://"):
        s = s[len("file://") :]
    elif "://" in s:
        s = urllib.parse.unquote(urllib.parse.urlsplit(s).path)
    name = re.split(r"[/\\]", s.rstrip("/"))[-1]
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    name = "".join(_id_char(ch) for ch in unicodedata.normalize("NFC", name))
    name = name.strip("._") or "slide"
    return name[:200]


def _names_itself(url: str, sid: str) -> bool:
    """Whether the last path component of ``url`` is ``sid`` plus a slide suffix, character for character."""
    name = re.split(r"[/\\]", str(url).rstrip("/"))[-1]
    return name.startswith(sid) and (name == sid or name[len(sid) :].lower() in _SUFFIXES)


def unique_slide_ids(
    urls: Sequence[str], ids: Sequence[str] | None = None, *, given: Sequence[bool] | None = None
) -> tuple[list[str], dict[str, str]]:
    """``ids`` (default: :func:`safe_slide_id` of each URL) made unique, deterministically: where
    several slides share an id (``a b.svs`` and ``a_b.svs`` are both ``a_b``), one keeps it — the
    one whose id was ``given`` by the user (a CSV ``slide_id``), else the one whose file name is
    the id itself (``a_b.svs``), else the first by URL — and each
    other one gets ``-`` and the first 8 hex digits of the sha256 of its URL (its own, so it does
    not change when other slides come and go). Returns the ids and ``{url: new id}`` of the slides
    renamed, for the job to report. The same URL twice keeps one id (it is the same slide); two
    slides both *given* the same id raise ``ValueError`` naming them."""
    import hashlib

    ids = [safe_slide_id(u) for u in urls] if ids is None else list(ids)
    given = [False] * len(ids) if given is None else list(given)
    if not len(ids) == len(urls) == len(given):
        raise ValueError(f"{len(urls)} URLs but {len(ids)} ids and {len(given)} flags")
    groups: dict[str, list[int]] = {}
    for i, sid in enumerate(ids):
        groups.setdefault(sid, []).append(i)
    taken = set(ids)
    renamed: dict[str, str] = {}
    for sid, members in groups.items():
        order = sorted(
            members, key=lambda i: (not given[i], not _names_itself(urls[i], ids[i]), str(urls[i]))
        )
        keep = order[0]
        for i in order[1:]:
            if str(urls[i]) == str(urls[keep]):
                continue
            if given[i]:
                raise ValueError(
                    f"slides {urls[keep]} and {urls[i]} are both given the id {sid!r}; give them distinct "
                    f"slide_id values"
                )
            digest = hashlib.sha256(str(urls[i]).encode()).hexdigest()
            n = 8
            while f"{sid}-{digest[:n]}" in taken:
                n += 4
            ids[i] = f"{sid}-{digest[:n]}"
            taken.add(ids[i])
            renamed[str(urls[i])] = ids[i]
    return ids, renamed


def _attr(v: Any) -> Any:
    if v is None:
        return "null"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return v


@dataclass
class Features:
    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)


def read_features(path: str | os.PathLike, *, load: bool = True) -> Features:
    """Read a feature file written by ``slidestream embed`` (or CLAM/TRIDENT)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise ValueError(f"{path}: not a feature file (needs datasets 'features' and 'coords')")
            attrs = {}
            for k, v in f.attrs.items():
                if isinstance(v, bytes):
                    v = v.decode()
                if isinstance(v, np.generic):
                    v = v.item()
                if v == "null":
                    v = None
                attrs[k] = v
            feats = f["features"][()] if load else np.empty((f["features"].shape[0], 0), np.float32)
            coords = f["coords"][()]
    except OSError as e:
        raise OSError(f"{path}: cannot read feature file ({e}); delete it and rerun the embedding") from e
    if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM stores (1, N, D) in some versions
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    return Features(feats, coords, attrs)


class FeatureWriter:
    """Append features/coords batches, then :meth:`close` to publish the file atomically."""

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        attrs: dict[str, Any] | None = None,
        chunk_rows: int = 128,
        coords_attrs: dict[str, Any] | None = None,
    ):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.path)
        self._f = h5py.File(self.tmp, "w")
        self._f.create_dataset(
            "features", shape=(0, dim), maxshape=(None, dim), dtype="float32", chunks=(chunk_rows, dim)
        )
        coords = self._f.create_dataset(
            "coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(chunk_rows, 2)
        )
        # CLAM/TRIDENT readers look for patch_size/patch_level on the coords dataset
        for k, v in (coords_attrs or {}).items():
            coords.attrs[k] = _attr(v)
        self._f.attrs["complete"] = False
        for k, v in (attrs or {}).items():
            self._f.attrs[k] = _attr(v)
        self.n = 0
        self._closed = False

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float32)
        coords = np.asarray(coords, dtype=np.int64)
        if features.ndim != 2 or coords.shape != (features.shape[0], 2):
            raise ValueError(f"features {features.shape} and coords {coords.shape} do not match")
        n = features.shape[0]
        if n == 0:
            return
        for name, arr in (("features", features), ("coords", coords)):
            ds = self._f[name]
            ds.resize(self.n + n, axis=0)
            ds[self.n :] = arr
        self.n += n

    def close(self, **final_attrs: Any) -> Path:
        """Mark complete, flush and rename to the final name."""
        if self._closed:
            return self.path
        for k, v in final_attrs.items():
            self._f.attrs[k] = _attr(v)
        self._f.attrs["n_tiles"] = self.n
        self._f.attrs["complete"] = True
        self._f.flush()
        self._f.close()
        self._closed = True
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._f.close()
            finally:
                if self.tmp.exists():
                    self.tmp.unlink()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
