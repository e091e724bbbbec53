"""Mosaics of streamed tiles (demo and QC). Re-exported by :mod:`wsi.loader`.

torch is not imported here; :func:`save_mosaic_per_mpp` imports :mod:`wsi.loader` lazily when it
has to build a dataset from slides.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..atomic import atomic_path


def _to_hwc_list(images: Any) -> list[np.ndarray]:
    if hasattr(images, "detach"):  # a torch tensor batch (B, 3, H, W)
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    out = []
    for im in images:
        a = np.asarray(im.detach().cpu().numpy() if hasattr(im, "detach") else im)
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(1, 2, 0)
        if a.ndim == 2:
            a = a[..., None]
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        if a.dtype != np.uint8:
            raise ValueError(f"mosaic expects uint8 images, got {a.dtype}")
        out.append(a)
    return out


def mosaic(images: Any, ncols: int, *, pad: int = 2, fill: int = 255) -> np.ndarray:
    """One (H, W, 3) uint8 image with ``images`` (HWC or CHW arrays, or a (B,3,H,W) tensor) laid
    out row-major in ``ncols`` columns, ``pad`` px of ``fill`` between them. Tiles may differ in
    size; each cell is as large as the largest tile."""
    ims = _to_hwc_list(images)
    if not ims:
        raise ValueError("mosaic needs at least one image")
    if ncols <= 0:
        raise ValueError(f"ncols must be positive, got {ncols}")
    ch = max(a.shape[0] for a in ims)
    cw = max(a.shape[1] for a in ims)
    ncols = min(ncols, len(ims))
    nrows = math.ceil(len(ims) / ncols)
    out = np.full((nrows * ch + (nrows + 1) * pad, ncols * cw + (ncols + 1) * pad, 3), fill, np.uint8)
    for i, a in enumerate(ims):
        r, c = divmod(i, ncols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        out[y : y + a.shape[0], x : x + a.shape[1]] = a
    return out


def save_mosaic_per_mpp(
    dataset_or_slides: Any,
    out_png: str | os.PathLike,
    per_mpp: int = 16,
    *,
    ncols: int = 8,
    max_tiles: int = 4000,
    seed: int = 0,
) -> dict[float, int]:
    """Write one PNG with a block of ``per_mpp`` streamed tiles per magnification, each block
    labelled with its µm/px. ``dataset_or_slides``: a :class:`wsi.loader.TileDataset` (iterated in
    this process) or anything :func:`wsi.loader.resolve_slides` accepts (then a random-mode dataset
    with default mpps and ``seed`` is built). Stops after ``max_tiles`` streamed tiles even when a
    magnification has fewer than ``per_mpp`` (e.g. skipped by the upsample policy). Returns
    {mpp: tiles shown}."""
    from matplotlib.figure import Figure

    from .dataset import TileDataset

    ds = (
        dataset_or_slides
        if isinstance(dataset_or_slides, TileDataset)
        else TileDataset(dataset_or_slides, mode="random", seed=seed)
    )
    tiles: dict[float, list[np.ndarray]] = {round(m, 6): [] for m in ds.mpps}
    seen = 0
    it = iter(ds)
    try:
        for item in it:
            seen += 1
            m = round(float(item["mpp"]), 6)
            if m in tiles and len(tiles[m]) < per_mpp:
                tiles[m].append(item["image"].numpy())
            if all(len(v) >= per_mpp for v in tiles.values()) or seen >= max_tiles:
                break
    finally:
        it.close()
    shown = {m: v for m, v in tiles.items() if v}
    if not shown:
        raise ValueError("no tiles were streamed; check the slides and their tissue masks")
    blocks = [(m, mosaic(v, ncols)) for m, v in sorted(shown.items())]
    width = max(b.shape[1] for _, b in blocks)
    heights = [b.shape[0] for _, b in blocks]
    dpi = 100
    fig = Figure(figsize=(width / dpi + 1.6, sum(heights) / dpi + 0.4 * len(blocks)), dpi=dpi)
    axes = fig.subplots(len(blocks), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (m, b) in zip(axes, blocks):
        ax.imshow(b, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{m:g} µm/px", fontsize=12)
    missing = [f"{m:g}" for m, v in sorted(tiles.items()) if not v]
    note = (
        f" (none at {', '.join(missing)} µm/px: finer than level 0 without upsample, or no tissue)"
        if missing
        else ""
    )
    fig.suptitle("streamed tiles per magnification" + note)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return {m: len(v) for m, v in shown.items()}
