"""``slidestream bench WHAT``: benchmarks that print ratios against a baseline measured in the
same run. Each benchmark lives in ``pipelines/bench/<what>.py`` with ``add_arguments``/``main``;
only the chosen one is imported (some import timm or torch, which takes seconds)."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, str] = {
    "read": "tile reads per second: decode bound, each backend, OpenSlide read_region",
    "loader": "online loader tiles/s vs decode bound and an OpenSlide DataLoader; RSS",
    "tissue": "tissue-mask IoU: U-Net vs Otsu against full-resolution references and on composites",
    "train": "pretraining steps/s with streamed tiles vs tensors in memory",
    "embed": "embedding slides/hour and tiles/s vs encoder-only rate",
    "isolation": "embedding slides/hour with each slide read in a contained worker vs in one process",
    "mil": "MIL known-answer checks, shipped configs: digit bags (k = 1, 2), mean-pooling shortcut",
    "segment": "segmentation known-answer check: per-class Dice vs a per-pixel colour classifier",
    "stain": "stain normalisation images/s: batched Macenko/Reinhard vs torchstain",
    "finetune": "every fine-tuning recipe on a tissue-type task: test top-1 and ECE vs plain CE",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {k:<8} {v}" for k, v in BENCHES.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("bench", choices=list(BENCHES), metavar="WHAT", help="which benchmark (see below)")
    parser.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="its options (slidestream bench WHAT --help)"
    )


def main(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"pipelines.bench.{args.bench}")
    p = argparse.ArgumentParser(prog=f"slidestream bench {args.bench}", description=BENCHES[args.bench])
    module.add_arguments(p)
    return int(module.main(p.parse_args(args.bench_args)) or 0)
