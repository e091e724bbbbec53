"""A full-resolution reference tissue mask of a real slide, to score thumbnail masks against.

:func:`reference_tissue_mask` works on level-0 pixels (or the finest level of at most ~24 Mpx),
not on a thumbnail, and without Otsu:

1. **Glass colour**: the median colour of the bright (mean > 200), nearly grey pixels — the
   empty glass of the slide (white where the scanner left blank tiles is brighter still).
2. **Stain**: a pixel absorbs light when its optical density relative to the glass,
   ``OD = Σ_c −log10(I_c / glass_c)``, exceeds ``od_threshold`` (0.12 by default: pale loose
   stroma of the demo slide sits near 0.25, empty glass below 0.05).
3. **Morphology**, in micrometres so the rule is the same at every resolution: opening with a disk
   of radius 1 µm removes dust and JPEG specks; closing with a disk of 4 µm bridges the gaps
   between collagen fibres and around nuclei; holes smaller than (60 µm)² are filled (lumina and
   tears larger than that stay background); objects smaller than (40 µm)² are dropped.

The rule was checked by eye on the demo slide and the real test slides (overlays written by
``slidestream bench tissue --overlays DIR``). :func:`downsample_mask` brings the reference to a
thumbnail's grid (a cell is tissue when at least half of its level-0 pixels are).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def reference_tissue_mask(
    slide: str | Path,
    *,
    mpp: float | None = None,
    od_threshold: float = 0.12,
    max_pixels: int = 24_000_000,
) -> tuple[np.ndarray, float]:
    """``(mask, downsample)``: the reference tissue mask (bool ``(h, w)``) of ``slide`` at the
    finest level of at most ``max_pixels`` pixels, and that level's downsample from level 0.
    ``mpp`` (level 0 µm/px) is needed when the slide does not record it: the morphology is in µm."""
    from scipy import ndimage as ndi

    from wsi import open_slide
    from wsi.tissue import clean_mask

    with open_slide(slide) as s:
        level = next(
            (i for i, (w, h) in enumerate(s.level_dimensions) if w * h <= max_pixels), s.level_count - 1
        )
        rgb = s.read_region((0, 0), level, s.level_dimensions[level])
        downsample = float(s.level_downsamples[level])
        base = mpp or s.mpp
        if not base:
            raise ValueError(f"{slide}: no µm/px in the file; pass mpp= for its reference mask")
        px_um = 1.0 / (base * downsample)  # pixels per µm at this level
    f = rgb.astype(np.float32)
    mean = f.mean(axis=2)
    grey = (f.max(axis=2) - f.min(axis=2)) < 20
    bright = (mean > 200) & grey
    glass = np.median(f[bright], axis=0) if bright.sum() > 100 else np.full(3, 255.0)
    od = -np.log10(np.clip(f, 1.0, None) / np.maximum(glass, 1.0)).sum(axis=2)
    mask = od > od_threshold
    um = px_um
    mask = ndi.binary_opening(mask, _disk(max(1, round(1 * um))))
    r = max(1, round(4 * um))
    mask = ndi.binary_closing(np.pad(mask, r, mode="edge"), _disk(r))[r:-r, r:-r]
    mask = clean_mask(mask, min_object_px=round((40 * um) ** 2), max_hole_px=round((60 * um) ** 2))
    return mask, downsample


def downsample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` on a coarser ``(h, w)`` grid covering the same area: a cell is True when at least
    half of the pixels it covers are."""
    from skimage.transform import resize

    frac = resize(mask.astype(np.float32), shape, order=1, anti_aliasing=True, preserve_range=True)
    return frac >= 0.5
