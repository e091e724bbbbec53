"""``slidestream segment train``: fine-tune a segmentation model on annotated slides.

Reads top to bottom in :func:`run_training`, on the shared components of
:mod:`pipelines.training`: build (process group, model, optimiser groups — no decay on biases and
norms, layer-wise LR decay and ``encoder_lr_scale`` on a pretrained encoder —, warm-up + cosine
schedule, precision, the tile stream), resume (:class:`~pipelines.training.Checkpointer`: model,
optimiser, scaler, RNG, augmentation generator, sampler position; same world size), loop
(augment, forward under autocast, backward, unscale, clip, step, tqdm), validate (per-class Dice,
IoU and MCC from a confusion matrix summed over ranks), log
(:class:`~pipelines.training.MetricsLogger`: ``metrics.jsonl``, ``metrics.csv``, ``metrics.json``,
``metrics.png``; a resumed run keeps the rows up to its checkpoint, so nothing is logged twice),
checkpoint (atomic). The same code runs as one process and under ``torchrun``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import to_dict, write_config
from ..training import (
    Checkpointer,
    DistInfo,
    GeneratorState,
    MetricsLogger,
    Precision,
    RNGState,
    Stream,
    apply_schedules,
    clip_gradients,
    init_distributed,
    lr_schedule,
    optimizer_for,
    param_groups,
    rank_seed,
    seed_everything,
)
from .config import (
    AnnotatedSlideConfig,
    SegmentConfig,
    SegmentDataConfig,
    SegmentModelConfig,
    SegmentTrainConfig,
)
from .data import augment_pairs, class_labels, tile_dataset, tile_loader, to_batch
from .metrics import confusion_matrix, metrics_from_confusion

METRICS = ("dice", "iou", "mcc")


def build_model(cfg: SegmentConfig) -> torch.nn.Module:
    from models.seg.decoders import create_segmenter

    m = cfg.model
    kwargs: dict[str, Any] = {"n_classes": len(cfg.data.classes), "dropout": m.dropout}
    if m.kind == "unet":
        kwargs.update(unet_depth=m.unet_depth, unet_width=m.unet_width, unet_norm=m.unet_norm)
    else:
        kwargs.update(
            backbone=m.backbone,
            weights=m.weights,
            img_size=m.img_size,
            embed_dim=m.embed_dim,
            scales=m.scales,
        )
    model = create_segmenter(m.kind, **kwargs)
    if m.freeze_encoder:
        model.freeze_encoder()
    return model


def segment_param_groups(model: torch.nn.Module, cfg: SegmentConfig) -> list[dict]:
    """Optimiser groups: the encoder's (layer-wise LR decay, ``train.encoder_lr_scale``) and the
    rest; no weight decay on biases and norm parameters anywhere."""
    wd = cfg.optim.weight_decay
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return param_groups(model, wd)
    groups = param_groups(encoder, wd, cfg.optim.layer_decay)
    for g in groups:
        g["lr_scale"] *= cfg.train.encoder_lr_scale
    return groups + param_groups(model.decoder, wd)


def check_annotations(cfg: SegmentConfig) -> None:
    """Open every slide and validate its annotations now (one clear error before training)."""
    from wsi.slide import open_slide

    labels = class_labels(cfg.data)
    for s in [*cfg.data.train, *cfg.data.val]:
        with open_slide(s.slide, mpp=s.mpp) as slide:
            slide.require_mpp()
            labels.load(s.annotations, slide.dimensions, s.mask_downsample)


@torch.no_grad()
def validate(model: torch.nn.Module, cfg: SegmentConfig, info: DistInfo) -> dict[str, Any]:
    """Per-class metrics on the validation grid (this rank's shard; the matrix is all-reduced)."""
    n = len(cfg.data.classes)
    ds = tile_dataset(cfg.data, train=False, rank=info.rank, world_size=info.world_size)
    cm = torch.zeros(n, n, dtype=torch.int64, device=info.device)
    precision = Precision(cfg.train.amp, info.device)
    was = model.training
    model.eval()
    for batch in tile_loader(ds, cfg.train.batch_size, 0):
        x, y = to_batch(batch["image"], batch["mask"], info.device)
        with precision.autocast():
            logits = model(x)
        cm += confusion_matrix(logits.argmax(1), y, n)
    model.train(was)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
    out: dict[str, Any] = metrics_from_confusion(cm.cpu().numpy())
    out["confusion"] = cm.cpu().tolist()
    return out


def run_training(
    cfg: SegmentConfig, *, resume: bool = False, quiet: bool = False, stop_after: int | None = None
) -> dict[str, Any]:
    """Train ``cfg``; return ``{"val": last validation metrics, "checkpoint": path, "steps": n}``.

    ``stop_after`` ends the run after that step as if it had been interrupted (checkpoint kept)."""
    from tqdm import tqdm

    from models.seg.losses import build_loss

    t = cfg.train
    info = init_distributed(t.device, threads=t.threads)
    out = Path(cfg.out)
    classes = list(cfg.data.classes)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
    check_annotations(cfg)

    # --- build (same init on every rank, then per-rank randomness) ---
    seed_everything(t.seed)
    model = build_model(cfg).to(info.device)
    seed_everything(rank_seed(t.seed, info.rank))
    optimizer = optimizer_for(segment_param_groups(model, cfg), cfg.optim)
    precision = Precision(t.amp, info.device)
    lrs = lr_schedule(cfg.optim, t.steps, t.batch_size * info.world_size)
    ddp = model
    if info.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    loss_fn = build_loss(t.loss).to(info.device)
    train_ds = tile_dataset(cfg.data, train=True, seed=t.seed, rank=info.rank, world_size=info.world_size)
    stream = Stream(tile_loader(train_ds, t.batch_size, cfg.data.num_workers))
    gen = torch.Generator().manual_seed(rank_seed(t.seed, info.rank))

    # --- resume ---
    ckpt = Checkpointer(
        out / "checkpoint.pt",
        shared={"model": model, "optimizer": optimizer, "scaler": precision},
        per_rank={"rng": RNGState(), "augment": GeneratorState(gen), "stream": stream},
        info=info,
    )
    start = ckpt.resume(resume)
    names = {k: classes for k in METRICS}
    logger = MetricsLogger(
        out, enabled=info.is_main, resume_step=start if resume else None, names=names, tensorboard=False
    )

    # --- loop ---
    record: dict[str, Any] = {}
    val: dict[str, Any] = {}
    end = t.steps if stop_after is None else min(t.steps, stop_after)
    bar = tqdm(
        range(start, end),
        initial=start,
        total=t.steps,
        desc="segment train",
        file=sys.stderr,
        disable=quiet or not info.is_main or not t.progress,
        dynamic_ncols=True,
    )
    running = 0.0
    model.train()
    try:
        for step in bar:
            lr = float(lrs[step])
            apply_schedules(optimizer, lr)
            batch = stream.next()
            images, masks = batch["image"], batch["mask"]
            if cfg.data.augment:
                images, masks = augment_pairs(images, masks, gen, cfg.data.jitter)
            x, y = to_batch(images, masks, info.device)
            with precision.autocast():
                logits = ddp(x)
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {float(loss)} at step {step}; lower optim.lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            precision.unscale_(optimizer)
            clip_gradients(model.parameters(), cfg.optim.clip_grad)
            precision.step(optimizer)
            value = float(loss.detach())
            running = 0.9 * running + 0.1 * value if step > start else value
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.2e}")
            done = step + 1
            last = done == t.steps
            if done % t.val_every == 0 or last:
                val = validate(model, cfg, info) if cfg.data.val else {}
                record = {"step": done, "loss": running, "lr": lr}
                record.update({k: val[k] for k in (*METRICS, "pixel_accuracy") if k in val})
                logger.log(**record)
                if info.is_main:
                    logger.write_json(out / "metrics.json", classes=classes)
                    logger.plot(out / "metrics.png", ["loss", "dice"], ylim={"dice": (0, 1.02)})
                    if not quiet and val:
                        dice = ", ".join(f"{c} {d:.3f}" for c, d in zip(classes, val["dice"]))
                        tqdm.write(f"step {done}: val Dice {dice}", file=sys.stderr)
            if done % t.checkpoint_every == 0 or done == end:
                ckpt.save(
                    done,
                    config=to_dict(cfg),
                    model_config=dict(model.config),
                    classes=classes,
                    mpp=cfg.data.mpp,
                    tile_size=cfg.data.tile_size,
                )
    finally:
        bar.close()
        stream.close()
        logger.close()
    return {"val": val, "checkpoint": str(out / "checkpoint.pt"), "steps": end, "record": record}


__all__ = [
    "AnnotatedSlideConfig",
    "SegmentConfig",
    "SegmentDataConfig",
    "SegmentModelConfig",
    "SegmentTrainConfig",
    "build_model",
    "check_annotations",
    "run_training",
    "segment_param_groups",
    "validate",
]
