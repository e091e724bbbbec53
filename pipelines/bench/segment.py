"""``slidestream bench segment``: segmentation known-answer checks.

The task (:func:`make_exact_label_task`): composited slides whose labels are exact by
construction. A smooth random label map (background / tissue A / tissue B) is filled with real
pixels: class 1 with the densest H&E tissue of the demo slide (CMU-1-Small-Region, CC0), class 2
with another crop of it re-stained by swapping its haematoxylin and eosin channels in HED space
(Ruifrok-Johnston colour deconvolution) — real tissue structure in a clearly different stain —
and class 0 with the demo slide's own glass background. The composite is written as a real
pyramidal TIFF (``wsi.synth.write_tiff_pyramid``) with the label map as a PNG label mask and as a
QuPath GeoJSON (contours), so the benchmark goes through the same readers as user data.

The benchmark trains a tiny U-Net for a short CPU run (``slidestream segment train`` code path),
reports per-class Dice/IoU/MCC on a held-out composite, compares with a majority-class baseline,
and checks stitching: sliding-window prediction with overlap vs one whole-image forward pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "CMU-1-Small-Region.svs"
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
    demo: str | Path = DEMO,
) -> dict[str, Any]:
    """Write ``slide.tif`` (+ ``labels.png``, ``labels.geojson``) for one composite; return paths."""
    from PIL import Image

    from pipelines.segment_predict import label_polygons
    from wsi.annotations import to_geojson_feature
    from wsi.slide import open_slide
    from wsi.synth import mirror_tile, write_tiff_pyramid

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
    Image.fromarray(labels).save(out / "labels.png")
    feats = [to_geojson_feature(rings, TASK_CLASSES[c]) for c, rings in label_polygons(labels, 1.0)]
    (out / "labels.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the short CPU run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work-dir", default=None, help="keep the task and outputs here (default: a temp dir)"
    )


def main(args: argparse.Namespace) -> int:
    from pipelines.segment_predict import stitching_check
    from pipelines.segment_train import exact_task_config, run_training

    with tempfile.TemporaryDirectory(prefix="seg-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        t0 = time.perf_counter()
        train_task = make_exact_label_task(work / "train", seed=args.seed)
        val_task = make_exact_label_task(work / "val", seed=args.seed + 1000)
        t_task = time.perf_counter() - t0
        cfg = exact_task_config(train_task, val_task, work / "run", steps=args.steps, seed=args.seed)
        t0 = time.perf_counter()
        result = run_training(cfg, quiet=args.json)
        t_train = time.perf_counter() - t0
        from PIL import Image

        with Image.open(val_task["labels"]) as im:
            val_labels = np.asarray(im)
        base = majority_dice(val_labels, len(TASK_CLASSES))
        t0 = time.perf_counter()
        stitch = stitching_check(val_task["slide"], work / "stitch")
        t_stitch = time.perf_counter() - t0
        m = result["val"]
        report = {
            "task": "composite: background / demo H&E tissue / HED-restained demo tissue, exact labels",
            "classes": TASK_CLASSES,
            "per_class_dice": m["dice"],
            "per_class_iou": m["iou"],
            "per_class_mcc": m["mcc"],
            "mean_dice": float(np.mean(m["dice"])),
            "baseline_majority_dice": base,
            "mean_dice_over_baseline": float(np.mean(m["dice"]) / max(1e-9, np.mean(base))),
            "steps": cfg.train.steps,
            "train_s": round(t_train, 2),
            "task_build_s": round(t_task, 2),
            "stitching": stitch,
            "stitch_s": round(t_stitch, 2),
            "passed": bool(min(m["dice"]) >= 0.9 and stitch["max_abs_diff"] <= stitch["tolerance"]),
        }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
