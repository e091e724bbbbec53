"""Slide and segmentation tasks of ``slidestream eval``: the encoder is judged through the same
jobs users run.

- slide task (``--slide-task slides=DIR,labels=labels.csv[,mpp=0.5,tile_size=224,folds=3,head=abmil]``):
  the slides are embedded with the encoder (``slidestream embed``, once), then MIL is
  cross-validated on the feature files (``slidestream mil train``) once per seed of ``--seeds``
  (the seed sets the folds and the training); AUROC, balanced accuracy and F1. With one seed the
  figure is the mean over folds with their sd (n = folds); with several, the mean over seeds of
  each seed's fold mean, with the sd over seeds (n = seeds).
- segmentation task (``--seg-task exact[,steps=120,seed=0]``): the exact-label task built from
  real tissue (:mod:`pipelines.tasks.segmentation`: background and two real tissue types of one
  colour distribution; the
  task's ``seed`` draws its composites), a 1×1-conv decoder trained on the frozen encoder
  (``slidestream segment``) once per seed of ``--seeds``, per-class Dice on a held-out slide: the
  mean over seeds, with their sd when there are at least two.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingInputError
from .config import SegTaskConfig, SlideTaskConfig
from .probes import Stat, stat

Metrics = dict[str, Stat]  # metric -> mean, measured spread and n


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


def run_slide_task(
    task: SlideTaskConfig, encoder: Any, out: Path, *, seeds: list[int] | tuple[int, ...] = (0,)
) -> Metrics:
    """Embed the slides with ``encoder`` (what ``embed_slides`` takes: a timm name, a
    ``.safetensors`` from pretraining or a built ``nn.Module``) then cross-validate MIL once per
    seed (see the module docstring for what the spread is measured over)."""
    if not seeds:
        raise ConfigError(f"slide task {task.name}: needs at least one seed")
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
    per_seed = []
    for seed in seeds:
        cfg = load_config(
            MILConfig,
            None,
            [
                f"head.name={task.head}",
                f"folds={task.folds}",
                f"train.epochs={task.epochs}",
                f"seed={seed}",
                "on_missing=skip",
            ],
        )
        ds = load_dataset(task.labels, feats, cfg.label_columns, classes=None, on_missing="skip")
        run_dir = out / "mil" if len(seeds) == 1 else out / "mil" / f"seed{seed}"
        per_seed.append(train_cv(cfg, ds, run_dir, progress=False)[ds.tasks[0]]["summary"])
    if len(seeds) == 1:  # the spread over folds, as measured by the cross-validation
        return {
            k: Stat(v["mean"], None if v["n_folds"] < 2 else v["sd"], v["n_folds"], "folds")
            for k, v in per_seed[0].items()
        }
    return {k: stat([s[k]["mean"] for s in per_seed], "seeds") for k in per_seed[0]}


def _seg_backbone(encoder: str) -> tuple[str, str | None, int | None]:
    """(timm name, weights, img_size) of an encoder spec (:func:`models.encoders.parse_encoder`)."""
    from models import backbones
    from models.encoders import parse_encoder

    spec = parse_encoder(encoder)
    if spec.preset is not None:  # models.seg builds presets by name (weights from the hub cache or the file)
        return spec.preset, spec.weights, None
    if spec.weights is None or spec.name is not None:
        return str(spec.name), spec.weights, None
    meta = backbones.read_metadata(spec.weights)
    img = meta.get("img_size")
    return meta[backbones.META_ARCH], spec.weights, int(img) if img else None


def run_seg_task(
    task: SegTaskConfig, encoder: str, out: Path, *, seeds: list[int] | tuple[int, ...] = (0,)
) -> Metrics:
    """Train a 1×1-conv decoder on the frozen encoder once per seed (the task's composites are
    drawn once, from ``task.seed``); per-class Dice on the held-out slide, mean over seeds with
    their sd when at least two were run."""
    from ..segment import run_training
    from ..tasks import exact_task_config, make_exact_label_task

    if not seeds:
        raise ConfigError(f"segmentation task {task.name}: needs at least one seed")
    data = out.parent / f"{task.name}-data"
    train = make_exact_label_task(data / "train", seed=task.seed)
    val = make_exact_label_task(data / "val", seed=task.seed + 1000, heldout=True)
    name, weights, img = _seg_backbone(encoder)
    runs: list[dict[str, float]] = []
    for seed in seeds:
        run_dir = out if len(seeds) == 1 else out / f"seed{seed}"
        cfg = exact_task_config(train, val, run_dir, steps=task.steps, seed=seed, kind="linear")
        cfg.model.backbone, cfg.model.weights, cfg.model.img_size = name, weights, img
        cfg.model.freeze_encoder = True
        dice = run_training(cfg, quiet=True)["val"]["dice"]
        run = {f"dice_{c}": float(d) for c, d in zip(cfg.data.classes, dice)}
        run["dice_mean"] = float(sum(dice) / len(dice))
        runs.append(run)
    return {k: stat([r[k] for r in runs], "seeds") for k in runs[0]}
