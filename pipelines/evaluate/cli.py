"""``slidestream eval [--config FILE] [--out DIR] [flags] [KEY=VALUE ...]``: encoders side by side
on patch, slide and segmentation tasks (see :mod:`pipelines.evaluate.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Flag, add_job_arguments, config_from_args
from ..errors import ConfigError
from .config import EvalConfig
from .tasks import parse_seg_task, parse_slide_task


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


FLAGS = (
    Flag(
        "encoders",
        "timm name, .safetensors from pretrain, name=weights, or a preset (uni, hf-hub:ORG/NAME); repeat to compare",
        name="--encoder",
        action="append",
    ),  # fmt: skip
    Flag(
        "patch_tasks",
        "folder per class, .h5/.zarr with images/labels[/split], or a built-in task: "
        "tissue-types[,colour=natural] or magnification (repeatable)",
        name="--patch-task",
        action="append",
    ),  # fmt: skip
    Flag(
        "slide_tasks",
        "slides=DIR|glob|CSV,labels=labels.csv[,mpp=0.5,tile_size=224,folds=3,head=abmil,"
        "name=X]: embed + MIL cross-validation (repeatable)",
        name="--slide-task",
        action="append",
        type=parse_slide_task,
    ),  # fmt: skip
    Flag(
        "seg_tasks",
        "exact[,steps=120,seed=0]: frozen encoder + 1x1 decoder on the exact-label task, trained once "
        "per --seeds seed (repeatable)",
        name="--seg-task",
        action="append",
        type=parse_seg_task,
    ),  # fmt: skip
    Flag(
        "seeds",
        "comma-separated seeds: one run of every seeded probe (linear, few-shot, MIL, segmentation) "
        "per seed; mean, and sd when at least two runs (kNN is deterministic: one run)",
        type=_seeds,
    ),  # fmt: skip
    Flag("shots", "examples per class for the few-shot probe", type=int),
    Flag("k", "neighbours for kNN", type=int),
    Flag("batch_size", "tiles per forward pass", type=int),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, EvalConfig, FLAGS, out_help="output directory for results.csv/json/md")


def main(args: argparse.Namespace) -> int:
    from .run import run_eval

    cfg = config_from_args(EvalConfig, args, FLAGS, required=("encoders", "out"))
    if not (cfg.patch_tasks or cfg.slide_tasks or cfg.seg_tasks):
        raise ConfigError("slidestream eval: give at least one --patch-task, --slide-task or --seg-task")
    rows = run_eval(
        cfg.encoders,
        cfg.patch_tasks,
        cfg.out,
        slide_tasks=cfg.slide_tasks,
        seg_tasks=cfg.seg_tasks,
        seeds=cfg.seeds,
        shots=cfg.shots,
        k=cfg.k,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
    )
    print((Path(cfg.out) / "results.md").read_text(), end="")
    return 0 if rows else 1
