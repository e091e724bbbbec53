"""Slide and segmentation tasks of ``slidestream eval``: the encoder is judged through the same
jobs users run.

- slide task (``--slide-task slides=DIR,labels=labels.csv[,mpp=0.5,tile_size=224,folds=3,head=abmil]``):
  the slides are embedded with the encoder (``slidestream embed``), then MIL is cross-validated on
  the feature files (``slidestream mil train``); AUROC, balanced accuracy and F1 as mean ± sd over
  folds.
- segmentation task (``--seg-task exact[,steps=120]``): the exact-label task built from real
  tissue (:mod:`pipelines.tasks.segmentation`: background and two real tissue types of one colour
  distribution), a 1×1-conv decoder trained on the frozen encoder (``slidestream segment``),
  per-class Dice on a held-out composite (other source crops, another seed).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingInputError
from .config import SegTaskConfig, SlideTaskConfig

Metrics = dict[str, tuple[float, float]]  # metric -> (mean, sd)


def _parse_spec(spec: str, cls: type, required: tuple[str, ...]) -> Any:
    kinds = {f.name: f.type for f in fields(cls)}
    values: dict[str, Any] = {}
    for part in (p for p in spec.split(",") if p.strip()):
        if "=" not in part:
            raise ConfigError(f"task option {part!r} in {spec!r} must look like key=value")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in kinds:
            raise ConfigError(f"unknown task option {k!r} in {spec!r}; valid: {sorted(kinds)}")
        try:
            values[k] = (
                float(v) if kinds[k] in (float, "float") else int(v) if kinds[k] in (int, "int") else v
            )
        except ValueError:
            raise ConfigError(f"task option {k}={v!r} in {spec!r} is not a {kinds[k]}") from None
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"task {spec!r} lacks {', '.join(missing)}")
    return cls(**values)


def parse_slide_task(spec: str) -> SlideTaskConfig:
    """``slides=DIR,labels=labels.csv[,mpp=0.5,tile_size=224,folds=3,head=abmil,epochs=40,name=X]``."""
    task = _parse_spec(spec, SlideTaskConfig, ("slides", "labels"))
    check_slide_task(task)
    return task


def check_slide_task(task: SlideTaskConfig) -> None:
    if not Path(task.labels).exists():
        raise MissingInputError(f"slide task labels not found: {task.labels}")


def parse_seg_task(spec: str) -> SegTaskConfig:
    """``exact[,steps=120,seed=0]``."""
    kind, _, rest = spec.partition(",")
    if kind.strip() != "exact":
        raise ConfigError(
            f"segmentation task {spec!r}: the built-in task is 'exact' (options: steps=, seed=)"
        )
    return _parse_spec(rest, SegTaskConfig, ())


def run_slide_task(task: SlideTaskConfig, encoder: Any, out: Path) -> Metrics:
    """Embed the slides with ``encoder`` (what ``embed_slides`` takes: a timm name, a
    ``.safetensors`` from pretraining or a built ``nn.Module``) then cross-validate MIL."""
    from ..config import load_config
    from ..embed import embed_slides
    from ..errors import InputError
    from ..mil import MILConfig, load_dataset, train_cv

    feats = out / "features"
    summary = embed_slides(
        task.slides, encoder, out=feats, mpp=task.mpp, tile_size=task.tile_size, progress=False
    )
    if summary.counts.get("done", 0) + summary.counts.get("skipped", 0) == 0:
        raise InputError(f"slide task {task.name}: no slide could be embedded:\n{summary.table()}")
    cfg = load_config(
        MILConfig,
        None,
        [f"head.name={task.head}", f"folds={task.folds}", f"train.epochs={task.epochs}", "on_missing=skip"],
    )
    ds = load_dataset(task.labels, feats, cfg.label_columns, classes=None, on_missing="skip")
    result = train_cv(cfg, ds, out / "mil", progress=False)[ds.tasks[0]]
    return {k: (float(v["mean"]), float(v["sd"])) for k, v in result["summary"].items()}


def _seg_backbone(encoder: str) -> tuple[str, str | None, int | None]:
    """(timm name, weights, img_size) of an encoder spec (:func:`models.encoders.parse_encoder`)."""
    from models import backbones
    from models.encoders import parse_encoder

    spec = parse_encoder(encoder)
    if spec.weights is None or spec.name is not None:
        return str(spec.name), spec.weights, None
    meta = backbones.read_metadata(spec.weights)
    img = meta.get("img_size")
    return meta[backbones.META_ARCH], spec.weights, int(img) if img else None


def run_seg_task(task: SegTaskConfig, encoder: str, out: Path) -> Metrics:
    """Train a 1×1-conv decoder on the frozen encoder; per-class Dice on the held-out slide."""
    from ..segment import run_training
    from ..tasks import exact_task_config, make_exact_label_task

    data = out.parent / f"{task.name}-data"
    train = make_exact_label_task(data / "train", seed=task.seed)
    val = make_exact_label_task(data / "val", seed=task.seed + 1000, heldout=True)
    cfg = exact_task_config(train, val, out, steps=task.steps, seed=task.seed, kind="linear")
    name, weights, img = _seg_backbone(encoder)
    cfg.model.backbone, cfg.model.weights, cfg.model.img_size = name, weights, img
    cfg.model.freeze_encoder = True
    res = run_training(cfg, quiet=True)
    dice = res["val"]["dice"]
    metrics: Metrics = {f"dice_{c}": (float(d), 0.0) for c, d in zip(cfg.data.classes, dice)}
    metrics["dice_mean"] = (float(sum(dice) / len(dice)), 0.0)
    return metrics
