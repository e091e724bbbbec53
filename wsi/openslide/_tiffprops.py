"""OpenSlide's properties of a TIFF slide, computed the way OpenSlide computes them.

For Aperio and generic tiled TIFF files (what slidestream's byte-range backend reads) OpenSlide
reports, besides the vendor's own keys: ``openslide.comment`` and the ``tiff.*`` tags of directory
0, ``openslide.icc-size`` (and the profile itself), ``openslide.associated.<name>.{width,height,
icc-size}`` (an Aperio associated image without a profile of its own reports the slide's), ``openslide.bounds-*`` for sparse generic TIFFs (the box of the level-0 tiles that hold
data), and ``openslide.quickhash-1``: sha256 of the raw tiles of the smallest level followed by nine
string tags of directory 0 (each ``name\\0value\\0``), omitted when those tiles exceed 5 MiB. Numbers
are formatted as OpenSlide's ``g_ascii_dtostr`` formats them (:func:`format_double`). The rules
follow OpenSlide 4.0's ``openslide-decode-tifflike.c`` and are checked against the real library in
``tests/test_openslide_compat.py``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

#: string tags stored as ``tiff.<name>`` and hashed, in OpenSlide's order
HASHED_TAGS = (
    ("ImageDescription", 270),
    ("Make", 271),
    ("Model", 272),
    ("Software", 305),
    ("DateTime", 306),
    ("Artist", 315),
    ("HostComputer", 316),
    ("Copyright", 33432),
    ("DocumentName", 269),
)
#: float tags stored as ``tiff.<name>`` (not hashed)
FLOAT_TAGS = (("XResolution", 282), ("YResolution", 283), ("XPosition", 286), ("YPosition", 287))
ICC_TAG = 34675
QUICKHASH_LIMIT = 5 << 20
_UNITS = {1: "none", 2: "inch", 3: "centimeter"}


def format_double(value: float) -> str:
    """A float as OpenSlide writes it (GLib's ``g_ascii_dtostr``: ``%.17g``)."""
    return f"{value:.17g}"


def _raw_string(fh: Any, tag: Any) -> bytes | None:
    """The tag's bytes as stored, up to the first NUL (as libtiff hands them to OpenSlide)."""
    if tag is None:
        return None
    fh.seek(tag.valueoffset)
    raw = fh.read(tag.count)
    return raw.split(b"\0", 1)[0]


def _tag_float(tag: Any) -> float | None:
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple) and len(value) == 2:  # RATIONAL
        num, den = value
        return num / den if den else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _level_pages(tf: Any, level_dims: list[tuple[int, int]]) -> list[Any]:
    """The tiled directory of each level (matched by size, first match in file order)."""
    pages = []
    for w, h in level_dims:
        page = next(
            (p for p in tf.pages if p.is_tiled and (p.imagewidth, p.imagelength) == (w, h)),
            None,
        )
        pages.append(page)
    return pages


def _associated_page(tf: Any, name: str, level_pages: list[Any]) -> Any:
    """The directory of an Aperio associated image: ``thumbnail`` is the first directory that is not
    a level, ``label`` and ``macro`` are named in their ImageDescription (sizes come from the header,
    so a damaged image does not stop the properties being read, as in OpenSlide)."""
    others = [p for p in tf.pages if p not in level_pages]
    if name == "thumbnail":
        return others[0] if others else None
    return next((p for p in others if name in (p.description or "").lower()), None)


def tiff_properties(
    path: str, level_dims: list[tuple[int, int]], associated: list[str], vendor: str | None
) -> tuple[dict[str, str], bytes | None]:
    """The ``openslide.*`` / ``tiff.*`` keys OpenSlide adds for a TIFF slide, and its ICC profile.

    ``associated`` lists the associated images' names."""
    import tifffile

    props: dict[str, str] = {}
    with tifffile.TiffFile(path) as tf:
        fh = tf.filehandle
        page0 = tf.pages[0]
        tags = page0.tags
        desc = _raw_string(fh, tags.get(270))
        if desc is not None:
            props["openslide.comment"] = desc.decode("utf-8", "replace")
        hashed: list[tuple[str, bytes | None]] = []
        for name, code in HASHED_TAGS:
            raw = _raw_string(fh, tags.get(code))
            hashed.append((f"tiff.{name}", raw))
            if raw is not None:
                props[f"tiff.{name}"] = raw.decode("utf-8", "replace")
        for name, code in FLOAT_TAGS:
            value = _tag_float(tags.get(code))
            if value is not None:
                props[f"tiff.{name}"] = format_double(value)
        unit_tag = tags.get(296)
        unit = int(unit_tag.value) if unit_tag is not None else 2
        props["tiff.ResolutionUnit"] = _UNITS.get(unit, "unknown")
        if vendor == "generic-tiff":
            props.update(_generic_mpp(props, unit))
        icc_tag = tags.get(ICC_TAG)
        icc = bytes(icc_tag.value) if icc_tag is not None else None
        if icc:
            props["openslide.icc-size"] = str(len(icc))
        pages = _level_pages(tf, level_dims)
        quick = _quickhash(fh, pages[-1], hashed) if pages and pages[-1] is not None else None
        if quick:
            props["openslide.quickhash-1"] = quick
        if vendor == "generic-tiff" and pages and pages[0] is not None:
            props.update(_sparse_bounds(pages[0]))
        for name in associated:
            page = _associated_page(tf, name, pages)
            if page is None:
                continue
            props[f"openslide.associated.{name}.width"] = str(page.imagewidth)
            props[f"openslide.associated.{name}.height"] = str(page.imagelength)
            own = page.tags.get(ICC_TAG) if page is not None else None
            # Aperio associated images carry the slide's profile when they have none of their own
            size = len(bytes(own.value)) if own is not None else len(icc or b"") if vendor == "aperio" else 0
            if size:
                props[f"openslide.associated.{name}.icc-size"] = str(size)
    return props, icc or None


def _generic_mpp(props: dict[str, str], unit: int) -> dict[str, str]:
    scale = {2: 25400.0, 3: 10000.0}.get(unit)
    out = {}
    for axis, key in (("x", "tiff.XResolution"), ("y", "tiff.YResolution")):
        if scale and key in props and float(props[key]) > 0:
            out[f"openslide.mpp-{axis}"] = format_double(scale / float(props[key]))
    return out


def _quickhash(fh: Any, page: Any, hashed: list[tuple[str, bytes | None]]) -> str | None:
    offsets, counts = page.dataoffsets, page.databytecounts
    if sum(int(c) for c in counts) > QUICKHASH_LIMIT:
        return None
    h = hashlib.sha256()
    for off, n in zip(offsets, counts):
        if n:
            fh.seek(int(off))
            h.update(fh.read(int(n)))
    for name, raw in hashed:
        h.update(name.encode() + b"\0")
        h.update((raw or b"") + b"\0")
    return h.hexdigest()


def _sparse_bounds(page: Any) -> dict[str, str]:
    """OpenSlide reports the box of level 0's non-empty tiles when some tiles are absent."""
    counts = np.asarray(page.databytecounts)
    tw, th = page.tilewidth, page.tilelength
    across, down = math.ceil(page.imagewidth / tw), math.ceil(page.imagelength / th)
    if counts.size != across * down or counts.all() or not counts.any():
        return {}
    grid = counts.reshape(down, across) > 0
    rows, cols = np.nonzero(grid.any(axis=1))[0], np.nonzero(grid.any(axis=0))[0]
    x0, y0 = int(cols[0]) * tw, int(rows[0]) * th
    x1 = min((int(cols[-1]) + 1) * tw, page.imagewidth)
    y1 = min((int(rows[-1]) + 1) * th, page.imagelength)
    return {
        "openslide.bounds-x": str(x0),
        "openslide.bounds-y": str(y0),
        "openslide.bounds-width": str(x1 - x0),
        "openslide.bounds-height": str(y1 - y0),
    }
