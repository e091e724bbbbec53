"""``slidestream tissue qc|train``, both in the one job convention
(``[--config FILE] [--out DIR] [flags] [KEY=VALUE ...]``)::

    slidestream tissue qc --slides slides/*.svs --out qc/ [--method auto|unet|otsu]
    slidestream tissue train [--out weights.safetensors] [--pairs DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json

from ..config import Flag, add_job_arguments, config_from_args
from .config import TissueQCConfig, TissueTrainConfig

QC_FLAGS = (
    Flag("slides", "slides (paths or URLs)", nargs="+"),
    Flag(
        "method",
        "default auto: the shipped U-Net, Otsu without its weights",
        choices=["auto", "unet", "otsu"],
    ),
    Flag("thumbnail_size", "long side of the thumbnail the mask is computed on", type=int),
    Flag("weights", "U-Net weights (default: the shipped ones)"),
    Flag("masks", "directory of user masks <id>.png / <id>.geojson"),
    Flag("tile_mpp", "µm/px of the tiles drawn on the overlay", type=float),
    Flag("tile_size", "tile side in px at --tile-mpp", type=int),
    Flag("min_tissue", "tissue fraction a drawn tile needs", type=float),
    Flag("mpp", "level-0 µm/px for slides without mpp metadata", type=float),
)
TRAIN_FLAGS = (
    Flag("steps", "optimiser steps", type=int),
    Flag("seed", "seed of the composites, crops and initialisation", type=int),
    Flag("pairs", "directory of user pairs (<id>_thumb.png + <id>_mask.png, or */thumb.png + */mask.png)"),
    Flag("init", "start from these weights (.safetensors)"),
    Flag("extra_slides", "more real slides to cut tissue from, besides the demo slide", nargs="+"),
    Flag("synthetic_fraction", "share of each batch drawn from composites", type=float),
    Flag("batch_size", "crops per step", type=int),
    Flag("crop", "crop side in thumbnail pixels", type=int),
    Flag("pool", "number of composites generated up front", type=int),
    Flag("pool_size", "side of each composite", type=int),
    Flag("optim.lr", "peak learning rate", type=float),
    Flag("width", "U-Net width (channels at full resolution)", type=int),
    Flag("depth", "U-Net depth", type=int),
    Flag("input_scale", "the U-Net runs on the thumbnail resized by this factor", type=float),
    Flag("threads", "torch CPU threads", type=int),
    Flag("eval_n", "held-out composites scored at the end (0: skip)", type=int),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tissue_cmd", metavar="{qc,train}", required=True)
    q = sub.add_parser(
        "qc", help="tissue masks + QC overlays of slides", description="tissue masks + QC overlays"
    )
    add_job_arguments(q, TissueQCConfig, QC_FLAGS, out_help="output directory")
    t = sub.add_parser(
        "train", help="train the tissue U-Net", description="train or fine-tune the tissue U-Net"
    )
    add_job_arguments(
        t, TissueTrainConfig, TRAIN_FLAGS,
        out_help="weights file (.safetensors; default: the shipped weights); a .json recipe is written beside it",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    if args.tissue_cmd == "train":
        from .train import train

        cfg = config_from_args(TissueTrainConfig, args, TRAIN_FLAGS)
        result = train(cfg)
        print(
            json.dumps({k: result[k] for k in ("out", "steps", "seconds", "final_loss", "heldout")}, indent=2)
        )
        return 0
    from .qc import run_qc

    cfg = config_from_args(TissueQCConfig, args, QC_FLAGS, required=("slides", "out"))
    return run_qc(cfg)
