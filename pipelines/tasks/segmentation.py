"""The exact-label segmentation task: composited slides whose labels are exact by construction and
whose two tissue classes have the same colours.

A smooth random label map (background / stroma / epithelium) is filled with real pixels of the
demo slide (CMU-1-Small-Region, CC0): class 1 with patches of its dermal stroma, class 2 with
patches of its squamous epithelium (the tissue types of :func:`pipelines.tasks.tissue_type_map`),
class 0 with its glass. Every tissue patch is colour-matched rank for rank to one shared reference
(:func:`pipelines.tasks.match_colours`), so stroma and epithelium pixels have exactly the same
colour distribution: a per-pixel colour classifier cannot tell them apart
(:func:`pixel_colour_baseline` measures it) and a model must read morphology. A held-out composite
(``heldout=True``) takes its patches from other places of the slide (the test blocks of a
checkerboard; no source crop is shared with a training composite) and is built with another seed.
The composite is written as a real pyramidal TIFF (:func:`wsi.synth.write_tiff_pyramid`) with the
label map as a PNG label mask and as a QuPath GeoJSON (contours), so a run goes through the same
readers as user data. :func:`exact_task_config` is a small CPU training config for it (the demo,
``bench segment``, ``eval --seg-task``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import DEMO_SLIDE

TASK_CLASSES = ["background", "stroma", "epithelium"]


def _glass(rgb: np.ndarray, side: int, step: int = 32) -> tuple[int, int]:
    """Top-left (y, x) of the ``side``² window of ``rgb`` with the least tissue."""
    f = rgb.astype(np.float32)
    t = (((f.max(axis=2) - f.min(axis=2)) > 25) & (f.mean(axis=2) < 220)).astype(np.float64)
    sat = np.pad(t.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, where = None, (0, 0)
    for y in range(0, rgb.shape[0] - side + 1, step):
        for x in range(0, rgb.shape[1] - side + 1, step):
            v = sat[y + side, x + side] - sat[y, x + side] - sat[y + side, x] + sat[y, x]
            if best is None or v < best:
                best, where = v, (y, x)
    return where


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
    heldout: bool = False,
    patch: int = 64,
    per_class: int = 48,
) -> dict[str, Any]:
    """Write ``slide.tif`` (+ ``labels.png``, ``labels.geojson``) for one composite; return paths.

    ``heldout=True`` draws the tissue patches from the slide's test blocks (training composites:
    its training blocks); give it another ``seed`` than the training composite."""
    from PIL import Image

    from wsi.annotations import to_geojson_feature
    from wsi.atomic import atomic_path, atomic_write_text
    from wsi.slide import open_slide
    from wsi.synth import mirror_tile, write_tiff_pyramid

    from ..segment.outputs import label_polygons
    from .tissue_types import colour_reference, fill_mosaic, tissue_patches

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = {1: 0, 2: 1}  # task class -> tissue type (stroma, epithelium)
    patches = tissue_patches(demo, per_class=per_class, size=patch, mpp=mpp, test=heldout, seed=seed)
    train_patches = (
        patches
        if not heldout
        else tissue_patches(demo, per_class=per_class, size=patch, mpp=mpp, test=False, seed=0)
    )
    missing = [TASK_CLASSES[c] for c, t in kinds.items() if t not in patches or t not in train_patches]
    if missing:
        raise ValueError(f"{demo}: no {', '.join(missing)} patches for the exact-label task")
    # one reference for every composite (training and held-out): the training patches' colours
    ref = colour_reference([*train_patches[0], *train_patches[1]], patch * patch, seed=0)
    with open_slide(demo) as s:
        base = s.require_mpp()
        W0, H0 = s.dimensions
        src = s.read_region_mpp((0, 0), (round(W0 * base / mpp), round(H0 * base / mpp)), mpp)
    side = min(96, min(src.shape[:2]) // 2)
    yg, xg = _glass(src, side)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0])
    tex = {c: fill_mosaic(shape, patches[t], rng, ref) for c, t in kinds.items()}
    glass = mirror_tile(src[yg : yg + side, xg : xg + side], size)
    labels = _label_map(size, seed, scale=size[0] / 10)
    img = np.where((labels == 1)[..., None], tex[1], np.where((labels == 2)[..., None], tex[2], glass))
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
        "heldout": heldout,
        "seed": seed,
    }


def pixel_colour_baseline(train_task: dict, val_task: dict, *, levels: int = 32) -> list[float]:
    """The shortcut: per-class Dice on the held-out composite of the best per-pixel colour
    classifier the training composite supports — a lookup table from the colour (RGB quantised to
    ``levels`` per channel) to the class most frequent with that colour in training (the majority
    class for unseen colours). It separates glass from tissue; stroma from epithelium it can only
    guess, since their colours are matched."""
    from PIL import Image

    from wsi import open_slide

    q = 256 // levels

    def load(task):
        with Image.open(task["labels"]) as im:
            lab = np.asarray(im).ravel().astype(np.int64)
        with open_slide(task["slide"]) as s:
            img = s.read_region((0, 0), 0, s.dimensions).reshape(-1, 3).astype(np.int64) // q
        return (img[:, 0] * levels + img[:, 1]) * levels + img[:, 2], lab

    n = len(TASK_CLASSES)
    bins, y = load(train_task)
    counts = np.bincount(bins * n + y, minlength=levels**3 * n).reshape(levels**3, n)
    table = np.where(counts.sum(1) > 0, counts.argmax(1), np.bincount(y, minlength=n).argmax())
    vbins, vy = load(val_task)
    return _dice(table[vbins], vy, n)


def _dice(pred: np.ndarray, truth: np.ndarray, n: int) -> list[float]:
    out = []
    for c in range(n):
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out.append(float(2 * (p & t).sum() / denom) if denom else 1.0)
    return out


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
