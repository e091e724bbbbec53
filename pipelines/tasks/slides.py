"""Small slide archives with a known positive region, cut from real pixels: every other slide
carries a square of a different real tissue at a tile-aligned place (:func:`make_real_slides`).
The MIL known-answer check, the demo and the notebooks use it: a slide-level label that a model
can only learn from the inserted tissue, and a region its heatmap must find."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import DEMO_SLIDE


def _tissue_fraction(img: np.ndarray) -> float:
    return float((img.mean(-1) < 215).mean())


def _other_tissue(demo: np.ndarray, testdata: Path | None) -> tuple[np.ndarray, str]:
    """Pixels of a different real tissue: the central part of the TCGA frozen section when a
    test-data folder holding it is given (``--testdata``; kidney-48-5.tif holds only a speck of
    tissue), else a stain-shifted copy of the demo slide (stated in the result)."""
    from wsi.slide import open_slide

    p = Path(testdata) / "histolab/tcga-cr-7395-01a-01-ts1.svs" if testdata else None
    if p is not None and p.is_file():
        with open_slide(p) as s:
            w, h = s.dimensions
            img = s.read_region((w // 4, h // 4), 0, (w // 2, h // 2))
        if _tissue_fraction(img) > 0.5:
            return img, "histolab/tcga-cr-7395-01a-01-ts1.svs (TCGA frozen section)"
    shifted = demo[..., [2, 0, 1]]  # channel rotation: same morphology, different stain
    return np.ascontiguousarray(shifted), "stain-shifted demo (no test data given)"


def _random_crop(img: np.ndarray, size: int, rng: np.random.Generator, min_tissue: float) -> np.ndarray:
    h, w = img.shape[:2]
    best = None
    for _ in range(200):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        c = img[y : y + size, x : x + size]
        f = _tissue_fraction(c)
        if f >= min_tissue:
            return c
        if best is None or f > best[0]:
            best = (f, c)
    return best[1]


def make_real_slides(
    out: Path,
    n_slides: int = 20,
    *,
    size: int = 896,
    tile: int = 224,
    region_tiles: int = 2,
    seed: int = 0,
    demo_path: Path | None = None,
    testdata: Path | None = None,
) -> dict:
    """Write ``n_slides`` pyramidal TIFFs (mpp 0.5) cut from the demo slide; every other one
    carries a ``region_tiles × tile`` square of a different real tissue at a tile-aligned place.
    Returns ``{"slides": [...], "other_tissue": str}`` with each slide's label and region box."""
    from wsi.synth import load_demo_pixels, write_tiff_pyramid

    demo = load_demo_pixels(demo_path or DEMO_SLIDE)
    other, other_name = _other_tissue(demo, testdata)
    rng = np.random.default_rng(seed)
    r = region_tiles * tile
    n_pos_places = size // tile - region_tiles + 1
    out.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(n_slides):
        img = _random_crop(demo, size, rng, 0.7).copy()
        box = None
        if i % 2 == 0:
            ty, tx = (int(v) * tile for v in rng.integers(0, n_pos_places, 2))
            img[ty : ty + r, tx : tx + r] = _random_crop(other, r, rng, 0.6)
            box = [tx, ty, tx + r, ty + r]
        path = out / f"real{i:02d}.tif"
        write_tiff_pyramid(
            path, img, tile=256, downsamples=(1, 4), compression="jpeg", quality=90, mpp=0.5, flavor="aperio"
        )
        slides.append(
            {"path": str(path), "slide_id": path.stem, "label": int(box is not None), "region": box}
        )
    return {"slides": slides, "other_tissue": other_name}
