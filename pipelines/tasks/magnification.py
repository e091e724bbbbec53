"""The magnification task: tiles of real tissue at several µm/px, the label being the
magnification — a patch-classification task with exact labels from any slide with mpp metadata
(the demo and the notebooks build it from the shipped CC0 slide). Tiles are read with
:meth:`wsi.Slide.read_regions_mpp`, one batched call per (µm/px, split)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..evaluate.patch_tasks import PatchTask


def build_magnification_task(
    slide_paths: list[str | Path],
    *,
    mpps: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0),
    tile: int = 64,
    per_class: int = 120,
    test_fraction: float = 0.3,
    min_tissue: float = 0.6,
    seed: int = 0,
) -> PatchTask:
    """Tiles of real tissue at several µm/px; the label is the magnification.

    The slide is cut into square blocks (twice the largest tile footprint) coloured like a
    checkerboard: training tiles lie inside "white" blocks, test tiles inside "black" ones, so a
    test tile never overlaps a training tile while both sample the same kinds of tissue.
    """
    from wsi import open_slide
    from wsi.tissue import tissue_mask

    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    labels: list[int] = []
    is_test: list[bool] = []
    for path in slide_paths:
        with open_slide(path) as slide:
            mask = tissue_mask(slide)
            W, H = slide.dimensions
            base = slide.require_mpp()
            block = 2 * tile * max(mpps) / base
            nbx, nby = max(1, int(W // block)), max(1, int(H // block))
            blocks = [(bx, by) for by in range(nby) for bx in range(nbx)]
            for label, mpp in enumerate(mpps):
                size0 = tile * mpp / base
                n_wanted = per_class // len(slide_paths)
                n_test = int(round(n_wanted * test_fraction))
                for test, n in ((True, n_test), (False, n_wanted - n_test)):
                    mine = [b for b in blocks if ((b[0] + b[1]) % 2 == 1) == test] or blocks
                    tries = 0
                    locs: list[tuple[int, int]] = []
                    while len(locs) < n and tries < n * 400:
                        tries += 1
                        bx, by = mine[int(rng.integers(len(mine)))]
                        x = bx * block + rng.uniform(0, block - size0)
                        y = by * block + rng.uniform(0, block - size0)
                        if mask.fraction(x, y, size0, size0) >= min_tissue:
                            locs.append((int(x), int(y)))
                    images.extend(slide.read_regions_mpp(locs, (tile, tile), mpp))
                    labels.extend([label] * len(locs))
                    is_test.extend([test] * len(locs))
    if not images:
        raise ValueError("no tissue tiles found in the given slides")
    im, lab, te = np.stack(images), np.array(labels), np.array(is_test)
    if te.all() or not te.any():
        raise ValueError("the slides are too small to hold separate training and test blocks at these mpps")
    classes = [f"{m:g} µm/px" for m in mpps]
    return PatchTask("magnification", classes, im[~te], lab[~te], im[te], lab[te])
