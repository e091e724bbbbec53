"""``slidestream pretrain``: self-supervised pretraining (DINO or SimCLR) of a timm backbone on
tiles streamed from whole slides (nothing written to disk), on one process or under torchrun.

::

    slidestream pretrain --config pipelines/configs/pretrain/tiny-cpu.yaml --out runs/tiny [train.steps=50 ...]
    slidestream pretrain --config pipelines/configs/pretrain/tiny-cpu.yaml --out runs/tiny --resume

    # one machine, 4 GPUs (NCCL) or 2 CPU processes (gloo): the same code
    torchrun --standalone --nproc_per_node 4 -m pipelines pretrain --config pipelines/configs/pretrain/dino-vits16.yaml

    # several nodes: run this on every node (same --rdzv_id / endpoint)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_id dino42 \\
        --rdzv_endpoint node0.cluster:29500 -m pipelines pretrain --config ... --out /shared/runs/dino

    # SLURM (one task per node; torchrun starts the per-GPU processes):
    #   #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
    #   head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    #   srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_backend c10d \\
    #        --rdzv_id "$SLURM_JOB_ID" --rdzv_endpoint "$head:29500" \\
    #        -m pipelines pretrain --config pipelines/configs/pretrain/dino-vits16.yaml --out /shared/runs/dino --resume

The loop (read top to bottom in :func:`run`) is built from the shared components of
:mod:`pipelines.training`: build the model, optimiser (:func:`~pipelines.training.optimizer_for`:
no decay on biases, norms, tokens) and per-step schedules (lr = ``optim.lr × global_batch / 256``
with warm-up then cosine; weight decay, teacher momentum and temperature schedules), resume
(:class:`~pipelines.training.Checkpointer`: model, optimiser, scaler, RNG, augmentation generator
and sampler position; same world size), then per step: for each of ``accum_steps`` micro-batches
draw uint8 tiles, augment on the device, forward, backward (DDP's all-reduce only on the last
micro-step, ``maybe_no_sync``); drop the prototype gradient while frozen; unscale, clip, step
(:class:`~pipelines.training.Precision`); teacher EMA and centre update; log
(:class:`~pipelines.training.MetricsLogger`); RankMe on a fixed probe set; checkpoint atomically. The teacher (DINO) or the
student (SimCLR) backbone is exported as ``backbone.safetensors`` for ``slidestream embed``.

Outputs in ``--out``: ``config.yaml``, ``checkpoint.pt`` (latest), ``metrics.csv``,
``loss.png``/``lr.png``/``rankme.png``, ``backbone.safetensors`` (+ ``.json``).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import backbones
from models.augment import IMAGENET_MEAN, IMAGENET_STD
from models.encoders import META_INPUT, META_MEAN, META_STD
from models.ssl.dino import DINO
from models.ssl.simclr import SimCLR

from ..config import write_config
from ..training import (
    Checkpointer,
    DistInfo,
    GeneratorState,
    MetricsLogger,
    Precision,
    RNGState,
    Stream,
    TensorState,
    all_reduce_mean,
    apply_schedules,
    barrier,
    clip_gradients,
    init_distributed,
    lr_schedule,
    micro_steps,
    optimizer_for,
    rank_seed,
    seed_everything,
    warmup_cosine,
    wd_schedule,
)
from ..training.stream import BatchLoader
from .config import PretrainConfig
from .data import build_augment, build_loader
from .probe import build_probe, probe_rankme

log = logging.getLogger(__name__)


def build_method(cfg: PretrainConfig) -> DINO | SimCLR:
    """Student (and teacher) backbones from timm, heads and loss for ``cfg.ssl.method``."""
    m = cfg.model
    extra: dict[str, Any] = {
        **m.timm_kwargs,
        "zero_init_last": m.zero_init_residual,
    }  # ResNets; ignored by ViTs
    student = backbones.create(
        m.arch, weights=m.weights, img_size=m.img_size, drop_path_rate=m.drop_path_rate, **extra
    )
    dim = backbones.feature_dim(student)
    s = cfg.ssl
    if s.method == "simclr":
        return SimCLR(
            student,
            dim,
            hidden_dim=s.hidden_dim,
            out_dim=s.proj_dim,
            use_bn_in_head=s.use_bn_in_head,
            temperature=s.temperature,
            gather=s.gather_negatives,
        )
    teacher = backbones.create(m.arch, img_size=m.img_size, drop_path_rate=0.0, **extra)
    return DINO(
        student,
        teacher,
        dim,
        out_dim=s.out_dim,
        hidden_dim=s.hidden_dim,
        bottleneck_dim=s.bottleneck_dim,
        use_bn_in_head=s.use_bn_in_head,
        norm_last_layer=s.norm_last_layer,
        n_local=cfg.augment.n_local,
        student_temp=s.student_temp,
        teacher_temp=s.teacher_temp,
        warmup_teacher_temp=s.warmup_teacher_temp,
        warmup_teacher_temp_steps=s.warmup_teacher_temp_steps,
        total_steps=cfg.train.steps,
        center_momentum=s.center_momentum,
    )


def forward_backward(
    method: DINO | SimCLR,
    student: nn.Module,
    micro_batches: list[list[torch.Tensor]],
    step: int,
    *,
    precision: Precision | None = None,
) -> float:
    """Accumulate the gradient of the mean loss over ``micro_batches`` (lists of views): each
    micro-batch's loss is divided by their number, so the gradient equals one big batch's.

    DDP gradients are all-reduced on the last micro-step only. Returns the mean loss (this rank)."""
    precision = precision or Precision("none", micro_batches[0][0].device)
    total = 0.0
    n = len(micro_batches)
    for views in micro_steps(student, micro_batches):
        with precision.autocast():
            loss = method.compute_loss(views, step, student=student)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}; lower optim.lr or enable clipping")
        precision.backward(loss / n)
        total += value
    return total / n


def schedules(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    """Per-step arrays: lr (linear scaling with the global batch, warm-up, cosine), weight decay
    and teacher momentum (cosine to 1)."""
    t = cfg.train
    global_batch = t.batch_size * t.accum_steps * world_size
    return {
        "global_batch": global_batch,
        "lr": lr_schedule(cfg.optim, t.steps, global_batch),
        "wd": wd_schedule(cfg.optim, t.steps),
        "momentum": warmup_cosine(cfg.ssl.momentum_teacher, 1.0, t.steps, 0),
    }


def run(
    cfg: PretrainConfig,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    loader: BatchLoader | None = None,
    probe: torch.Tensor | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train; returns ``{"losses": [...], "steps": N, "backbone": path, ...}`` (on every rank).

    ``out_dir`` replaces ``cfg.out``; ``loader`` replaces the online loader (tests, benchmarks);
    ``probe`` the RankMe probe tiles; ``stop_after`` ends the run after that step as if it had
    been interrupted (checkpoint kept)."""
    t = cfg.train
    info: DistInfo = init_distributed(t.device, threads=t.threads)
    out = Path(out_dir or cfg.out)
    device = info.device
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")

    # --- build (same init on every rank, then per-rank randomness) ---
    seed_everything(t.seed)
    method = build_method(cfg).to(device)
    seed_everything(rank_seed(t.seed, info.rank))
    student: nn.Module = method.student
    if info.distributed:
        student = nn.parallel.DistributedDataParallel(
            method.student, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = optimizer_for(method.student, cfg.optim)
    precision = Precision(t.amp, device)
    sched = schedules(cfg, info.world_size)
    if info.is_main:
        log.info("global batch %d: peak lr %.3g", sched["global_batch"], float(sched["lr"].max()))
    augment = build_augment(cfg)
    gen = torch.Generator().manual_seed(t.seed * 7919 + info.rank)
    stream = Stream(loader if loader is not None else build_loader(cfg))
    if probe is None and info.is_main and loader is None and t.rankme_every > 0:
        probe = build_probe(cfg)

    # --- resume ---
    ckpt = Checkpointer(
        out / "checkpoint.pt",
        shared={
            "student": method.student,
            "teacher": method.teacher,
            "center": TensorState(method.criterion.center) if method.teacher is not None else None,
            "optimizer": optimizer,
            "scaler": precision,
        },
        per_rank={"rng": RNGState(), "augment": GeneratorState(gen), "stream": stream},
        info=info,
    )
    start = ckpt.resume(resume)
    logger = MetricsLogger(out, enabled=info.is_main, resume_step=start if resume else None)

    # --- loop ---
    from tqdm import tqdm

    end = t.steps if stop_after is None else min(t.steps, stop_after)
    bar = tqdm(
        total=t.steps,
        initial=start,
        disable=not (info.is_main and t.progress),
        file=sys.stderr,
        desc=f"pretrain {cfg.ssl.method}",
        unit="step",
    )
    losses: list[float] = []
    step = start
    try:
        for step in range(start, end):
            tic = time.perf_counter()
            lr, wd, mom = float(sched["lr"][step]), float(sched["wd"][step]), float(sched["momentum"][step])
            apply_schedules(optimizer, lr, wd)
            micro = []
            for _ in range(t.accum_steps):
                images = stream.next()["image"].to(device, non_blocking=True)
                micro.append(augment(images, gen))
            loss = forward_backward(method, student, micro, step, precision=precision)
            if step < cfg.ssl.freeze_last_layer_steps:
                method.cancel_last_layer_grad()
            precision.unscale_(optimizer)
            grad_norm = clip_gradients(method.student.parameters(), cfg.optim.clip_grad)
            precision.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            method.finish_step(mom)
            mean_loss = float(all_reduce_mean(torch.tensor([loss], device=device)).item())
            losses.append(mean_loss)
            dt = time.perf_counter() - tic
            metrics = {
                "loss": mean_loss,
                "lr": lr,
                "wd": wd,
                "momentum": mom,
                "grad_norm": grad_norm,
                "tiles_per_s": sched["global_batch"] / dt,
            }
            if method.teacher is not None:
                metrics["teacher_temp"] = method.criterion.teacher_temp(step)
            done = step + 1
            if (
                info.is_main
                and probe is not None
                and t.rankme_every > 0
                and (done % t.rankme_every == 0 or done == t.steps)
            ):
                metrics["rankme"] = probe_rankme(method, probe, cfg.augment.global_size, device)
            if t.log_every > 0 and (done % t.log_every == 0 or done == t.steps):
                logger.log(done, **metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", tiles_s=f"{metrics['tiles_per_s']:.0f}")
            if (t.checkpoint_every > 0 and done % t.checkpoint_every == 0) or done == end:
                ckpt.save(
                    done,
                    config=_config_text(cfg),
                    arch=cfg.model.arch,
                    method=cfg.ssl.method,
                )
        step = end
    finally:
        bar.close()
        stream.close()
    result: dict[str, Any] = {"losses": losses, "steps": step, "out": str(out), "world_size": info.world_size}
    if step >= t.steps and info.is_main:
        result["backbone"] = str(export(method, cfg, out, step))
        result["plots"] = [
            str(p) for key in ("loss", "lr", "rankme") if (p := logger.plot(out / f"{key}.png", [key]))
        ]
    logger.close()
    barrier()
    return result


def _config_text(cfg: PretrainConfig) -> str:
    from ..config import dump_config

    return dump_config(cfg)


def export(method: DINO | SimCLR, cfg: PretrainConfig, out: Path, step: int) -> Path:
    """Write the backbone ``slidestream embed`` uses (DINO teacher / SimCLR student), with the
    normalisation and crop size it was trained with (read back by :func:`models.encoders.load_encoder`)."""
    meta = {
        "method": cfg.ssl.method,
        "step": step,
        "tile_size": cfg.data.tile_size,
        "mpps": list(cfg.data.mpps),
        "img_size": cfg.model.img_size,
        "timm_kwargs": cfg.model.timm_kwargs,
        "source": "slidestream pretrain",
        META_INPUT: cfg.augment.global_size,
        META_MEAN: list(IMAGENET_MEAN),
        META_STD: list(IMAGENET_STD),
    }
    return backbones.save_backbone(method.export_backbone(), out / "backbone.safetensors", meta)
