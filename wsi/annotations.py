"""Region annotations → tile masks: QuPath GeoJSON and label masks (image or Zarr).

Two sources, one interface (``rasterize(box_level0, out_size, class_map)``):

- :func:`load_geojson`: QuPath exports (a FeatureCollection, a single Feature, or a bare list of
  Features). Polygon and MultiPolygon geometries with holes, in level-0 pixel coordinates. The
  class name is ``properties.classification.name`` (QuPath) or ``properties.name``. Every feature
  is checked and every problem is collected — rings with fewer than 3 distinct points, non-finite
  coordinates, self-intersecting rings (checked up to ``max_check_vertices`` vertices per ring),
  coordinates outside the slide, unknown class names, unsupported geometry types — and reported
  together in one :class:`AnnotationError` naming the file and the feature index of each. This is
  the project's one GeoJSON reader: segmentation labels, tissue user masks
  (:func:`geojson_mask`, where a feature needs no class and points or lines are skipped) and
  anything else that reads regions go through it, with the same validity rules.
- :func:`load_label_mask`: an integer label image (PNG/TIFF) or a 2-D Zarr array aligned to level 0
  at some downsample (inferred from the slide size when not given); labels are class indices.

``class_map`` maps class names to indices (GeoJSON); label masks carry indices already (an
optional ``class_map`` of ``{"old": new}`` integer strings remaps them). Unmapped names raise an
error listing them unless ``on_unknown="ignore"``. Rasterisation samples pixel centres: output
pixel (i, j) of a box ``(x, y, w, h)`` rendered at ``out_size`` (W, H) covers level-0
``[x + j·w/W, x + (j+1)·w/W)`` and gets the class of its centre. Later features overwrite
earlier ones; pixels no feature covers get ``background``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AnnotationError


@dataclass
class Region:
    """One annotated area: rings as float arrays (N, 2) of level-0 (x, y)."""

    class_name: str
    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    feature_index: int = 0


def _segments_intersect(ring: np.ndarray) -> bool:
    """True when two non-adjacent edges of a closed ring cross (proper intersections only)."""
    p = ring[:-1] if np.array_equal(ring[0], ring[-1]) else ring
    n = len(p)
    if n < 4:
        return False
    a, b = p, np.roll(p, -1, axis=0)
    d = b - a

    def cross(u, v):
        return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]

    # orientation of every (i, j) edge pair
    ai, di = a[:, None], d[:, None]
    aj, bj, dj = a[None], b[None], d[None]
    o1 = cross(di, aj - ai)
    o2 = cross(di, bj - ai)
    o3 = cross(dj, ai - aj)
    o4 = cross(dj, ai + di - aj)
    hit = (o1 * o2 < 0) & (o3 * o4 < 0)
    idx = np.arange(n)
    adjacent = (np.abs(idx[:, None] - idx[None]) <= 1) | (np.abs(idx[:, None] - idx[None]) == n - 1)
    return bool((hit & ~adjacent).any())


@dataclass
class GeoJSONAnnotations:
    """Regions read from a QuPath GeoJSON file (see :func:`load_geojson`)."""

    source: str
    regions: list[Region]

    @property
    def class_names(self) -> list[str]:
        return sorted({r.class_name for r in self.regions})

    def rasterize(
        self,
        box_level0: tuple[float, float, float, float],
        out_size: tuple[int, int],
        class_map: dict[str, int],
        *,
        background: int = 0,
        on_unknown: str = "error",
    ) -> np.ndarray:
        return rasterize(self, box_level0, out_size, class_map, background=background, on_unknown=on_unknown)


def _class_name(props: Any) -> str | None:
    if not isinstance(props, dict):
        return None
    cls = props.get("classification")
    if isinstance(cls, dict) and isinstance(cls.get("name"), str):
        return cls["name"]
    if isinstance(props.get("name"), str):
        return props["name"]
    return None


def _check_ring(
    raw: Any, what: str, dims: tuple[int, int] | None, tol: float, max_check_vertices: int
) -> tuple[np.ndarray | None, list[str]]:
    try:
        ring = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return None, [f"{what}: coordinates are not a list of [x, y] numbers"]
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) == 0:
        return None, [f"{what}: coordinates are not a list of [x, y] points"]
    ring = ring[:, :2]
    if not np.isfinite(ring).all():
        return None, [f"{what}: non-finite coordinates (NaN or inf)"]
    distinct = np.unique(ring, axis=0)
    if len(distinct) < 3:
        return None, [f"{what}: a polygon ring needs at least 3 distinct points, has {len(distinct)}"]
    problems = []
    if dims is not None:
        w, h = dims
        lo, hi = ring.min(axis=0), ring.max(axis=0)
        if lo[0] < -tol or lo[1] < -tol or hi[0] > w + tol or hi[1] > h + tol:
            problems.append(
                f"{what}: coordinates outside the slide ({lo[0]:.0f}..{hi[0]:.0f}, {lo[1]:.0f}..{hi[1]:.0f} "
                f"vs {w}x{h} level-0 px); was it exported from another image or at another scale?"
            )
    if len(ring) <= max_check_vertices and _segments_intersect(ring):
        problems.append(
            f"{what}: self-intersecting polygon ring; fix it in QuPath (Objects > Simplify/repair)"
        )
    return ring, problems


def load_geojson(
    path: str | os.PathLike,
    *,
    slide_dimensions: tuple[int, int] | None = None,
    class_map: dict[str, int] | None = None,
    on_unknown: str = "error",
    outside_tolerance: float = 1.0,
    max_check_vertices: int = 2000,
    default_class: str | None = None,
    other_geometries: str = "error",
) -> GeoJSONAnnotations:
    """Read and validate a QuPath GeoJSON file (see the module docstring).

    ``slide_dimensions`` (level-0 W, H) enables the outside-the-slide check (with
    ``outside_tolerance`` px of slack); ``class_map`` enables the class-name check; with
    ``on_unknown="ignore"`` features of unmapped classes are dropped instead of reported.
    ``default_class`` names features without a class (None: a missing class is a problem);
    ``other_geometries="ignore"`` skips features that are not polygons (points, lines) instead of
    reporting them."""
    if on_unknown not in ("error", "ignore"):
        raise ValueError(f"on_unknown must be 'error' or 'ignore', got {on_unknown!r}")
    if other_geometries not in ("error", "ignore"):
        raise ValueError(f"other_geometries must be 'error' or 'ignore', got {other_geometries!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(
            str(path), [(None, f"not valid JSON ({e}); export GeoJSON from QuPath")]
        ) from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise AnnotationError(
            str(path), [(None, "expected a GeoJSON FeatureCollection, Feature or list of Features")]
        )
    regions: list[Region] = []
    problems: list[tuple[int | None, str]] = []
    unknown: dict[str, list[int]] = {}
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            problems.append((i, "not a GeoJSON Feature with a geometry"))
            continue
        geom = feat["geometry"]
        gtype = geom.get("type")
        if gtype not in ("Polygon", "MultiPolygon") and other_geometries == "ignore":
            continue
        name = _class_name(feat.get("properties")) or default_class
        if name is None:
            problems.append((i, "no class name (properties.classification.name or properties.name)"))
            continue
        if class_map is not None and name not in class_map:
            unknown.setdefault(name, []).append(i)
            if on_unknown == "ignore":
                continue
        if gtype == "Polygon":
            polys = [geom.get("coordinates")]
        elif gtype == "MultiPolygon":
            polys = geom.get("coordinates")
        else:
            problems.append((i, f"unsupported geometry {gtype!r}; only Polygon and MultiPolygon are regions"))
            continue
        if not isinstance(polys, list) or not polys:
            problems.append((i, f"{gtype} without coordinates"))
            continue
        for k, poly in enumerate(polys):
            what = f"{gtype} part {k}" if gtype == "MultiPolygon" else gtype
            if not isinstance(poly, list) or not poly:
                problems.append((i, f"{what}: no rings"))
                continue
            rings = []
            ok = True
            for r, raw in enumerate(poly):
                ring, errs = _check_ring(
                    raw, f"{what} ring {r}", slide_dimensions, outside_tolerance, max_check_vertices
                )
                problems += [(i, e) for e in errs]
                ok = ok and ring is not None and not errs
                rings.append(ring)
            if ok:
                regions.append(Region(name, rings[0], rings[1:], i))
    if unknown and on_unknown == "error":
        listed = ", ".join(
            f"{n!r} (features {v[:5]}{'...' if len(v) > 5 else ''})" for n, v in sorted(unknown.items())
        )
        problems.append(
            (
                None,
                f"class name(s) not in the class map: {listed}; add them to the config's "
                f"classes or set unknown classes to be ignored (mapped: {sorted(class_map or {})})",
            )
        )
    if problems:
        raise AnnotationError(str(path), problems)
    return GeoJSONAnnotations(str(path), regions)


def geojson_mask(path: str | os.PathLike, dimensions: tuple[int, int], downsample: float) -> np.ndarray:
    """A bool mask of the polygons of a (QuPath) GeoJSON file, ``ceil(dimensions / downsample)``
    pixels, mask pixel (i, j) covering level-0 ``[j·d, (j+1)·d) × [i·d, (i+1)·d)`` and set when its
    centre lies inside a polygon (holes excluded). Read by :func:`load_geojson` with its validity
    rules; features need no class and non-polygon features are skipped (a tissue mask)."""
    ann = load_geojson(path, slide_dimensions=dimensions, default_class="tissue", other_geometries="ignore")
    if not ann.regions:
        raise AnnotationError(
            str(path),
            [
                (
                    None,
                    "no Polygon/MultiPolygon geometry; export the tissue annotations from QuPath as GeoJSON",
                )
            ],
        )
    W, H = dimensions
    mw, mh = max(1, int(np.ceil(W / downsample))), max(1, int(np.ceil(H / downsample)))
    cmap = {name: 1 for name in ann.class_names}
    return rasterize(ann, (0, 0, mw * downsample, mh * downsample), (mw, mh), cmap) > 0


@dataclass
class LabelMask:
    """Integer labels aligned to level 0: ``array[r, c]`` labels level-0 pixel area
    ``[c·downsample, (c+1)·downsample) × [r·downsample, (r+1)·downsample)``. ``array`` may be a
    numpy array or a 2-D zarr array (read window by window)."""

    source: str
    array: Any
    downsample: float

    @property
    def class_names(self) -> list[str]:
        return []

    def rasterize(
        self,
        box_level0: tuple[float, float, float, float],
        out_size: tuple[int, int],
        class_map: dict[str, int] | None = None,
        *,
        background: int = 0,
        on_unknown: str = "error",
    ) -> np.ndarray:
        return rasterize(self, box_level0, out_size, class_map, background=background, on_unknown=on_unknown)


def load_label_mask(
    path: str | os.PathLike,
    *,
    slide_dimensions: tuple[int, int] | None = None,
    downsample: float | None = None,
) -> LabelMask:
    """A label image (PNG/TIFF; single channel) or a Zarr array (a path ending in ``.zarr``; a
    group's array ``0`` is used). ``downsample`` (level-0 px per mask px) is inferred from
    ``slide_dimensions`` when not given; the two axes must agree within 2 %."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label mask {path} not found")
    if path.suffix.lower() == ".zarr" or (path / "zarr.json").exists():
        import zarr

        node = zarr.open(str(path), mode="r")
        arr = node if isinstance(node, zarr.Array) else node["0"]
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16", "1"):
                    raise AnnotationError(
                        str(path),
                        [
                            (
                                None,
                                f"label mask must be single-channel, got mode {im.mode}; "
                                "save class indices as an 8-bit grey PNG",
                            )
                        ],
                    )
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise AnnotationError(str(path), [(None, f"cannot read label image: {e}")]) from None
    if len(arr.shape) != 2:
        raise AnnotationError(str(path), [(None, f"label mask must be 2-D, got shape {arr.shape}")])
    if downsample is None:
        if slide_dimensions is None:
            raise ValueError(
                f"{path}: pass downsample= or slide_dimensions= to align the label mask to level 0"
            )
        W, H = slide_dimensions
        dx, dy = W / arr.shape[1], H / arr.shape[0]
        if abs(dx - dy) > 0.02 * max(dx, dy):
            raise AnnotationError(
                str(path),
                [
                    (
                        None,
                        f"mask {arr.shape[1]}x{arr.shape[0]} does not have the slide's "
                        f"aspect ratio ({W}x{H}); it must cover the whole slide",
                    )
                ],
            )
        downsample = (dx + dy) / 2
    return LabelMask(str(path), arr, float(downsample))


def load_annotations(path: str | os.PathLike, **kwargs: Any) -> GeoJSONAnnotations | LabelMask:
    """GeoJSON (``.geojson``/``.json``) or a label mask, by file name; kwargs go to the loader."""
    p = Path(path)
    if p.suffix.lower() in (".geojson", ".json"):
        return load_geojson(p, **{k: v for k, v in kwargs.items() if k != "downsample"})
    keep = {k: v for k, v in kwargs.items() if k in ("slide_dimensions", "downsample")}
    return load_label_mask(p, **keep)


@dataclass(frozen=True)
class ClassLabels:
    """How annotations become class labels (segmentation): ``class_map`` maps GeoJSON class names
    to indices (label masks carry indices already); features of other classes raise when
    ``on_unknown="error"``, else they are dropped; pixels no annotation covers get ``background``
    (a class index, or :data:`wsi.sampling.IGNORE_LABEL` for "does not count")."""

    class_map: dict[str, int]
    n_classes: int
    on_unknown: str = "error"
    background: int = 0

    def load(
        self, path: str | os.PathLike, slide_dimensions: tuple[int, int], downsample: float | None = None
    ) -> GeoJSONAnnotations | LabelMask:
        """The annotations of one slide, validated against its level-0 size and the class map."""
        return load_annotations(
            path,
            slide_dimensions=slide_dimensions,
            class_map=self.class_map,
            on_unknown=self.on_unknown,
            downsample=downsample,
        )

    def rasterize(
        self,
        annotations: GeoJSONAnnotations | LabelMask,
        box_level0: tuple[float, float, float, float],
        out_size: tuple[int, int],
    ) -> np.ndarray:
        """(H, W) uint8 class labels of a level-0 box (classes outside the map are left out)."""
        cmap = self.class_map if isinstance(annotations, GeoJSONAnnotations) else None
        return annotations.rasterize(
            box_level0, out_size, cmap, background=self.background, on_unknown="ignore"
        )


def _centres(start: float, length: float, n: int) -> np.ndarray:
    return start + (np.arange(n) + 0.5) * (length / n)


def rasterize(
    annotations: GeoJSONAnnotations | LabelMask,
    box_level0: tuple[float, float, float, float],
    out_size: tuple[int, int],
    class_map: dict[str, int] | None,
    *,
    background: int = 0,
    on_unknown: str = "error",
) -> np.ndarray:
    """(H, W) uint8 class mask of level-0 box ``(x, y, w, h)`` rendered at ``out_size`` (W, H)."""
    from skimage.draw import polygon as draw_polygon

    x0, y0, bw, bh = (float(v) for v in box_level0)
    W, H = int(out_size[0]), int(out_size[1])
    if W < 1 or H < 1 or bw <= 0 or bh <= 0:
        raise ValueError(f"empty box {box_level0} or size {out_size}")
    sx, sy = bw / W, bh / H
    if isinstance(annotations, LabelMask):
        ds = annotations.downsample
        cols = np.floor(_centres(x0, bw, W) / ds).astype(np.int64)
        rows = np.floor(_centres(y0, bh, H) / ds).astype(np.int64)
        mh, mw = annotations.array.shape
        out = np.full((H, W), background, np.uint8)
        vc, vr = (cols >= 0) & (cols < mw), (rows >= 0) & (rows < mh)
        if not vc.any() or not vr.any():
            return out
        c0, c1 = cols[vc].min(), cols[vc].max() + 1
        r0, r1 = rows[vr].min(), rows[vr].max() + 1
        window = np.asarray(annotations.array[r0:r1, c0:c1])
        sub = window[(rows[vr] - r0)[:, None], (cols[vc] - c0)[None, :]]
        if class_map:
            lut = np.arange(256, dtype=np.int64) if window.dtype == np.uint8 else None
            remap = {int(k): int(v) for k, v in class_map.items()}
            if lut is not None:
                for k, v in remap.items():
                    lut[k] = v
                sub = lut[sub]
            else:
                sub = sub.copy()
                for k, v in remap.items():
                    sub[window[(rows[vr] - r0)[:, None], (cols[vc] - c0)[None, :]] == k] = v
        if sub.size and (sub.max() > 255 or sub.min() < 0):
            raise AnnotationError(
                annotations.source, [(None, f"labels {int(sub.min())}..{int(sub.max())} do not fit uint8")]
            )
        out[np.ix_(vr, vc)] = sub.astype(np.uint8)
        return out
    if class_map is None:
        raise ValueError("rasterising GeoJSON needs a class_map (class name -> index)")
    out = np.full((H, W), background, np.uint8)
    missing = sorted({r.class_name for r in annotations.regions} - set(class_map))
    if missing and on_unknown == "error":
        raise AnnotationError(
            annotations.source, [(None, f"class name(s) {missing} not in the class map {sorted(class_map)}")]
        )
    for region in annotations.regions:
        if region.class_name not in class_map:
            continue
        ext = region.exterior
        lo, hi = ext.min(axis=0), ext.max(axis=0)
        if hi[0] < x0 or hi[1] < y0 or lo[0] > x0 + bw or lo[1] > y0 + bh:
            continue

        def fill(ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            c = (ring[:, 0] - x0) / sx - 0.5
            r = (ring[:, 1] - y0) / sy - 0.5
            return draw_polygon(r, c, shape=(H, W))

        m = np.zeros((H, W), bool)
        m[fill(ext)] = True
        for hole in region.holes:
            m[fill(hole)] = False
        value = int(class_map[region.class_name])
        if not 0 <= value <= 255:
            raise ValueError(f"class index {value} for {region.class_name!r} does not fit uint8")
        out[m] = value
    return out


def to_geojson_feature(
    rings: list[np.ndarray], class_name: str, color: tuple[int, int, int] | None = None
) -> dict:
    """A QuPath-importable annotation Feature (Polygon: exterior then holes, closed rings)."""
    coords = []
    for ring in rings:
        ring = np.asarray(ring, dtype=np.float64)
        if not np.array_equal(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])
        coords.append([[round(float(x), 2), round(float(y), 2)] for x, y in ring])
    classification: dict[str, Any] = {"name": class_name}
    if color is not None:
        classification["color"] = [int(c) for c in color]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": coords},
        "properties": {"objectType": "annotation", "classification": classification},
    }


def polygon_area(ring: np.ndarray) -> float:
    """Signed shoelace area of a ring (positive = counter-clockwise in x-right, y-up axes)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


__all__ = [
    "AnnotationError",
    "ClassLabels",
    "GeoJSONAnnotations",
    "LabelMask",
    "geojson_mask",
    "Region",
    "load_annotations",
    "load_geojson",
    "load_label_mask",
    "polygon_area",
    "rasterize",
    "to_geojson_feature",
]
