"""The exact-label segmentation task: composited slides whose labels are exact by construction.

A smooth random label map (background / tissue A / tissue B) is filled with real pixels: class 1
with the densest H&E tissue of the demo slide (CMU-1-Small-Region, CC0), class 2 with another crop
of it re-stained by swapping its haematoxylin and eosin channels in HED space (Ruifrok-Johnston
colour deconvolution) — real tissue structure in a clearly different stain — and class 0 with the
demo slide's own glass background. The composite is written as a real pyramidal TIFF
(:func:`wsi.synth.write_tiff_pyramid`) with the label map as a PNG label mask and as a QuPath
GeoJSON (contours), so a run goes through the same readers as user data.
:func:`exact_task_config` is a small CPU training config for it (the demo, ``bench segment``,
``eval --seg-task``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import DEMO_SLIDE

TASK_CLASSES = ["background", "tissue_he", "tissue_restained"]


def _tissue_fraction(rgb: np.ndarray) -> np.ndarray:
    f = rgb.astype(np.float32)
    return ((f.max(axis=2) - f.min(axis=2)) > 25) & (f.mean(axis=2) < 220)


def _densest(
    rgb: np.ndarray,
    side: int,
    *,
    lowest: bool = False,
    exclude: tuple[int, int] | None = None,
    step: int = 32,
) -> tuple[int, int]:
    """Top-left (y, x) of the ``side``² window with the most (or least) tissue."""
    t = _tissue_fraction(rgb).astype(np.float64)
    sat = np.pad(t.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, where = None, (0, 0)
    for y in range(0, rgb.shape[0] - side + 1, step):
        for x in range(0, rgb.shape[1] - side + 1, step):
            if exclude is not None and abs(y - exclude[0]) < side // 2 and abs(x - exclude[1]) < side // 2:
                continue
            v = sat[y + side, x + side] - sat[y, x + side] - sat[y + side, x] + sat[y, x]
            v = -v if lowest else v
            if best is None or v > best:
                best, where = v, (y, x)
    return where


def _restain(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    swapped = hed[..., [1, 0, 2]]
    return (np.clip(hed2rgb(swapped), 0, 1) * 255).round().astype(np.uint8)


def _label_map(size: tuple[int, int], seed: int, scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    w, h = size
    rng = np.random.default_rng(seed)
    f1 = gaussian_filter(rng.standard_normal((h, w)), scale, mode="wrap")
    f2 = gaussian_filter(rng.standard_normal((h, w)), scale * 1.3, mode="wrap")
    labels = np.zeros((h, w), np.uint8)
    tissue = f1 > np.quantile(f1, 0.35)
    labels[tissue & (f2 >= np.median(f2[tissue]))] = 1
    labels[tissue & (f2 < np.median(f2[tissue]))] = 2
    return labels


def make_exact_label_task(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: tuple[int, int] = (768, 768),
    mpp: float = 1.0,
    demo: str | Path = DEMO_SLIDE,
) -> dict[str, Any]:
    """Write ``slide.tif`` (+ ``labels.png``, ``labels.geojson``) for one composite; return paths."""
    from PIL import Image

    from wsi.annotations import to_geojson_feature
    from wsi.atomic import atomic_path, atomic_write_text
    from wsi.slide import open_slide
    from wsi.synth import mirror_tile, write_tiff_pyramid

    from ..segment.outputs import label_polygons

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(demo) as s:
        base = s.require_mpp()
        W0, H0 = s.dimensions
        src = s.read_region_mpp((0, 0), (round(W0 * base / mpp), round(H0 * base / mpp)), mpp)
    side = min(384, min(src.shape[:2]) // 2)
    ya, xa = _densest(src, side)
    yb, xb = _densest(src, side, exclude=(ya, xa))
    yg, xg = _densest(src, min(96, side), lowest=True)
    tex_a = mirror_tile(src[ya : ya + side, xa : xa + side], size)
    tex_b = mirror_tile(_restain(np.rot90(src[yb : yb + side, xb : xb + side])), size)
    glass = mirror_tile(src[yg : yg + min(96, side), xg : xg + min(96, side)], size)
    labels = _label_map(size, seed, scale=size[0] / 10)
    img = np.where((labels == 1)[..., None], tex_a, np.where((labels == 2)[..., None], tex_b, glass))
    slide_path = out / "slide.tif"
    write_tiff_pyramid(
        slide_path,
        np.ascontiguousarray(img),
        tile=256,
        downsamples=(1, 4),
        compression="deflate",
        mpp=mpp,
        flavor="generic",
    )
    with atomic_path(out / "labels.png") as tmp:
        Image.fromarray(labels).save(tmp, format="PNG")
    feats = [to_geojson_feature(rings, TASK_CLASSES[c]) for c, rings in label_polygons(labels, 1.0)]
    atomic_write_text(out / "labels.geojson", json.dumps({"type": "FeatureCollection", "features": feats}))
    return {
        "slide": str(slide_path),
        "labels": str(out / "labels.png"),
        "geojson": str(out / "labels.geojson"),
        "classes": list(TASK_CLASSES),
        "mpp": mpp,
        "size": list(size),
    }


def majority_dice(labels: np.ndarray, n_classes: int) -> list[float]:
    """Per-class Dice of predicting the most frequent class everywhere (the baseline)."""
    counts = np.bincount(labels.ravel(), minlength=n_classes).astype(np.float64)
    major = int(counts.argmax())
    return [float(2 * counts[c] / (counts[c] + labels.size)) if c == major else 0.0 for c in range(n_classes)]


def exact_task_config(
    train_task: dict, val_task: dict, out: str | Path, *, steps: int = 150, seed: int = 0, kind: str = "unet"
):
    """A :class:`pipelines.segment.SegmentConfig` for the exact-label task (tiny U-Net, CPU)."""
    from ..segment.config import (
        AnnotatedSlideConfig,
        SegmentConfig,
        SegmentDataConfig,
        SegmentModelConfig,
        SegmentTrainConfig,
    )
    from ..training.optim import OptimConfig

    return SegmentConfig(
        out=str(out),
        model=SegmentModelConfig(kind=kind, unet_depth=3, unet_width=8, unet_norm="batch"),
        data=SegmentDataConfig(
            train=[AnnotatedSlideConfig(slide=train_task["slide"], annotations=train_task["labels"])],
            val=[AnnotatedSlideConfig(slide=val_task["slide"], annotations=val_task["labels"])],
            classes=list(train_task["classes"]),
            mpp=2.0,
            tile_size=64,
            val_max_tiles=64,
        ),
        optim=OptimConfig(
            lr=5e-3, min_lr=1e-4, warmup_steps=max(1, steps // 20), weight_decay=1e-4, clip_grad=1.0
        ),
        train=SegmentTrainConfig(
            steps=steps,
            batch_size=8,
            threads=1,
            val_every=steps,
            checkpoint_every=steps,
            seed=seed,
            device="cpu",
            loss={"ce": 1.0, "dice": 1.0},
        ),
    )
