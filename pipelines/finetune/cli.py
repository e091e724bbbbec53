"""``slidestream finetune [--config FILE] [--out DIR] [--resume] [flags] [KEY=VALUE ...]``: supervised
fine-tuning (:mod:`pipelines.finetune.train`), in the one job convention; runs as is under
``torchrun``. The recipes are ``pipelines/configs/finetune/*.yaml``."""

from __future__ import annotations

import argparse
import json

from ..config import Flag, add_job_arguments, config_from_args
from ..training import AMP_VALUES
from .config import FinetuneConfig

FLAGS = (
    Flag("model.encoder", "timm name, .safetensors weights, or name=weights"),
    Flag("model.mode", "which encoder parameters train", choices=["full", "linear", "last_n"]),
    Flag("train.steps", "optimiser steps", type=int),
    Flag("train.batch_size", "tiles per process and micro-step", type=int),
    Flag("train.accum_steps", "micro-steps per optimiser step", type=int),
    Flag("train.amp", "mixed precision", choices=AMP_VALUES),
    Flag("train.seed", "random seed", type=int),
    Flag("loss.kd.teacher", "teacher: a `slidestream finetune` output folder", name="--teacher"),
    Flag("data.num_workers", "DataLoader worker processes", type=int),
    Flag("train.progress", "no progress bar", name="--no-progress", action="store_false"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(
        parser,
        FinetuneConfig,
        FLAGS,
        config_help="YAML config (recipes: pipelines/configs/finetune/)",
        resume=True,
    )


def main(args: argparse.Namespace) -> int:
    from ..training import cleanup
    from .train import run_training

    cfg = config_from_args(FinetuneConfig, args, FLAGS)
    try:
        result = run_training(cfg, resume=args.resume)
    finally:
        cleanup()
    if result.get("metrics") is not None and "encoder" in result:
        summary = {
            split: {k: round(float(m[k]), 4) for k in ("top1", "balanced_accuracy", "macro_f1", "ece")}
            for split, m in result["metrics"].items()
        }
        print(json.dumps({"out": result["out"], "encoder": result["encoder"], **summary}))
    return 0
