"""Instance scores of a MIL head mapped back onto the slide.

Each tile is drawn on the thumbnail grid at ``coords / downsample`` with its level-0 footprint
``tile_size_level0 / downsample`` (x to the right, y down, as on the slide). Overlapping tiles are
averaged; pixels under no tile are transparent. Outputs: a PNG overlay with a colour bar, the
overlay at the thumbnail's exact size, a JSON sidecar (downsample, score range, peak), QuPath-
importable GeoJSON tile polygons in level-0 coordinates, and a thresholded mask saved as a
:class:`wsi.tissue.TissueMask` (PNG + JSON sidecar with the downsample).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi.atomic import atomic_path, atomic_write_text
from wsi.tissue import TissueMask


@dataclass
class Heatmap:
    grid: np.ndarray  # (h, w) float, NaN where no tile
    downsample: tuple[float, float]  # level-0 pixels per grid pixel (x, y)
    slide_dimensions: tuple[int, int]  # level-0 (w, h)

    def peak(self) -> tuple[int, int]:
        """Grid (x, y) of the highest score (centre of the plateau when several pixels tie)."""
        g = np.where(np.isnan(self.grid), -np.inf, self.grid)
        ys, xs = np.nonzero(g == g.max())
        return int(round(xs.mean())), int(round(ys.mean()))

    def peak_level0(self) -> tuple[float, float]:
        x, y = self.peak()
        return (x + 0.5) * self.downsample[0], (y + 0.5) * self.downsample[1]


def rasterize(
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size_level0: float,
    slide_dimensions: tuple[int, int],
    grid_size: tuple[int, int],
) -> Heatmap:
    """Average ``scores`` of tiles at level-0 ``coords`` (x, y top-left) with footprint
    ``tile_size_level0`` onto a ``grid_size`` (w, h) grid covering the slide."""
    W, H = slide_dimensions
    gw, gh = grid_size
    dx, dy = W / gw, H / gh
    acc = np.zeros((gh, gw), np.float64)
    cnt = np.zeros((gh, gw), np.int64)
    coords = np.asarray(coords, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} coords but {len(scores)} scores")
    x0 = np.clip(np.round(coords[:, 0] / dx).astype(np.int64), 0, gw)
    y0 = np.clip(np.round(coords[:, 1] / dy).astype(np.int64), 0, gh)
    x1 = np.clip(np.maximum(x0 + 1, np.round((coords[:, 0] + tile_size_level0) / dx).astype(np.int64)), 0, gw)
    y1 = np.clip(np.maximum(y0 + 1, np.round((coords[:, 1] + tile_size_level0) / dy).astype(np.int64)), 0, gh)
    for a, b, c, d, s in zip(x0, x1, y0, y1, scores):
        acc[c:d, a:b] += s
        cnt[c:d, a:b] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
    return Heatmap(grid, (dx, dy), (int(W), int(H)))


NORMALIZE = ("none", "minmax", "log-minmax")


def normalize_scores(scores: np.ndarray, how: str) -> np.ndarray:
    """``"none"``: as is; ``"minmax"``: to [0, 1] over the slide (constant scores → 0);
    ``"log-minmax"``: the log of the scores to [0, 1] — for attention weights, which a softmax
    makes span orders of magnitude (min-max of the weights themselves shows one tile only)."""
    s = np.asarray(scores, dtype=np.float64)
    if how not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {how!r}")
    if how == "none":
        return s
    if how == "log-minmax":
        s = np.log(np.maximum(s, 1e-30))
    lo, hi = float(s.min()), float(s.max())
    return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)


def blend(
    thumb: np.ndarray, hm: Heatmap, vmin: float, vmax: float, cmap: str = "jet", alpha: float = 0.5
) -> np.ndarray:
    """The thumbnail with the score colours alpha-blended where tiles are."""
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    if thumb.shape[:2] != hm.grid.shape:
        raise ValueError(f"thumbnail {thumb.shape[:2]} and heatmap grid {hm.grid.shape} differ")
    norm = np.clip((hm.grid - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colour = (cm(np.nan_to_num(norm))[..., :3] * 255).astype(np.float64)
    a = np.where(np.isnan(hm.grid), 0.0, alpha)[..., None]
    return (thumb.astype(np.float64) * (1 - a) + colour * a).round().astype(np.uint8)


def save_overlay_png(
    path: Path,
    overlay: np.ndarray,
    vmin: float,
    vmax: float,
    cmap: str,
    title: str,
    label: str = "instance score",
) -> Path:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = overlay.shape[:2]
    scale = 8.0 / max(h, w)
    fig = Figure(figsize=(w * scale + 1.6, h * scale + 0.6), dpi=max(100, int(max(h, w) / 8)))
    ax = fig.subplots()
    ax.imshow(overlay, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=ax, fraction=0.046, pad=0.02, label=label)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def geojson(coords: np.ndarray, scores: np.ndarray, tile_size_level0: float, name: str = "mil score") -> dict:
    """A QuPath-importable FeatureCollection: one detection polygon per tile in level-0 pixels,
    with the score as a measurement and a property."""
    s = float(tile_size_level0)
    feats = []
    for (x, y), v in zip(np.asarray(coords, dtype=np.float64), np.asarray(scores, dtype=np.float64)):
        x, y = float(x), float(y)
        feats.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                },
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": name},
                    "measurements": {"score": float(v)},
                    "score": float(v),
                },
            }
        )
    return {"type": "FeatureCollection", "features": feats}


def tile_size_from_attrs(attrs: dict, coords: np.ndarray, path: Path) -> float:
    """``tile_size_level0`` from the feature file, else the smallest grid step of the coords."""
    v = attrs.get("tile_size_level0")
    if v not in (None, "", 0):
        return float(v)
    for axis in (0, 1):
        u = np.unique(np.asarray(coords)[:, axis])
        if len(u) > 1:
            return float(np.diff(u).min())
    raise ValueError(
        f"{path}: no tile_size_level0 attribute and the coords do not show a grid step; "
        f"pass --tile-size (level-0 pixels)"
    )


def write_heatmap(
    out_dir: Path,
    *,
    thumb: np.ndarray,
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size_level0: float,
    slide_dimensions: tuple[int, int],
    normalize: str = "minmax",
    cmap: str = "jet",
    title: str = "",
    geojson_out: bool = False,
    mask_out: bool = False,
    mask_threshold: float = 0.5,
    mpp: float | None = None,
    meta: dict | None = None,
) -> dict:
    """Write ``heatmap.png`` (with colour bar), ``overlay.png`` (thumbnail size), ``heatmap.json``
    and optionally ``tiles.geojson`` (raw scores) and ``mask.png`` (+ ``mask.png.json``): the
    pixels whose position on the colour bar is at least ``mask_threshold`` (what looks hot on the
    heatmap). Returns the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = normalize_scores(scores, normalize)
    hm = rasterize(coords, s, tile_size_level0, slide_dimensions, (thumb.shape[1], thumb.shape[0]))
    vmin, vmax = (0.0, 1.0) if normalize != "none" else (float(np.min(s)), float(np.max(s)))
    overlay = blend(thumb, hm, vmin, vmax, cmap)
    from PIL import Image

    with atomic_path(out_dir / "overlay.png") as tmp:
        Image.fromarray(overlay).save(tmp, format="PNG")
    label = {
        "none": "instance score",
        "minmax": "instance score (min-max over the slide)",
        "log-minmax": "log instance score (min-max over the slide)",
    }[normalize]
    save_overlay_png(out_dir / "heatmap.png", overlay, vmin, vmax, cmap, title, label)
    px, py = hm.peak()
    info = {
        "downsample": list(hm.downsample),
        "thumbnail_size": [int(thumb.shape[1]), int(thumb.shape[0])],
        "slide_dimensions": list(slide_dimensions),
        "tile_size_level0": tile_size_level0,
        "normalize": normalize,
        "vmin": vmin,
        "vmax": vmax,
        "n_tiles": int(len(s)),
        "peak_thumbnail_xy": [px, py],
        "peak_level0_xy": list(hm.peak_level0()),
        "score_min": float(np.min(scores)),
        "score_max": float(np.max(scores)),
        **(meta or {}),
    }
    if geojson_out:
        atomic_write_text(out_dir / "tiles.geojson", json.dumps(geojson(coords, scores, tile_size_level0)))
        info["geojson"] = "tiles.geojson"
    if mask_out:
        ds = float(hm.downsample[0])
        rel = (hm.grid - vmin) / max(vmax - vmin, 1e-12)  # position on the colour bar
        m = np.nan_to_num(rel, nan=-math.inf) >= mask_threshold
        TissueMask(
            m,
            ds,
            method="mil-heatmap",
            slide_dimensions=tuple(slide_dimensions),
            mpp=mpp * ds if mpp else None,
            meta={"threshold": mask_threshold, "normalize": normalize},
        ).save(out_dir / "mask.png")
        info["mask"] = "mask.png"
    atomic_write_text(out_dir / "heatmap.json", json.dumps(info, indent=2))
    return info
