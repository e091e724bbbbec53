"""``slidestream mil train|predict|heatmap``, each in the one job convention
(``[--config FILE] [--out DIR] [flags] [KEY=VALUE ...]``)::

    slidestream mil train   --features DIR --labels labels.csv --head abmil --folds 5 --out RUN
    slidestream mil predict --model RUN --features DIR_OR_FILES... --out preds.csv [--fold K]
    slidestream mil heatmap --model RUN --features SLIDE.h5 [--slide SLIDE] --out DIR [--geojson] [--mask]

``train`` writes to RUN: ``fold<k>.safetensors`` + ``model.json`` (a model directory for
``predict``/``heatmap``), ``metrics.json``/``metrics.csv`` (per fold, mean ± sd, pooled out-of-fold
with bootstrap 95% intervals), ``roc.png``, ``predictions.csv`` (out-of-fold), ``config.yaml`` and
``skipped.csv`` when slides were skipped.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..config import Flag, add_job_arguments, config_from_args
from .config import MILConfig, MILHeatmapConfig, MILPredictConfig


def _columns(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


TRAIN_FLAGS = (
    Flag("features", "directory of <slide_id>.h5 feature files"),
    Flag("labels", "CSV: slide_id, label[, patient_id][, split]"),
    Flag("head.name", "MIL head", name="--head", choices=["abmil", "noisy_and", "mean", "max"]),
    Flag("folds", "cross-validation folds", type=int),
    Flag("train.epochs", "epochs per fold", type=int),
    Flag("optim.lr", "peak learning rate", type=float),
    Flag("train.batch_size", "bags per optimiser step", type=int),
    Flag("balance", "class balance", choices=["weights", "sampler", "none"]),
    Flag("label_columns", "comma-separated label columns (several = multi-task)", type=_columns),
    Flag("on_missing", "slides without features: record or fail", choices=["skip", "error"]),
    Flag("seed", "seed of the folds and models", type=int),
    Flag("progress", "no progress bars", name="--no-progress", action="store_false"),
)
PREDICT_FLAGS = (
    Flag("model", "model directory written by `mil train`"),
    Flag("features", "feature files or directories", nargs="+"),
    Flag("fold", "use one fold's model (default: mean of all folds)", type=int),
    Flag("labels", "optional labels CSV: adds the true label and writes metrics JSON"),
)
HEATMAP_FLAGS = (
    Flag("model", "model directory written by `mil train`"),
    Flag("features", "one feature file (.h5)"),
    Flag("slide", "the slide (default: the slide_url stored in the feature file)"),
    Flag("fold", "use one fold's model", type=int),
    Flag("task", "task (label column) to map; default the first"),
    Flag("size", "thumbnail longest side in pixels", type=int),
    Flag(
        "normalize",
        "auto: log-minmax for ABMIL attention weights, none for instance probabilities",
        choices=["auto", "minmax", "log-minmax", "none"],
    ),  # fmt: skip
    Flag("tile_size", "level-0 tile size when the file lacks tile_size_level0", type=float),
    Flag("cmap", "matplotlib colour map"),
    Flag("geojson", "also write tiles.geojson (QuPath)", action="store_true"),
    Flag("mask", "also write mask.png (+ .json sidecar)", action="store_true"),
    Flag("mask_threshold", "mask = pixels at or above this position (0..1) on the colour bar", type=float),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mil_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="cross-validated training with metrics and ROC curves")
    add_job_arguments(t, MILConfig, TRAIN_FLAGS, config_help="YAML config (pipelines/configs/mil/abmil.yaml, noisy-and.yaml)",
                      out_help="run directory (model, metrics, plots)")  # fmt: skip
    p = sub.add_parser("predict", help="predict slides with a trained model directory")
    add_job_arguments(p, MILPredictConfig, PREDICT_FLAGS, out_help="CSV of predictions")
    h = sub.add_parser("heatmap", help="instance scores drawn on the slide thumbnail")
    add_job_arguments(h, MILHeatmapConfig, HEATMAP_FLAGS, out_help="output directory")


def run_train(cfg: MILConfig) -> int:
    """``mil train``: load the bags, cross-validate, write the run; prints the summary (rank 0)."""
    from ..training import cleanup, init_distributed
    from .cv import train_cv
    from .data import load_dataset

    info = init_distributed("cpu" if cfg.device == "cpu" else "auto")
    try:
        if info.distributed and cfg.device.startswith("cuda"):
            cfg.device = str(info.device)  # one GPU per rank
        ds = load_dataset(
            cfg.labels,
            cfg.features,
            cfg.label_columns,
            classes=cfg.classes or None,
            on_missing=cfg.on_missing,
        )
        out = Path(cfg.out)
        summary = train_cv(cfg, ds, out, progress=cfg.progress, dist_info=info)
    finally:
        cleanup()
    if not info.is_main:
        return 0
    for t, s in summary.items():
        line = ", ".join(
            f"{k} {v['mean']:.3f}"
            + ("" if math.isnan(v["sd"]) else f" ± {v['sd']:.3f}")
            + f" (n={v['n_folds']})"
            for k, v in s["summary"].items()
        )
        print(
            f"{t}: {line} (pooled AUROC {s['pooled']['auroc']:.3f}; {len(ds)} slides, {len(ds.skipped)} skipped)"
        )
    print(f"wrote {out}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.mil_command == "train":
        cfg = config_from_args(MILConfig, args, TRAIN_FLAGS, required=("features", "labels", "out"))
        return run_train(cfg)
    if args.mil_command == "predict":
        from .predict import predict

        cfg = config_from_args(MILPredictConfig, args, PREDICT_FLAGS, required=("model", "features", "out"))
        predict(cfg)
        return 0
    from .predict import heatmap_from_config

    cfg = config_from_args(MILHeatmapConfig, args, HEATMAP_FLAGS, required=("model", "features", "out"))
    info = heatmap_from_config(cfg)
    print(f"wrote {cfg.out}: peak at level-0 {info['peak_level0_xy']}, probs {info['probs']}")
    return 0
