"""The demo's segmentation step: fine-tune a tiny U-Net on the exact-label task
(:func:`pipelines.tasks.make_exact_label_task`) within a time budget, predict a held-out slide and
draw the prediction next to its exact labels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def demo_segmentation(out_dir: str | Path, minutes_budget: float = 2.0, *, seed: int = 0) -> dict[str, Any]:
    """Fine-tune a tiny U-Net on the exact-label task and predict a held-out composite slide.

    The number of steps is chosen to fit ``minutes_budget`` (measured: a few steps are timed
    first). Writes ``out_dir/overlay.png`` (prediction over the slide, next to the exact labels)
    and returns per-class Dice and the paths."""
    import numpy as np
    from PIL import Image

    from wsi.atomic import atomic_path

    from ..segment import class_color, predict_slide, run_training
    from ..tasks import TASK_CLASSES, exact_task_config, make_exact_label_task

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = make_exact_label_task(out / "task" / "train", seed=seed)
    val = make_exact_label_task(out / "task" / "val", seed=seed + 1000, heldout=True)
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
