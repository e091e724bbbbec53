"""``slidestream bench segment``: segmentation known-answer checks.

The task (:func:`pipelines.tasks.make_exact_label_task`): composited slides of real tissue whose
labels are exact by construction (glass / the demo slide's stroma / its epithelium, both tissues
colour-matched to one reference so that only morphology separates them), written as a real
pyramidal TIFF with a PNG label mask and a QuPath GeoJSON, so the benchmark goes through the same
readers as user data. The held-out composite takes its patches from other places of the slide and
is built with another seed.

The benchmark trains a tiny U-Net for a short CPU run (``slidestream segment train`` code path),
reports per-class Dice/IoU/MCC on the held-out composite, compares with two baselines measured in
the same run — the majority class, and the shortcut: the best per-pixel colour classifier of the
training composite (:func:`pipelines.tasks.pixel_colour_baseline`) — and checks stitching:
sliding-window prediction with overlap vs one whole-image forward pass. It passes when the U-Net's
Dice is ≥ 0.8 on every class, the colour classifier's is < 0.65 on both tissue classes, and
stitching agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the short CPU run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work-dir", default=None, help="keep the task and outputs here (default: a temp dir)"
    )


def main(args: argparse.Namespace) -> int:
    from pipelines.segment import run_training, stitching_check
    from pipelines.tasks import (
        TASK_CLASSES,
        exact_task_config,
        majority_dice,
        make_exact_label_task,
        pixel_colour_baseline,
    )

    with tempfile.TemporaryDirectory(prefix="seg-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        t0 = time.perf_counter()
        train_task = make_exact_label_task(work / "train", seed=args.seed)
        val_task = make_exact_label_task(work / "val", seed=args.seed + 1000, heldout=True)
        t_task = time.perf_counter() - t0
        cfg = exact_task_config(train_task, val_task, work / "run", steps=args.steps, seed=args.seed)
        t0 = time.perf_counter()
        result = run_training(cfg, quiet=args.json)
        t_train = time.perf_counter() - t0
        from PIL import Image

        with Image.open(val_task["labels"]) as im:
            val_labels = np.asarray(im)
        base = majority_dice(val_labels, len(TASK_CLASSES))
        colour = pixel_colour_baseline(train_task, val_task)
        t0 = time.perf_counter()
        stitch = stitching_check(val_task["slide"], work / "stitch")
        t_stitch = time.perf_counter() - t0
        m = result["val"]
        report = {
            "task": "composite: glass / demo stroma / demo epithelium (colour-matched), exact labels",
            "classes": TASK_CLASSES,
            "per_class_dice": m["dice"],
            "per_class_iou": m["iou"],
            "per_class_mcc": m["mcc"],
            "mean_dice": float(np.mean(m["dice"])),
            "baseline_majority_dice": base,
            "baseline_pixel_colour_dice": colour,
            "mean_dice_over_baseline": float(np.mean(m["dice"]) / max(1e-9, np.mean(base))),
            "steps": cfg.train.steps,
            "train_s": round(t_train, 2),
            "task_build_s": round(t_task, 2),
            "stitching": stitch,
            "stitch_s": round(t_stitch, 2),
            "passed": bool(
                min(m["dice"]) >= 0.8
                and max(colour[1:]) < 0.65
                and stitch["max_abs_diff"] <= stitch["tolerance"]
            ),
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
