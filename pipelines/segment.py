"""``slidestream segment``: segmentation on annotated slides.

- ``slidestream segment train --config FILE.yaml [--resume] [--out DIR] [key=value ...]``: train a
  U-Net / SegFormer-style / linear-probe model on slides annotated in QuPath (GeoJSON) or by label
  masks (:mod:`pipelines.segment_train`; runs as is under ``torchrun``).
- ``slidestream segment predict SLIDE --checkpoint CKPT --out DIR [--mpp] [--tile] [--overlap]``:
  whole-slide prediction to an OME-Zarr label image, QuPath GeoJSON and an overlay PNG
  (:mod:`pipelines.segment_predict`).

:func:`demo_segmentation` is the demo's step: fine-tune a tiny model on the exact-label task of
:mod:`pipelines.bench.segment` and write an overlay PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="segment_cmd", metavar="{train,predict}", required=True)
    t = sub.add_parser("train", help="train on annotated slides", description="train on annotated slides")
    t.add_argument("--config", required=True, help="YAML config (see configs/segment/)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    t.add_argument("--out", default=None, help="output directory (overrides the config's `out`)")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=500 data.mpp=1.0")
    p = sub.add_parser("predict", help="predict a whole slide", description="predict a whole slide")
    p.add_argument("slide", help="slide path or URL")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `segment train`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mpp", type=float, default=None, help="µm/px to predict at (default: the training mpp)")
    p.add_argument("--tile", type=int, default=None, help="window size in px (default: the training tile)")
    p.add_argument("--overlap", type=int, default=None, help="window overlap in px (default: tile/4)")
    p.add_argument(
        "--margin", type=int, default=None, help="px dropped at inner window edges (default: overlap/4)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--tissue",
        default="otsu",
        choices=["otsu", "unet", "auto", "none"],
        help="tissue detection that restricts the windows (none: everywhere)",
    )
    p.add_argument("--slide-mpp", type=float, default=None, help="µm/px of level 0 when the slide lacks it")


def main(args: argparse.Namespace) -> int:
    if args.segment_cmd == "train":
        from pipelines.config import load_config
        from pipelines.segment_train import SegmentConfig, run_training

        overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
        cfg = load_config(SegmentConfig, args.config, overrides)
        result = run_training(cfg, resume=args.resume)
        if result["val"]:
            print(
                json.dumps(
                    {
                        "checkpoint": result["checkpoint"],
                        "classes": cfg.data.classes,
                        "dice": result["val"]["dice"],
                        "iou": result["val"]["iou"],
                        "mcc": result["val"]["mcc"],
                    }
                )
            )
        return 0
    from pipelines.segment_predict import predict_slide

    r = predict_slide(
        args.slide,
        args.checkpoint,
        args.out,
        mpp=args.mpp,
        tile=args.tile,
        overlap=args.overlap,
        margin=args.margin,
        batch_size=args.batch_size,
        device=args.device,
        tissue_method=args.tissue,
        slide_mpp=args.slide_mpp,
    )
    print(
        json.dumps(
            {
                "zarr": str(r.zarr),
                "geojson": str(r.geojson),
                "overlay": str(r.overlay),
                "shape": list(r.shape),
                "mpp": r.mpp,
                "windows": r.windows,
                "windows_skipped": r.windows_skipped,
                "seconds": round(r.seconds, 2),
            }
        )
    )
    return 0


def demo_segmentation(out_dir: str | Path, minutes_budget: float = 2.0, *, seed: int = 0) -> dict[str, Any]:
    """Fine-tune a tiny U-Net on the exact-label task and predict a held-out composite slide.

    The number of steps is chosen to fit ``minutes_budget`` (measured: a few steps are timed
    first). Writes ``out_dir/overlay.png`` (prediction over the slide, next to the exact labels)
    and returns per-class Dice and the paths."""
    import numpy as np
    from PIL import Image

    from pipelines.bench.segment import TASK_CLASSES, make_exact_label_task
    from pipelines.segment_predict import class_color, predict_slide
    from pipelines.segment_train import exact_task_config, run_training
    from wsi.atomic import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = make_exact_label_task(out / "task" / "train", seed=seed)
    val = make_exact_label_task(out / "task" / "val", seed=seed + 1000)
    probe = exact_task_config(train, val, out / "probe", steps=5, seed=seed)
    tp = time.perf_counter()
    run_training(probe, quiet=True)
    per_step = (time.perf_counter() - tp) / 5
    left = minutes_budget * 60 - (time.perf_counter() - t0) - 20  # keep time for prediction
    steps = int(max(80, min(400, left / max(per_step, 1e-3))))
    cfg = exact_task_config(train, val, out / "run", steps=steps, seed=seed)
    result = run_training(cfg, quiet=True)
    pred = predict_slide(val["slide"], result["checkpoint"], out / "prediction", progress=False)
    with Image.open(pred.overlay) as im:
        overlay = np.asarray(im.convert("RGB"))
    with Image.open(val["labels"]) as im:
        truth = np.asarray(im.resize(overlay.shape[1::-1], Image.Resampling.NEAREST))
    lut = np.array([class_color(c) for c in range(len(TASK_CLASSES))], np.uint8)
    side = np.concatenate([overlay, np.full((overlay.shape[0], 8, 3), 255, np.uint8), lut[truth]], axis=1)
    path = out / "overlay.png"
    with atomic_path(path) as tmp:
        Image.fromarray(side).save(tmp, format="PNG")
    return {
        "overlay": str(path),
        "classes": TASK_CLASSES,
        "dice": result["val"]["dice"],
        "steps": steps,
        "checkpoint": result["checkpoint"],
        "zarr": str(pred.zarr),
        "geojson": str(pred.geojson),
        "seconds": round(time.perf_counter() - t0, 1),
    }


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(prog="slidestream segment")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
