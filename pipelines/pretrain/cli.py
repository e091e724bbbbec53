"""``slidestream pretrain [--config FILE] [--out DIR] [--resume] [flags] [KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import logging
import os

from ..config import Flag, add_job_arguments, config_from_args
from ..training import AMP_VALUES, cleanup
from .config import PretrainConfig

FLAGS = (
    Flag("data.slides", "slides: directories, globs, URL prefixes, files or CSV manifests", nargs="+"),
    Flag("train.steps", "optimiser steps", type=int),
    Flag("train.batch_size", "tiles per process and micro-step", type=int),
    Flag("train.amp", "mixed precision", choices=AMP_VALUES),
    Flag("train.seed", "seed of the run", type=int),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(
        parser,
        PretrainConfig,
        FLAGS,
        config_help="YAML config (see pipelines/configs/pretrain/)",
        resume=True,
    )


def main(args: argparse.Namespace) -> int:
    from .train import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(PretrainConfig, args, FLAGS)
    try:
        result = run(cfg, resume=args.resume)
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        losses = result["losses"]
        if losses:
            print(f"steps {result['steps']}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        if "backbone" in result:
            print(f"backbone: {result['backbone']}")
    return 0
