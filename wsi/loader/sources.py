"""Where the loader's slides come from: :class:`SlideSpec` and :func:`resolve_slides`.

Re-exported by :mod:`wsi.loader`. No torch here.
"""

from __future__ import annotations

import csv
import glob as _glob
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import safe_slide_id
from ..tissue.masks import TissueMask

#: file suffixes that count as slides when a directory or URL prefix is listed
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".vms",
    ".scn",
    ".bif",
    ".zarr",
    ".svslide",
)
_GLOB_CHARS = "*?["
log = logging.getLogger("wsi.loader")


@dataclass(frozen=True)
class SlideSpec:
    """One slide of a loader: its ``url`` (path or fsspec URL), ``slide_id`` (default: derived
    from the URL with :func:`wsi.io.safe_slide_id`), an ``mpp`` override for slides without µm/px
    metadata, and an optional tissue ``mask`` (a :class:`TissueMask`, a saved mask PNG with its
    ``.json`` sidecar, or a user mask image / QuPath GeoJSON) that replaces the computed one.
    ``annotations`` (a QuPath GeoJSON, a label image or a Zarr label array; see
    :mod:`wsi.annotations`) gives the slide class labels for segmentation, aligned to level 0 at
    ``annotation_downsample`` (inferred from the sizes when None)."""

    url: str
    slide_id: str = ""
    mpp: float | None = None
    mask: TissueMask | str | None = field(default=None, compare=False)
    annotations: str | None = None
    annotation_downsample: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", os.fspath(self.url))
        if not self.slide_id:
            object.__setattr__(self, "slide_id", safe_slide_id(self.url))
        if self.mpp is not None and not float(self.mpp) > 0:
            raise ValueError(f"{self.url}: mpp override must be positive, got {self.mpp!r}")
        if isinstance(self.mask, os.PathLike):
            object.__setattr__(self, "mask", os.fspath(self.mask))
        if isinstance(self.annotations, os.PathLike):
            object.__setattr__(self, "annotations", os.fspath(self.annotations))


def _is_slide_name(name: str) -> bool:
    return name.rstrip("/").lower().endswith(SLIDE_SUFFIXES)


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _is_pattern(s: str, storage_options: dict | None) -> bool:
    """Whether ``s`` is a glob pattern the user wrote: it has ``*``, ``?`` or ``[`` and does not
    exist as written (a local ``scan[1].svs`` or ``a?b.svs`` that exists is a file name). In an
    http(s) URL ``?`` starts the query: only ``*`` or ``[`` in its path make a pattern."""
    if s.startswith(("http://", "https://")):
        import urllib.parse

        return any(c in urllib.parse.urlsplit(s).path for c in "*[")
    if not any(c in s for c in _GLOB_CHARS):
        return False
    if not _is_remote(s):
        return not os.path.lexists(s.removeprefix("file://"))
    fs, path = _fs(s, storage_options)
    return not fs.exists(path)


def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _float_or_none(v: Any, where: str) -> float | None:
    if v is None or str(v).strip() == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{where}: mpp {v!r} is not a number") from None


def _read_manifest(url: str, storage_options: dict | None) -> list[SlideSpec]:
    fs, path = _fs(url, storage_options)
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError(f"manifest {url} has no rows; expected a header with a `url` or `path` column")
    cols = set(rows[0])
    key = "url" if "url" in cols else "path" if "path" in cols else None
    if key is None:
        raise ValueError(f"manifest {url} needs a `url` or `path` column (has {sorted(cols)})")
    base = None if _is_remote(url) else Path(path).parent

    def _rel(p: str) -> str:
        if base is not None and "://" not in p and not os.path.isabs(p):
            return str(base / p)
        return p

    out = []
    for n, row in enumerate(rows, start=2):
        u = (row.get(key) or "").strip()
        if not u:
            raise ValueError(f"manifest {url} line {n}: empty `{key}`")
        mask = (row.get("mask") or "").strip() or None
        out.append(
            SlideSpec(
                _rel(u),
                (row.get("slide_id") or "").strip(),
                _float_or_none(row.get("mpp"), f"{url} line {n}"),
                _rel(mask) if mask else None,
            )
        )
    return out


def _resolve_one(src: Any, storage_options: dict | None) -> list[SlideSpec]:
    if isinstance(src, SlideSpec):
        return [src]
    if isinstance(src, dict):
        return [SlideSpec(**src)]
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(
            f"cannot resolve slides from {type(src).__name__}; pass a path, URL, glob, CSV or list"
        )
    s = os.fspath(src)
    if s.lower().endswith(".csv"):
        return _read_manifest(s, storage_options)
    if _is_pattern(s, storage_options):
        if _is_remote(s):
            fs, path = _fs(s, storage_options)
            return [SlideSpec(fs.unstrip_protocol(p)) for p in sorted(fs.glob(path))]
        return [SlideSpec(p) for p in sorted(_glob.glob(s))]
    if _is_remote(s):
        fs, path = _fs(s, storage_options)
        if _is_slide_name(s) or not fs.isdir(path) or fs.exists(f"{path.rstrip('/')}/zarr.json"):
            return [SlideSpec(s)]
        names = sorted(p for p in fs.ls(path, detail=False) if _is_slide_name(p))
        return [SlideSpec(fs.unstrip_protocol(p)) for p in names]
    p = Path(s.removeprefix("file://"))
    if not p.exists():
        raise FileNotFoundError(
            f"slide source {s} does not exist; pass a slide, a directory, a glob, a URL or a CSV"
        )
    if p.is_dir() and not (
        p.suffix.lower() == ".zarr" or (p / "zarr.json").exists() or (p / ".zattrs").exists()
    ):
        return [SlideSpec(str(c)) for c in sorted(p.iterdir()) if _is_slide_name(c.name)]
    return [SlideSpec(s)]


def resolve_slides(source: Any, *, storage_options: dict | None = None) -> list[SlideSpec]:
    """Slides from ``source``: a slide path/URL, a local directory or URL prefix (its entries with
    a slide suffix, :data:`SLIDE_SUFFIXES`, not recursive; listed with fsspec ``ls``), a glob
    (``data/*.svs``, ``s3://b/*.svs``), a CSV manifest (column ``url`` or ``path``; optional
    ``slide_id``, ``mpp``, ``mask``; relative paths are relative to the CSV), a
    :class:`SlideSpec`, a dict of SlideSpec fields, or a list of any of these.

    A glob character in a local name that exists (``scan[1].svs``, ``a?b.svs``) is part of the
    name; only names that do not exist are expanded as patterns. A slide listed twice (same URL) is
    kept once. Slides whose derived ids collide (``a b.svs`` and ``a_b.svs``) get distinct ids
    (:func:`dedupe_slide_ids`, logged); ``ValueError`` when nothing is found or two slides are
    *given* the same id (a CSV's ``slide_id``).
    """
    items: Iterable[Any] = source if isinstance(source, (list, tuple)) else [source]
    specs: list[SlideSpec] = []
    for it in items:
        specs.extend(_resolve_one(it, storage_options))
    if not specs:
        raise ValueError(f"no slides found in {source!r} (slide suffixes: {', '.join(SLIDE_SUFFIXES)})")
    specs, renamed = dedupe_slide_ids(specs)
    for url, sid in renamed.items():
        log.warning("%s shares its slide id with another slide; it gets the id %s", url, sid)
    return specs


def dedupe_slide_ids(specs: Sequence[SlideSpec]) -> tuple[list[SlideSpec], dict[str, str]]:
    """``specs`` with a slide listed twice (same URL and id) kept once and colliding ids made
    distinct by :func:`wsi.io.unique_slide_ids` (an id given explicitly keeps it; derived ones get
    a suffix from their URL's hash). Returns the specs and ``{url: new id}`` of those renamed;
    ``ValueError`` when two slides are given the same id explicitly."""
    from dataclasses import replace

    from ..io import unique_slide_ids

    seen: set[tuple[str, str]] = set()
    kept = []
    for sp in specs:
        if (sp.url, sp.slide_id) not in seen:
            seen.add((sp.url, sp.slide_id))
            kept.append(sp)
    ids, renamed = unique_slide_ids(
        [sp.url for sp in kept],
        [sp.slide_id for sp in kept],
        given=[sp.slide_id != safe_slide_id(sp.url) for sp in kept],
    )
    return [sp if sp.slide_id == i else replace(sp, slide_id=i) for sp, i in zip(kept, ids)], renamed


def check_unique_ids(specs: Sequence[SlideSpec]) -> None:
    """Raise ``ValueError`` naming both slides when two specs share a slide id."""
    seen: dict[str, str] = {}
    for sp in specs:
        if sp.slide_id in seen:
            raise ValueError(
                f"slides {seen[sp.slide_id]} and {sp.url} share the id {sp.slide_id!r}; give them distinct "
                f"slide_id values (SlideSpec(slide_id=...) or a `slide_id` column in a CSV manifest)"
            )
        seen[sp.slide_id] = sp.url
