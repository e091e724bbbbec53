"""``slidestream finetune``: supervised fine-tuning of an encoder with a linear head on labelled
tiles, under ``torchrun`` like every training job, resumable.

:func:`run_training` reads top to bottom on the shared components of :mod:`pipelines.training`:

1. **build**: the process group; the data (:func:`~pipelines.finetune.data.load_data`: sources,
   group-aware splits checked for leaks, ``splits.json``); the model
   (:func:`~pipelines.finetune.model_io.build_model`: encoder + heads, frozen parts, zero-γ);
   optimiser groups (no weight decay on biases and norms; layer-wise LR decay for ViT blocks);
   the per-step learning rate — linear warm-up then cosine, peak ``optim.lr × global_batch / 256``
   (the linear scaling rule, stated in the log) —; :class:`~pipelines.training.Precision`
   (``amp``: bf16, or fp16 with dynamic loss scaling, on GPU); timm's mixup/cutmix; the teacher;
   the training stream;
2. **resume** (:class:`~pipelines.training.Checkpointer`): model, optimiser(s), loss scaler,
   uncertainty weights, global RNGs (torch, numpy — timm's mixup draws from it — and Python), the
   augmentation generator, the stream position and the teacher's logit cache; same world size;
3. **loop**: per step, ``train.accum_steps`` micro-batches with DDP's all-reduce on the last only
   (:func:`~pipelines.training.micro_steps`: exact gradient accumulation, each micro-batch's
   loss divided by their number — the big batch's gradient exactly for models without batch
   norm, whose statistics are per micro-batch as with any accumulation), unscale, clip, step;
   progress bar; log
   (:class:`~pipelines.training.MetricsLogger`); validate every ``train.val_every`` steps;
   checkpoint atomically every ``train.checkpoint_every`` steps;
4. **outputs**: ``encoder.safetensors`` (+ ``.json``; ``slidestream embed`` reads it) and
   ``head.safetensors``; ``metrics.json`` with one object per evaluated split (val, test);
   confusion matrices and reliability diagrams; ``curves.png`` (loss and accuracy); the
   training log ``metrics.jsonl``/``metrics.csv``.

The evaluated model is the last one (no early stopping). SupCon runs ``loss.supcon.steps`` steps
of its first stage before the ``train.steps`` steps of the linear classifier.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi.atomic import atomic_write_text

from ..config import dump_config, write_config
from ..errors import ConfigError, MissingInputError
from ..training import (
    Checkpointer,
    GeneratorState,
    MetricsLogger,
    Precision,
    RNGState,
    Stream,
    all_reduce_mean,
    apply_schedules,
    barrier,
    clip_gradients,
    init_distributed,
    lr_schedule,
    micro_steps,
    optimizer_for,
    param_groups,
    peak_lr,
    rank_seed,
    seed_everything,
)
from .config import FinetuneConfig
from .data import FinetuneData, load_data
from .evaluate import predict, split_figures, split_metrics
from .loaders import Augment, check_slides, split_loader
from .model_io import HEAD_FILE, build_model, load_classifier, save_classifier
from .objectives import Objective, Projected, Teacher, Trainable, train_accuracy


def check_recipe(cfg: FinetuneConfig, data: FinetuneData) -> None:
    """Refuse combinations that have no meaning, before anything trains."""
    L, t = cfg.loss, cfg.train
    mixing = L.mixup.enabled
    if mixing and L.name in ("tfkd_reg", "self_distill", "supcon"):
        raise ConfigError(f"loss.mixup does not combine with loss.name={L.name}; set the mixup alphas to 0")
    if mixing and L.mixup.mode in ("batch", "pair") and t.batch_size % 2:
        raise ConfigError(f"mixup mode {L.mixup.mode!r} needs an even train.batch_size, got {t.batch_size}")
    if len(data.tasks) > 1 and L.name != "ce":
        raise ConfigError(f"several label columns (multi-task) train with loss.name=ce, not {L.name}")
    if L.name in ("kd", "tfkd_self") and not L.kd.teacher:
        raise ConfigError(
            f"loss.name={L.name} needs loss.kd.teacher: the output folder of a `slidestream finetune` run "
            "(e.g. train pipelines/configs/finetune/ce.yaml first and name its --out)"
        )
    if L.name in ("kd", "tfkd_self"):
        head = Path(L.kd.teacher)
        head = head / HEAD_FILE if head.is_dir() else head
        if not head.is_file():
            raise MissingInputError(
                f"teacher {head} not found; a teacher is the output folder (or its {HEAD_FILE}) of "
                "`slidestream finetune` — train it first, e.g. slidestream finetune --config "
                "pipelines/configs/finetune/ce.yaml (writes runs/finetune/ce)"
            )
    if L.name == "supcon" and cfg.model.mode == "linear":
        raise ConfigError("SupCon's first stage trains the encoder; use model.mode=full or last_n")
    n = len(data.splits["train"])
    per_rank = None if data.splits["train"].kind == "slides" else n // max(1, _world())
    if per_rank is not None and per_rank < t.batch_size:
        raise ConfigError(
            f"the train split has {n} items ({per_rank} per process), fewer than train.batch_size="
            f"{t.batch_size}; lower the batch size"
        )


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _teacher(cfg: FinetuneConfig, data: FinetuneData, arch: str, device: torch.device) -> Teacher | None:
    from models.finetune import TeacherLogitCache, freeze_teacher

    L = cfg.loss
    if L.name not in ("kd", "tfkd_self"):
        return None
    t = load_classifier(L.kd.teacher, device)
    if t.classes[0] != data.classes[0]:
        raise ConfigError(
            f"teacher {t.source} predicts classes {t.classes[0]}, this run {data.classes[0]}; "
            "a teacher must be trained on the same classes"
        )
    if L.name == "tfkd_self" and t.arch != arch:
        raise ConfigError(
            f"Tf-KD-self distils from a trained copy of the student: teacher {t.source} is {t.arch}, "
            f"the student {arch}; use loss.name=kd for another architecture"
        )
    freeze_teacher(t.model)
    train = data.splits["train"]
    cacheable = L.kd.cache and not cfg.augment.enabled and not L.mixup.enabled and train.kind != "slides"
    cache = TeacherLogitCache(len(train), len(data.classes[0])) if cacheable else None
    return Teacher(t.model, t.mean, t.std, cache)


def _log(msg: str, quiet: bool, main: bool) -> None:
    if main and not quiet:
        print(msg, file=sys.stderr)


def run_training(
    cfg: FinetuneConfig, *, resume: bool = False, quiet: bool = False, stop_after: int | None = None
) -> dict[str, Any]:
    """Train and evaluate ``cfg`` (see the module docstring); returns ``{"metrics": {split:
    {...}}, "steps", "out", "lr", "encoder", "head"}`` (metrics on rank 0). ``stop_after`` ends the
    run after that step as if it had been interrupted (checkpoint kept, no outputs)."""
    from tqdm import tqdm

    t, L = cfg.train, cfg.loss
    info = init_distributed(t.device, threads=t.threads)
    device, main = info.device, info.is_main
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")

    # --- build: data (same on every rank) ---
    data = load_data(cfg)
    check_recipe(cfg, data)
    for split in data.splits.values():
        if split.kind == "csv":
            check_slides([r[0] for r in split.refs])
    if main:
        atomic_write_text(out / "splits.json", json.dumps(data.report, indent=1))
        for name, s in data.report["summary"].items():
            _log(f"{name}: {s['items']} items, {s['groups']} groups, labels {s['labels']}", quiet, main)
        for m in data.report["moves"]:
            _log(f"group moved to stop a leak: {m}", quiet, main)

    # --- build: model, optimisers, schedules (same init on every rank, then per-rank randomness) ---
    seed_everything(t.seed)
    built = build_model(cfg, data.n_classes, seed=t.seed)
    model = built.model.to(device)
    trainable = Trainable(model, len(data.tasks), L.multitask).to(device)
    seed_everything(rank_seed(t.seed, info.rank))
    supcon = L.name == "supcon"
    stage1 = L.supcon.steps if supcon else 0
    total = stage1 + t.steps
    global_batch = t.batch_size * t.accum_steps * info.world_size
    if supcon:
        optim2 = replace(cfg.optim, lr=L.supcon.linear_lr)
        opt2 = optimizer_for(param_groups(model.heads, optim2.weight_decay), optim2)
        model.heads.requires_grad_(False)
        opt1 = optimizer_for(Projected(model), cfg.optim)
        lrs = [*lr_schedule(cfg.optim, stage1, global_batch), *lr_schedule(optim2, t.steps, global_batch)]
        peaks = {"supcon": peak_lr(cfg.optim, global_batch), "linear": peak_lr(optim2, global_batch)}
    else:
        opt1, opt2 = optimizer_for(trainable, cfg.optim), None
        lrs = list(lr_schedule(cfg.optim, t.steps, global_batch))
        peaks = {"peak": peak_lr(cfg.optim, global_batch)}
    scaling = (
        f"lr = base_lr × global_batch / 256 = {cfg.optim.lr:g} × {global_batch} / 256 = {peaks.get('peak', peaks.get('supcon')):.4g}"
        if cfg.optim.lr_scaling == "linear"
        else f"lr = {cfg.optim.lr:g} (optim.lr_scaling: none)"
    )
    _log(
        f"global batch {global_batch} = {t.batch_size} × {t.accum_steps} accumulation × {info.world_size} "
        f"process(es); {scaling}; warm-up {cfg.optim.warmup_steps} steps then cosine to {cfg.optim.min_lr:g}",
        quiet,
        main,
    )
    if built.zeroed:
        _log(f"zero-γ init: {len(built.zeroed)} residual-branch parameters start at 0", quiet, main)
    precision = Precision(t.amp, device)
    teacher = _teacher(cfg, data, built.arch, device)
    mixup = L.mixup.build(data.n_classes[0], L.label_smoothing) if L.mixup.enabled else None
    objective = Objective(
        cfg, data.n_classes, Augment(cfg.augment, cfg.data.tile_size), built.mean, built.std, mixup, teacher
    )
    gen = torch.Generator().manual_seed(rank_seed(t.seed, info.rank))
    train_loader = split_loader(
        data.splits["train"], cfg, info, data.classes[0], train=True, batch_size=t.batch_size, seed=t.seed
    )
    stream = Stream(train_loader)

    # --- resume ---
    ckpt = Checkpointer(
        out / "checkpoint.pt",
        shared={"model": trainable, "optimizer": opt1, "optimizer2": opt2, "scaler": precision},
        per_rank={
            "rng": RNGState(),
            "augment": GeneratorState(gen),
            "stream": stream,
            **({"teacher_cache": teacher.cache} if teacher is not None and teacher.cache is not None else {}),
        },
        info=info,
    )
    start = ckpt.resume(resume)
    logger = MetricsLogger(out, enabled=main, resume_step=start if resume else None, tensorboard=False)

    def wrap(module: nn.Module) -> nn.Module:
        if not info.distributed:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[info.local_rank] if device.type == "cuda" else None
        )

    def enter_stage2() -> nn.Module:
        model.heads.requires_grad_(True)
        model.encoder.requires_grad_(False)
        model.projector.requires_grad_(False)
        return wrap(trainable)

    net = (wrap(Projected(model)) if start < stage1 else enter_stage2()) if supcon else wrap(trainable)

    # --- loop ---
    eval_bs = t.eval_batch_size or t.batch_size
    val = data.splits.get("val")
    end = total if stop_after is None else min(total, stop_after)
    bar = tqdm(
        range(start, end),
        initial=start,
        total=total,
        desc=f"finetune {L.name}",
        file=sys.stderr,
        disable=quiet or not main or not t.progress,
        dynamic_ncols=True,
    )
    window: list[tuple[float, float]] = []
    trainable.train()
    try:
        for step in bar:
            stage = 1 if step < stage1 else 2
            if supcon and step == stage1 and start < stage1:
                net = enter_stage2()
                trainable.train()
            opt = opt2 if supcon and stage == 2 else opt1
            lr = float(lrs[step])
            apply_schedules(opt, lr)
            micro = [stream.next() for _ in range(t.accum_steps)]
            loss_sum, acc_sum = 0.0, 0.0
            for batch in micro_steps(net, micro):
                with precision.autocast():
                    loss, z, target = objective(net, batch, gen, device, stage=stage)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {float(loss)} at step {step}; lower optim.lr or check the data"
                    )
                precision.backward(loss / len(micro))
                loss_sum += float(loss.detach()) / len(micro)
                acc_sum += train_accuracy(z, target) / len(micro)
            precision.unscale_(opt)
            grad_norm = clip_gradients(
                [p for g in opt.param_groups for p in g["params"]], cfg.optim.clip_grad
            )
            precision.step(opt)
            opt.zero_grad(set_to_none=True)
            mean_loss = float(all_reduce_mean(torch.tensor([loss_sum], device=device)).item())
            window.append((mean_loss, acc_sum))
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}")
            done = step + 1
            row: dict[str, float] = {}
            if t.log_every > 0 and (done % t.log_every == 0 or done == total):
                accs = [a for _, a in window if not math.isnan(a)]
                row.update(loss=sum(v for v, _ in window) / len(window), lr=lr, grad_norm=grad_norm)
                if accs:
                    row["train_top1"] = sum(accs) / len(accs)
                window = []
            if (
                val is not None
                and stage == 2
                and t.val_every > 0
                and (done % t.val_every == 0 or done == total)
            ):
                vl = split_loader(val, cfg, info, data.classes[0], train=False, batch_size=eval_bs)
                pred = predict(model, vl, built.mean, built.std, device, precision)
                if pred is not None:
                    m = split_metrics(pred, data.tasks, data.classes)
                    row.update(val_loss=m["loss"], val_top1=m["top1"], val_ece=m["ece"])
                    if not quiet:
                        tqdm.write(
                            f"step {done}: val top-1 {m['top1']:.3f}, ECE {m['ece']:.3f}", file=sys.stderr
                        )
            if row:
                logger.log(done, **row)
            if (t.checkpoint_every > 0 and done % t.checkpoint_every == 0) or done == end:
                ckpt.save(done, config=dump_config(cfg), tasks=data.tasks, classes=data.classes)
    finally:
        bar.close()
        stream.close()
    result: dict[str, Any] = {"steps": end, "out": str(out), "lr": peaks, "global_batch": global_batch}
    if end < total:
        logger.close()
        return result

    # --- outputs: evaluation of the final model, the model files, figures ---
    metrics: dict[str, Any] = {}
    for name in ("val", "test"):
        split = data.splits.get(name)
        if split is None:
            continue
        loader = split_loader(split, cfg, info, data.classes[0], train=False, batch_size=eval_bs)
        pred = predict(model, loader, built.mean, built.std, device, precision)
        if pred is not None:
            metrics[name] = split_metrics(pred, data.tasks, data.classes)
            metrics[name]["figures"] = split_figures(out, name, pred, data.tasks, data.classes)
    if main:
        enc_path, head_path = save_classifier(
            built, out, tasks=data.tasks, classes=data.classes, tile_size=cfg.data.tile_size, recipe=L.name
        )
        result.update(encoder=str(enc_path), head=str(head_path))
        doc = {
            **metrics,
            "recipe": L.name,
            "tasks": data.tasks,
            "classes": data.classes,
            "steps": total,
            "global_batch": global_batch,
            "lr": peaks,
            "read_errors": train_loader.errors,
        }
        atomic_write_text(out / "metrics.json", json.dumps(doc, indent=1, default=float))
        logger.plot(out / "curves.png", ["loss", "val_loss", "train_top1", "val_top1"])
        for name, m in metrics.items():
            _log(
                f"{name}: top-1 {m['top1']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}, "
                f"macro F1 {m['macro_f1']:.3f}, ECE {m['ece']:.3f} (n = {m['n']})",
                quiet,
                main,
            )
    logger.close()
    barrier()
    result["metrics"] = metrics
    return result
