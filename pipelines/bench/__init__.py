"""``slidestream bench WHAT``: benchmarks that print ratios against a baseline measured in the
same run. Each benchmark lives in ``pipelines/bench/<what>.py`` with ``add_arguments``/``main``."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, str] = {
    "read": "tile reads per second: decode bound, each backend, OpenSlide read_region",
    "loader": "online loader tiles/s vs decode bound and an OpenSlide DataLoader; RSS",
    "tissue": "tissue-mask IoU: U-Net vs Otsu on composited and real thumbnails",
    "train": "pretraining steps/s with streamed tiles vs tensors in memory",
    "embed": "embedding slides/hour and tiles/s vs encoder-only rate",
    "mil": "MIL known-answer check on digit bags: AUROC and top-instance precision",
    "segment": "segmentation known-answer check: per-class Dice on an exact-label task",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, help_ in BENCHES.items():
        try:
            module = importlib.import_module(f"pipelines.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pipelines.bench.{name}":
                raise
            continue  # this benchmark is not part of this build
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_bench=name)
        module.add_arguments(p)


def main(args: argparse.Namespace) -> int:
    return int(importlib.import_module(f"pipelines.bench.{args._bench}").main(args) or 0)
