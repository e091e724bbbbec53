"""Slide and segmentation tasks of ``slidestream eval``: the encoder is judged through the same
jobs users run.

- slide task (``--slide-task slides=DIR,labels=labels.csv[,mpp=0.5,tile=224,folds=3,head=abmil]``):
  the slides are embedded with the encoder (``slidestream embed``), then MIL is cross-validated on
  the feature files (``slidestream mil train``); AUROC, balanced accuracy and F1 as mean ± sd over
  folds.
- segmentation task (``--seg-task exact[,steps=120]``): the exact-label task built from real
  tissue (:mod:`pipelines.bench.segment`: background and two real tissue types), a 1×1-conv
  decoder trained on the frozen encoder (``slidestream segment``), per-class Dice on a held-out
  slide.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

Metrics = dict[str, tuple[float, float]]  # metric -> (mean, sd)


def _parse_spec(spec: str, cls: type, required: tuple[str, ...]) -> Any:
    kinds = {f.name: f.type for f in fields(cls)}
    values: dict[str, Any] = {}
    for part in (p for p in spec.split(",") if p.strip()):
        if "=" not in part:
            raise ValueError(f"task option {part!r} in {spec!r} must look like key=value")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in kinds:
            raise ValueError(f"unknown task option {k!r} in {spec!r}; valid: {sorted(kinds)}")
        values[k] = float(v) if kinds[k] in (float, "float") else int(v) if kinds[k] in (int, "int") else v
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"task {spec!r} lacks {', '.join(missing)}")
    return cls(**values)


@dataclass
class SlideTask:
    slides: str
    labels: str
    name: str = "slides"
    mpp: float = 0.5
    tile: int = 224
    folds: int = 3
    head: str = "abmil"
    epochs: int = 40


@dataclass
class SegTask:
    name: str = "exact-label"
    steps: int = 120
    seed: int = 0


def parse_slide_task(spec: str) -> SlideTask:
    task = _parse_spec(spec, SlideTask, ("slides", "labels"))
    if not Path(task.labels).exists():
        raise FileNotFoundError(f"slide task labels not found: {task.labels}")
    return task


def parse_seg_task(spec: str) -> SegTask:
    kind, _, rest = spec.partition(",")
    if kind.strip() != "exact":
        raise ValueError(f"segmentation task {spec!r}: the built-in task is 'exact' (options: steps=, seed=)")
    return _parse_spec(rest, SegTask, ())


def run_slide_task(task: SlideTask, encoder: Any, out: Path) -> Metrics:
    """Embed the slides with ``encoder`` (what ``embed_slides`` takes: a timm name, a
    ``.safetensors`` from pretraining or a built ``nn.Module``) then cross-validate MIL."""
    from .config import load_config
    from .embed import embed_slides
    from .mil import train_cv
    from .mil_data import load_dataset
    from .mil_train import MILConfig

    feats = out / "features"
    summary = embed_slides(task.slides, encoder, out=feats, mpp=task.mpp, tile=task.tile, progress=False)
    if summary.counts.get("done", 0) + summary.counts.get("skipped", 0) == 0:
        raise ValueError(f"slide task {task.name}: no slide could be embedded:\n{summary.table()}")
    cfg = load_config(
        MILConfig,
        None,
        [f"head.name={task.head}", f"folds={task.folds}", f"optim.epochs={task.epochs}", "on_missing=skip"],
    )
    ds = load_dataset(task.labels, feats, cfg.label_columns, classes=None, on_missing="skip")
    result = train_cv(cfg, ds, out / "mil", progress=False)[ds.tasks[0]]
    return {k: (float(v["mean"]), float(v["sd"])) for k, v in result["summary"].items()}


def _seg_backbone(encoder: str) -> tuple[str, str | None, int | None]:
    """(timm name, weights, img_size) of an encoder spec as ``slidestream eval`` takes it."""
    from models import backbones

    if "=" in encoder:
        name, weights = encoder.split("=", 1)
        return name, weights, None
    if encoder.endswith(".safetensors"):
        meta = backbones.read_metadata(encoder)
        img = meta.get("img_size")
        return meta[backbones.META_ARCH], encoder, int(img) if img else None
    return encoder, None, None


def run_seg_task(task: SegTask, encoder: str, out: Path) -> Metrics:
    """Train a 1×1-conv decoder on the frozen encoder; per-class Dice on the held-out slide."""
    from .bench.segment import make_exact_label_task
    from .segment_train import exact_task_config, run_training

    data = out.parent / f"{task.name}-data"
    train = make_exact_label_task(data / "train", seed=task.seed)
    val = make_exact_label_task(data / "val", seed=task.seed + 1)
    cfg = exact_task_config(train, val, out, steps=task.steps, seed=task.seed, kind="linear")
    name, weights, img = _seg_backbone(encoder)
    cfg.model.backbone, cfg.model.weights, cfg.model.img_size = name, weights, img
    cfg.model.freeze_encoder = True
    res = run_training(cfg, quiet=True)
    dice = res["val"]["dice"]
    metrics: Metrics = {f"dice_{c}": (float(d), 0.0) for c, d in zip(cfg.data.classes, dice)}
    metrics["dice_mean"] = (float(sum(dice) / len(dice)), 0.0)
    return metrics
