"""``slidestream segment train``: fine-tune a segmentation model on annotated slides.

Reads top to bottom: build (config, process group, model, optimiser, schedules, data), resume,
loop (AMP, DDP, warm-up + cosine LR, gradient clipping, tqdm), validate (per-class Dice, IoU and
MCC from a confusion matrix summed over ranks), log (``metrics.jsonl``, ``metrics.csv``,
``metrics.json``, ``metrics.png``), checkpoint (atomic; model, optimiser, scaler, RNG, step).
The same code runs as one process and under ``torchrun`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from pipelines import distributed
from pipelines.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipelines.config import dump_config, to_dict
from pipelines.schedules import warmup_cosine
from pipelines.segment_data import DataConfig, SegTileDataset, SlideSpec, make_loader, to_batch


@dataclass(kw_only=True)
class ModelConfig:
    kind: Literal["unet", "segformer", "linear"] = "unet"
    backbone: str | None = None  # timm name (segformer / linear)
    weights: str | None = None  # local encoder weights (.safetensors or tensor-only checkpoint)
    img_size: int | None = None  # ViT position-embedding grid
    embed_dim: int = 128
    dropout: float = 0.0
    scales: Literal["last", "all"] = "last"
    unet_depth: int = 4
    unet_width: int = 16
    unet_norm: Literal["batch", "group"] = "batch"
    freeze_encoder: bool = False


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # per process
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    layer_decay: float | None = None  # layer-wise LR decay for ViT encoders (e.g. 0.75)
    encoder_lr_scale: float = 1.0  # extra LR factor on a fine-tuned encoder
    clip_grad: float | None = 1.0
    loss: dict[str, Any] = field(default_factory=lambda: {"ce": 1.0, "dice": 1.0})
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on GPU, off on CPU
    val_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)


@dataclass(kw_only=True)
class SegmentConfig:
    out: str = "runs/segment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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


def _param_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict]:
    """Optimiser groups: the encoder's (layer-wise LR decay, ``encoder_lr_scale``) and the rest."""
    from pipelines.optim import param_groups

    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return param_groups(model, t.weight_decay)
    groups = param_groups(encoder, t.weight_decay, t.layer_decay)
    for g in groups:
        g["lr_scale"] *= t.encoder_lr_scale
    return groups + param_groups(model.decoder, t.weight_decay)


# --- metrics ---------------------------------------------------------------------------------
def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore_index: int = -100
) -> torch.Tensor:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted."""
    valid = target != ignore_index
    idx = target[valid].long() * n_classes + pred[valid].long()
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, list[float]]:
    """Per-class Dice, IoU and MCC (one-vs-rest) from a confusion matrix; NaN for a class with no
    true and no predicted pixels."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1), 0.0)
    mcc = np.where(tp + fp + fn > 0, mcc, np.nan)
    return {
        "dice": [float(v) for v in dice],
        "iou": [float(v) for v in iou],
        "mcc": [float(v) for v in mcc],
        "pixel_accuracy": float(tp.sum() / max(1.0, cm.sum())),
    }


def _autocast(device: torch.device, amp: str):
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def validate(model: torch.nn.Module, cfg: SegmentConfig, info: distributed.DistInfo) -> dict[str, Any]:
    n = len(cfg.data.classes)
    ds = SegTileDataset(cfg.data.val, cfg.data, train=False, rank=info.rank, world_size=info.world_size)
    cm = torch.zeros(n, n, dtype=torch.int64, device=info.device)
    was = model.training
    model.eval()
    for images, masks in make_loader(ds, cfg.train.batch_size, 0):
        x, y = to_batch(images, masks, info.device)
        with _autocast(info.device, cfg.train.amp):
            logits = model(x)
        cm += confusion_matrix(logits.argmax(1), y, n)
    model.train(was)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
    out: dict[str, Any] = metrics_from_confusion(cm.cpu().numpy())
    out["confusion"] = cm.cpu().tolist()
    return out


def _log(out: Path, record: dict[str, Any], classes: list[str]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cols = ["step", "loss", "lr"] + [f"{k}_{c}" for k in ("dice", "iou", "mcc") for c in classes]
    from wsi.atomic import atomic_path, atomic_write_text

    with atomic_path(out / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            flat = {"step": r["step"], "loss": r.get("loss"), "lr": r.get("lr")}
            for k in ("dice", "iou", "mcc"):
                for c, v in zip(classes, r.get(k, [])):
                    flat[f"{k}_{c}"] = v
            w.writerow([flat.get(c, "") for c in cols])
    atomic_write_text(out / "metrics.json", json.dumps({"classes": classes, "history": rows}, indent=1))
    _plot(out / "metrics.png", rows, classes)


def _plot(path: Path, rows: list[dict], classes: list[str]) -> None:
    from matplotlib.figure import Figure

    from wsi.atomic import atomic_path

    fig = Figure(figsize=(9, 3.5))
    a, b = fig.subplots(1, 2)
    a.plot([r["step"] for r in rows], [r.get("loss") for r in rows], marker=".")
    a.set(xlabel="step", ylabel="train loss", title="loss")
    for k, c in enumerate(classes):
        b.plot(
            [r["step"] for r in rows],
            [r["dice"][k] if "dice" in r else np.nan for r in rows],
            marker="o",
            label=c,
        )
    b.set(xlabel="step", ylabel="Dice", title="validation Dice per class", ylim=(0, 1.02))
    b.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


# --- the job ---------------------------------------------------------------------------------
def run_training(cfg: SegmentConfig, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg``; return ``{"val": last validation metrics, "checkpoint": path, "steps": n}``."""
    from tqdm import tqdm

    from models.seg.losses import build_loss
    from pipelines.optim import apply_schedules, build_optimizer, clip_gradients

    info = distributed.init_distributed(cfg.train.device)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        if not resume:  # a fresh run starts a fresh log
            (out / "metrics.jsonl").unlink(missing_ok=True)
    torch.manual_seed(t.seed + info.rank)
    np.random.seed(t.seed + info.rank)
    model = build_model(cfg).to(info.device)
    opt = build_optimizer(_param_groups(model, t), "adamw", t.lr)
    lrs = warmup_cosine(t.lr, t.min_lr, t.steps, t.warmup_steps)
    scaler = torch.amp.GradScaler(enabled=t.amp == "fp16" and info.device.type == "cuda")
    start, epoch = 0, 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=info.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, epoch = int(state["step"]), int(state["epoch"]) + 1
        set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
    ddp = model
    if info.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    loss_fn = build_loss(t.loss).to(info.device)
    # a resumed run starts a new sampling epoch: the stream is random, so this is a fresh,
    # reproducible draw rather than a replay of tiles already seen
    train_ds = SegTileDataset(
        cfg.data.train, cfg.data, train=True, seed=t.seed, rank=info.rank, world_size=info.world_size
    )
    train_ds.epoch = epoch
    batches = iter(make_loader(train_ds, t.batch_size, cfg.data.num_workers))
    record: dict[str, Any] = {}
    val: dict[str, Any] = {}
    bar = tqdm(
        range(start, t.steps),
        initial=start,
        total=t.steps,
        desc="segment train",
        file=sys.stderr,
        disable=quiet or not info.is_main,
        dynamic_ncols=True,
    )
    running = 0.0
    model.train()
    for step in bar:
        apply_schedules(opt, float(lrs[step]))
        images, masks = next(batches)
        x, y = to_batch(images, masks, info.device)
        with _autocast(info.device, t.amp):
            logits = ddp(x)
        loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {float(loss)} at step {step}; lower train.lr or check the data"
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        clip_gradients(model.parameters(), t.clip_grad)
        scaler.step(opt)
        scaler.update()
        value = float(loss.detach())
        running = 0.9 * running + 0.1 * value if step > start else value
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{lrs[step]:.2e}")
        done = step + 1
        last = done == t.steps
        if done % t.val_every == 0 or last:
            val = validate(model, cfg, info) if cfg.data.val else {}
            record = {
                "step": done,
                "loss": running,
                "lr": float(lrs[step]),
                **{k: val[k] for k in ("dice", "iou", "mcc", "pixel_accuracy") if k in val},
            }
            if info.is_main:
                _log(out, record, cfg.data.classes)
                if not quiet and val:
                    dice = ", ".join(f"{c} {d:.3f}" for c, d in zip(cfg.data.classes, val["dice"]))
                    tqdm.write(f"step {done}: val Dice {dice}", file=sys.stderr)
        if done % t.checkpoint_every == 0 or last:
            rngs = distributed.all_gather_objects(rng_state())
            if info.is_main:
                save_checkpoint(
                    ckpt_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict(),
                        "step": done,
                        "epoch": epoch,
                        "rng": rngs,
                        "config": to_dict(cfg),
                        "model_config": dict(model.config),
                        "classes": list(cfg.data.classes),
                        "mpp": cfg.data.mpp,
                        "tile": cfg.data.tile,
                    },
                )
            distributed.barrier()
    bar.close()
    distributed.cleanup()
    return {"val": val, "checkpoint": str(ckpt_path), "steps": t.steps, "record": record}


def exact_task_config(
    train_task: dict, val_task: dict, out: str | Path, *, steps: int = 150, seed: int = 0, kind: str = "unet"
) -> SegmentConfig:
    """Config for the exact-label task of :mod:`pipelines.bench.segment` (tiny U-Net, CPU)."""
    return SegmentConfig(
        out=str(out),
        model=ModelConfig(kind=kind, unet_depth=3, unet_width=8, unet_norm="batch"),
        data=DataConfig(
            train=[SlideSpec(slide=train_task["slide"], annotations=train_task["labels"])],
            val=[SlideSpec(slide=val_task["slide"], annotations=val_task["labels"])],
            classes=list(train_task["classes"]),
            mpp=2.0,
            tile=64,
            val_max_tiles=64,
        ),
        train=TrainConfig(
            steps=steps,
            batch_size=8,
            threads=1,
            lr=5e-3,
            min_lr=1e-4,
            warmup_steps=max(1, steps // 20),
            val_every=steps,
            checkpoint_every=steps,
            seed=seed,
            device="cpu",
            loss={"ce": 1.0, "dice": 1.0},
        ),
    )


__all__ = [
    "ModelConfig",
    "SegmentConfig",
    "TrainConfig",
    "build_model",
    "confusion_matrix",
    "exact_task_config",
    "metrics_from_confusion",
    "run_training",
    "validate",
]
