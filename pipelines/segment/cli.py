"""``slidestream segment train|predict``, both in the one job convention
(``[--config FILE] [--out DIR] [flags] [KEY=VALUE ...]``).

- ``slidestream segment train --config FILE.yaml [--out DIR] [--resume] [KEY=VALUE ...]``: train a
  U-Net / SegFormer-style / linear-probe model on slides annotated in QuPath (GeoJSON) or by label
  masks (:mod:`pipelines.segment.train`; runs as is under ``torchrun``).
- ``slidestream segment predict --slide SLIDE --checkpoint CKPT --out DIR [--mpp] [--tile-size]
  [--overlap]``: whole-slide prediction to an OME-Zarr label image, QuPath GeoJSON and an overlay
  PNG (:mod:`pipelines.segment.predict`).
"""

from __future__ import annotations

import argparse
import json

from ..config import Flag, add_job_arguments, config_from_args
from ..training import AMP_VALUES
from .config import SegmentConfig, SegmentPredictConfig

TRAIN_FLAGS = (
    Flag("train.steps", "optimiser steps", type=int),
    Flag("train.batch_size", "tiles per process and step", type=int),
    Flag("train.amp", "mixed precision", choices=AMP_VALUES),
    Flag("data.num_workers", "DataLoader worker processes", type=int),
)
PREDICT_FLAGS = (
    Flag("slide", "slide path or URL"),
    Flag("checkpoint", "checkpoint.pt written by `segment train`"),
    Flag("mpp", "µm/px to predict at (default: the training mpp)", type=float),
    Flag("tile_size", "window size in px (default: the training tile size)", type=int),
    Flag("overlap", "window overlap in px (default: tile_size/4)", type=int),
    Flag("margin", "px dropped at inner window edges (default: overlap/4)", type=int),
    Flag("batch_size", "windows per forward pass", type=int),
    Flag("device", "auto | cpu | cuda"),
    Flag(
        "tissue_method",
        "tissue detection restricting the windows (default auto: the shipped U-Net, Otsu without its weights)",
        name="--tissue",
        choices=["otsu", "unet", "auto", "none"],
    ),  # fmt: skip
    Flag("slide_mpp", "µm/px of level 0 when the slide lacks it", type=float),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="segment_cmd", metavar="{train,predict}", required=True)
    t = sub.add_parser("train", help="train on annotated slides", description="train on annotated slides")
    add_job_arguments(
        t, SegmentConfig, TRAIN_FLAGS, config_help="YAML config (see pipelines/configs/segment/)", resume=True
    )
    p = sub.add_parser("predict", help="predict a whole slide", description="predict a whole slide")
    add_job_arguments(p, SegmentPredictConfig, PREDICT_FLAGS, out_help="output directory")


def main(args: argparse.Namespace) -> int:
    if args.segment_cmd == "train":
        from ..training import cleanup
        from .train import run_training

        cfg = config_from_args(SegmentConfig, args, TRAIN_FLAGS)
        try:
            result = run_training(cfg, resume=args.resume)
        finally:
            cleanup()
        if result["val"]:
            v = result["val"]
            print(
                json.dumps(
                    {
                        "checkpoint": result["checkpoint"],
                        "classes": cfg.data.classes,
                        **{k: v[k] for k in ("dice", "iou", "mcc")},
                    }
                )
            )
        return 0
    from .predict import predict_slide

    cfg = config_from_args(
        SegmentPredictConfig,
        args,
        PREDICT_FLAGS,
        required=("slide", "checkpoint", "out"),
    )
    r = predict_slide(
        cfg.slide,
        cfg.checkpoint,
        cfg.out,
        mpp=cfg.mpp,
        tile=cfg.tile_size,
        overlap=cfg.overlap,
        margin=cfg.margin,
        batch_size=cfg.batch_size,
        device=cfg.device,
        tissue_method=cfg.tissue_method,
        slide_mpp=cfg.slide_mpp,
        progress=cfg.progress,
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
