"""The demo's evaluation step: encoders compared on the tissue-type probe of the demo slide
(:func:`pipelines.tasks.build_tissue_type_task`: stroma / epithelium / dense-nuclear tiles, train
and test in separate blocks, every tile colour-matched so that only morphology tells the classes
apart), next to the colour-statistics shortcut measured on the same tiles.

Why this task and not the magnification task the demo used before: the self-supervised
augmentations (random resized crops, colour jitter) are built to make features invariant to scale
and colour, so a magnification or colour task rewards *not* pretraining; tissue morphology is what
pretraining should learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def demo_probe(
    encoders: dict[str, str], out_dir: str | Path, *, quick: bool = False, seeds=(0, 1, 2)
) -> dict[str, Any]:
    """``encoders``: ``{label: encoder spec}`` (:func:`models.encoders.parse_encoder`). Writes
    ``out_dir/results.md`` (+ csv/json) and returns ``{"rows", "shortcut", "task"}``: the eval rows
    of every encoder and the balanced accuracy of the colour-statistics shortcut per probe."""
    from models.encoders import parse_encoder

    from ..evaluate import evaluate_patch_task, run_eval
    from ..tasks import build_tissue_type_task, colour_statistics

    task = build_tissue_type_task(per_class=60 if quick else 120, seed=0)
    shortcut = evaluate_patch_task(
        task, colour_statistics(task.train_images), colour_statistics(task.test_images), seeds=list(seeds)
    )
    rows = run_eval(list(encoders.values()), [task], Path(out_dir), seeds=list(seeds), shots=5)
    name_of = {parse_encoder(spec).label: name for name, spec in encoders.items()}
    for r in rows:
        r["label"] = name_of.get(r["encoder"], r["encoder"])
    return {
        "rows": rows,
        "shortcut": {probe: res["balanced_accuracy"][0] for probe, res in shortcut.items()},
        "task": {
            "classes": task.classes,
            "n_train": int(len(task.train_labels)),
            "n_test": int(len(task.test_labels)),
        },
    }
