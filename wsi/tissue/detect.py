"""Tissue foreground masks on slide thumbnails.

:func:`tissue_mask` returns a :class:`wsi.tissue.TissueMask` computed on a thumbnail (about 1k px
on the long side) by one of:

- ``"otsu"``: classical — Otsu threshold on HSV saturation, combined with a not-white test on
  optical density; very dark unsaturated pixels (black scanner borders, black background) are
  never tissue; then closing, hole filling and small-object removal (scikit-image).
- ``"unet"``: the small U-Net shipped in ``models/weights/tissue_unet.safetensors`` (trained by
  ``slidestream tissue train`` on composited thumbnails with exact labels). ``torch`` is imported
  only when this method runs.
- ``"auto"`` (:data:`DEFAULT_METHOD`, the default of every job): ``"unet"`` when the shipped
  weights exist, else ``"otsu"``.
- ``"mask"``: a user mask (image or QuPath GeoJSON) replaces the computed one; see
  :func:`load_user_mask`.

The array-level functions :func:`otsu_mask` and :func:`unet_probability` work on any RGB uint8
thumbnail and are what the benchmark and training code use.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .masks import TissueMask

METHODS = ("auto", "otsu", "unet", "mask")
#: the method every job computes tissue masks with unless told otherwise (the one place it is
#: set: the loader, pretraining, embedding, segmentation prediction, tissue QC and the tasks all
#: default to it): the shipped U-Net, Otsu when its weights are missing
DEFAULT_METHOD = "auto"


def default_weights_path() -> Path | None:
    """Where the shipped U-Net weights live (``models/weights/tissue_unet.safetensors``), found
    without importing ``models`` (and so without importing torch); None if ``models`` is absent."""
    spec = importlib.util.find_spec("models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "tissue_unet.safetensors"


def resolve_method(method: str, weights: str | os.PathLike | None = None) -> str:
    """``"auto"`` → ``"unet"`` when weights are available, else ``"otsu"``; others unchanged."""
    if method not in METHODS:
        raise ValueError(f"unknown tissue method {method!r}; choose one of {list(METHODS)}")
    if method != "auto":
        return method
    path = Path(weights) if weights is not None else default_weights_path()
    return "unet" if path is not None and path.exists() else "otsu"


# --- classical ------------------------------------------------------------------------------
def _saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = rgb.astype(np.float32)
    mx = f.max(axis=2)
    mn = f.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0)
    return sat, mx


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size < 2 or float(values.max()) == float(values.min()):
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values))


def otsu_mask(
    rgb: np.ndarray,
    *,
    min_object_px: int | None = None,
    max_hole_px: int | None = None,
    dark_value: int = 45,
    min_saturation: float = 0.05,
    max_saturation_threshold: float = 0.25,
    min_od: float = 0.08,
    closing_radius: int = 2,
    hysteresis: float = 0.5,
) -> np.ndarray:
    """Classical tissue mask of an RGB uint8 image (a thumbnail): bool (h, w).

    A pixel is tissue when its HSV saturation is above an Otsu threshold (computed over the
    pixels that are neither black nor white, clamped to [``min_saturation``,
    ``max_saturation_threshold``]) and its optical density (mean over RGB of -log10(I/255)) is
    above ``min_od`` (not white). Hysteresis: pixels above ``hysteresis`` times that threshold are
    tissue too when they connect to a pixel above it, which keeps pale tissue and tissue edges
    (on small pieces, an eroded edge costs much of the IoU) without adding isolated tinted
    background (``hysteresis=1`` turns it off). Pixels whose brightest channel is below
    ``dark_value`` (black borders, black backgrounds) are never tissue. The result is closed with a disk of
    ``closing_radius``, holes smaller than ``max_hole_px`` are filled and objects smaller than
    ``min_object_px`` removed (both default to a fraction of the image area).
    """
    rgb = _check_rgb(rgb)
    h, w = rgb.shape[:2]
    area = h * w
    if min_object_px is None:
        min_object_px = max(16, int(area * 2e-4))
    if max_hole_px is None:
        max_hole_px = max(16, int(area * 1e-3))
    sat, mx = _saturation(rgb)
    od = -np.log10(np.clip(rgb.astype(np.float32), 1.0, 255.0) / 255.0).mean(axis=2)
    dark = mx < dark_value
    # grow the dark region a little: JPEG/antialiasing halos at black borders are saturated
    dark = ndimage.binary_dilation(dark, _disk(2)) if dark.any() else dark
    candidates = ~dark & (od > min_od)
    t = _otsu(sat[candidates]) if candidates.sum() > 16 else max_saturation_threshold
    t = float(np.clip(t, min_saturation, max_saturation_threshold))
    if not 0 < hysteresis <= 1:
        raise ValueError(f"hysteresis must be in (0, 1], got {hysteresis!r}")
    if hysteresis < 1:
        from skimage.filters import apply_hysteresis_threshold

        mask = apply_hysteresis_threshold(np.where(candidates, sat, 0), t * hysteresis, t)
    else:
        mask = candidates & (sat > t)
    if closing_radius > 0:
        # pad so that closing does not erode objects touching the image edge
        r = closing_radius
        mask = ndimage.binary_closing(np.pad(mask, r, mode="edge"), _disk(r))[r:-r, r:-r]
    mask &= ~dark
    return clean_mask(mask, min_object_px=min_object_px, max_hole_px=max_hole_px)


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def clean_mask(mask: np.ndarray, *, min_object_px: int, max_hole_px: int) -> np.ndarray:
    """Fill holes of fewer than ``max_hole_px`` pixels, then drop objects of fewer than
    ``min_object_px`` pixels (8-connectivity for objects, 4 for holes)."""
    mask = np.asarray(mask, bool)
    if max_hole_px > 0:
        holes, n = ndimage.label(~mask)
        if n:
            sizes = np.bincount(holes.ravel())
            small = sizes < max_hole_px
            small[0] = False
            # a background region touching the border is not a hole
            border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
            small[border] = False
            mask = mask | small[holes]
    if min_object_px > 0:
        objs, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if n:
            sizes = np.bincount(objs.ravel())
            keep = sizes >= min_object_px
            keep[0] = False
            mask = keep[objs]
    return mask


# --- U-Net ----------------------------------------------------------------------------------
def unet_probability(rgb: np.ndarray, *, weights: str | os.PathLike | None = None) -> np.ndarray:
    """Tissue probability (float32 (h, w) in [0, 1]) of an RGB uint8 thumbnail from the U-Net.

    Imports torch (through ``models.seg.tissue_net``) on first use."""
    from models.seg import tissue_net  # lazy: torch only when the U-Net is used

    return tissue_net.predict_proba(_check_rgb(rgb), weights=weights)


def unet_mask(
    rgb: np.ndarray,
    *,
    weights: str | os.PathLike | None = None,
    threshold: float = 0.5,
    min_object_px: int | None = None,
    max_hole_px: int | None = None,
) -> np.ndarray:
    """U-Net tissue mask (bool (h, w)): probability > ``threshold``, then the same small-object
    removal and small-hole filling as :func:`otsu_mask`."""
    prob = unet_probability(rgb, weights=weights)
    area = prob.size
    if min_object_px is None:
        min_object_px = max(16, int(area * 2e-4))
    if max_hole_px is None:
        max_hole_px = max(16, int(area * 1e-3))
    return clean_mask(prob > threshold, min_object_px=min_object_px, max_hole_px=max_hole_px)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim == 3 and rgb.shape[2] == 4:
        rgb = rgb[..., :3]
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (h, w, 3), got {rgb.dtype} {rgb.shape}")
    return rgb


# --- slide level ----------------------------------------------------------------------------
def tissue_mask(
    slide: Any,
    *,
    method: str = DEFAULT_METHOD,
    thumbnail_size: int = 1024,
    min_object_px: int | None = None,
    max_hole_px: int | None = None,
    weights: str | os.PathLike | None = None,
    threshold: float = 0.5,
    mask_path: str | os.PathLike | None = None,
    thumbnail: np.ndarray | None = None,
) -> TissueMask:
    """Tissue mask of ``slide`` (a :class:`wsi.Slide`, or a path/URL that is opened and closed).

    ``method``: ``"auto"`` (U-Net when its weights ship, else Otsu), ``"otsu"``, ``"unet"`` or
    ``"mask"`` (``mask_path`` to a mask image or QuPath GeoJSON; see :func:`load_user_mask`;
    with ``"auto"``, a given ``mask_path`` wins too).
    The mask is computed on a thumbnail whose long side is ``thumbnail_size`` (a precomputed
    ``thumbnail`` of the whole slide may be passed instead); its ``downsample`` is level-0 px
    per mask px. ``min_object_px``/``max_hole_px`` are in mask pixels.
    """
    if not hasattr(slide, "get_thumbnail"):
        from ..slide import open_slide

        with open_slide(slide) as s:
            return tissue_mask(
                s,
                method=method,
                thumbnail_size=thumbnail_size,
                min_object_px=min_object_px,
                max_hole_px=max_hole_px,
                weights=weights,
                threshold=threshold,
                mask_path=mask_path,
                thumbnail=thumbnail,
            )
    if method == "mask" or (method == "auto" and mask_path is not None):
        if mask_path is None:
            raise ValueError("method='mask' needs mask_path= (a mask image or a QuPath GeoJSON)")
        return load_user_mask(slide, mask_path)
    method = resolve_method(method, weights)
    if thumbnail is None:
        thumbnail = slide.get_thumbnail((thumbnail_size, thumbnail_size))
    thumbnail = _check_rgb(thumbnail)
    W, H = slide.dimensions
    downsample = W / thumbnail.shape[1]
    if method == "otsu":
        mask = otsu_mask(thumbnail, min_object_px=min_object_px, max_hole_px=max_hole_px)
        meta: dict = {"thumbnail_size": list(thumbnail.shape[1::-1])}
    else:
        mask = unet_mask(
            thumbnail,
            weights=weights,
            threshold=threshold,
            min_object_px=min_object_px,
            max_hole_px=max_hole_px,
        )
        meta = {
            "thumbnail_size": list(thumbnail.shape[1::-1]),
            "threshold": threshold,
            "weights": str(weights) if weights else "shipped",
        }
    mpp = slide.mpp * downsample if getattr(slide, "mpp", None) else None
    return TissueMask(mask, downsample, method=method, slide_dimensions=(W, H), mpp=mpp, meta=meta)


# --- user masks -----------------------------------------------------------------------------
def load_user_mask(slide: Any, path: str | os.PathLike, *, max_side: int = 4096) -> TissueMask:
    """A user-provided mask for ``slide``: a mask image (PNG/TIFF/JPEG; any size aligned to level
    0, non-zero = tissue; the downsample is inferred from the sizes) or a QuPath GeoJSON export
    (Polygon/MultiPolygon features in level-0 coordinates, holes respected), rasterised at a
    downsample that keeps the mask within ``max_side`` px."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"user mask {path} not found; pass a mask image or a QuPath GeoJSON")
    W, H = slide.dimensions
    mpp0 = getattr(slide, "mpp", None)
    if path.suffix.lower() in (".geojson", ".json"):
        from ..annotations import geojson_mask

        downsample = max(1.0, max(W, H) / max_side)
        mask = geojson_mask(path, (W, H), downsample)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(
                f"cannot read user mask image {path}: {e}; save it as PNG (0 = background)"
            ) from e
        mh, mw = arr.shape
        dx, dy = W / mw, H / mh
        if abs(dx - dy) > 0.02 * max(dx, dy) + 1.0 / min(mw, mh) * max(dx, dy):
            raise ValueError(
                f"user mask {path} is {mw}x{mh}, not proportional to the slide's {W}x{H}; "
                "export the mask for the whole slide (any size, same aspect ratio)"
            )
        downsample = dx
        mask = arr > 0
    mpp = mpp0 * downsample if mpp0 else None
    return TissueMask(
        mask, downsample, method="mask", slide_dimensions=(W, H), mpp=mpp, meta={"source": str(path)}
    )
