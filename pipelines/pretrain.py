"""``slidestream pretrain``: self-supervised pretraining (DINO or SimCLR) of a timm backbone on
tiles streamed from whole slides (nothing written to disk), on one process or under torchrun.

::

    slidestream pretrain --config configs/pretrain/tiny-cpu.yaml --out runs/tiny [train.steps=50 ...]
    slidestream pretrain --config configs/pretrain/tiny-cpu.yaml --out runs/tiny --resume

    # one machine, 4 GPUs (NCCL) or 2 CPU processes (gloo): the same code
    torchrun --standalone --nproc_per_node 4 -m pipelines.cli pretrain --config configs/pretrain/dino-vits16.yaml

    # several nodes: run this on every node (same --rdzv_id / endpoint)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_id dino42 \\
        --rdzv_endpoint node0.cluster:29500 -m pipelines.cli pretrain --config ... --out /shared/runs/dino

    # SLURM (one task per node; torchrun starts the per-GPU processes):
    #   #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
    #   head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    #   srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_backend c10d \\
    #        --rdzv_id "$SLURM_JOB_ID" --rdzv_endpoint "$head:29500" \\
    #        -m pipelines.cli pretrain --config configs/pretrain/dino-vits16.yaml --out /shared/runs/dino --resume

The loop (read top to bottom in :func:`run`): build the model, optimiser and per-step schedules
(lr = ``base_lr × global_batch / 256`` with warm-up then cosine; weight decay, teacher momentum and
temperature schedules), resume, then per step: for each of ``accum_steps`` micro-batches draw
uint8 tiles, augment on the device, forward, backward (DDP's all-reduce only on the last micro-step,
``maybe_no_sync``); drop the prototype gradient while frozen; clip; optimiser step; teacher EMA and
centre update; log; RankMe on a fixed probe set; checkpoint atomically. The teacher (DINO) or the
student (SimCLR) backbone is exported as ``backbone.safetensors`` for ``slidestream embed``.

Outputs in ``--out``: ``config.yaml``, ``checkpoint.pt`` (latest), ``metrics.csv``,
``loss.png``/``lr.png``/``rankme.png``, ``backbone.safetensors`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import backbones
from models.ssl.dino import DINO
from models.ssl.simclr import SimCLR
from wsi.atomic import atomic_write_text

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import dump_config, load_config
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    maybe_no_sync,
)
from .optim import apply_schedules, build_optimizer, clip_gradients, param_groups
from .pretrain_config import PretrainConfig
from .pretrain_data import BatchLoader, Stream, build_augment, build_loader, build_probe, probe_views
from .pretrain_monitor import MetricsLogger, rankme
from .schedules import scaled_lr, warmup_cosine

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


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if amp == "auto":
        return (torch.bfloat16, False) if device.type == "cuda" else (None, False)
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a GPU; use train.amp=bf16 or none on CPU")
        return torch.float16, True
    return None, False


def forward_backward(
    method: DINO | SimCLR,
    student: nn.Module,
    micro_batches: list[list[torch.Tensor]],
    step: int,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
) -> float:
    """Accumulate the gradient of the mean loss over ``micro_batches`` (lists of views).

    DDP gradients are all-reduced on the last micro-step only. Returns the mean loss (this rank)."""
    total = 0.0
    n = len(micro_batches)
    device_type = micro_batches[0][0].device.type
    for i, views in enumerate(micro_batches):
        autocast = (
            torch.autocast(device_type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with maybe_no_sync(student, skip_sync=i < n - 1):
            with autocast:
                loss = method.compute_loss(views, step, student=student)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss is {value} at step {step}; lower optim.base_lr or enable clipping"
                )
            scaled = loss / n
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += value
    return total / n


def _schedules(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    global_batch = t.batch_size * t.accum_steps * world_size
    lr = scaled_lr(o.base_lr, global_batch)
    return {
        "global_batch": global_batch,
        "lr": warmup_cosine(lr, o.min_lr, t.steps, o.warmup_steps),
        "wd": warmup_cosine(o.weight_decay, o.weight_decay_end, t.steps, 0),
        "momentum": warmup_cosine(cfg.ssl.momentum_teacher, 1.0, t.steps, 0),
    }


def _rank_state(stream: Stream, gen: torch.Generator) -> dict[str, Any]:
    return {"rng": rng_state(), "augment": gen.get_state(), "stream": stream.state_dict()}


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

    ``loader`` replaces the online loader (tests, benchmarks); ``probe`` the RankMe probe tiles;
    ``stop_after`` ends the run after that step as if it had been interrupted (checkpoint kept)."""
    info: DistInfo = init_distributed(cfg.train.device)
    out = Path(out_dir or cfg.train.out_dir)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = info.device
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))

    # --- build (same init on every rank, then per-rank randomness) ---
    torch.manual_seed(t.seed)
    method = build_method(cfg).to(device)
    torch.manual_seed(t.seed * 1000 + info.rank + 1)
    student: nn.Module = method.student
    if info.distributed:
        student = nn.parallel.DistributedDataParallel(
            method.student, device_ids=[device.index] if device.type == "cuda" else None
        )
    groups = param_groups(method.student, cfg.optim.weight_decay, cfg.optim.layer_decay)
    optimizer = build_optimizer(
        groups, cfg.optim.name, betas=tuple(cfg.optim.betas), momentum=cfg.optim.momentum
    )
    amp_dtype, use_scaler = amp_settings(t.amp, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    sched = _schedules(cfg, info.world_size)
    augment = build_augment(cfg)
    gen = torch.Generator().manual_seed(t.seed * 7919 + info.rank)
    stream = Stream(loader if loader is not None else build_loader(cfg))
    if probe is None and info.is_main and loader is None and t.rankme_every > 0:
        probe = build_probe(cfg)

    # --- resume ---
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=device)
        method.student.load_state_dict(ck["student"])
        if method.teacher is not None:
            method.teacher.load_state_dict(ck["teacher"])
            method.criterion.center.copy_(ck["center"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start = int(ck["step"])
        states = ck["rank_states"]
        if len(states) != info.world_size:
            raise ValueError(
                f"{ckpt_path} was written by {len(states)} process(es); resume with the same world size"
            )
        mine = states[info.rank]
        set_rng_state(mine["rng"])
        gen.set_state(mine["augment"])
        stream.load_state_dict(mine["stream"])
        if info.is_main:
            print(f"resumed from {ckpt_path} at step {start}", file=sys.stderr)
    elif resume and info.is_main:
        print(f"--resume: no checkpoint in {out}, starting from scratch", file=sys.stderr)
    logger = MetricsLogger(out, enabled=info.is_main, resume_step=start if resume else None)

    def checkpoint(step: int) -> None:
        states = all_gather_objects(_rank_state(stream, gen))
        if info.is_main:
            state = {
                "step": step,
                "student": method.student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rank_states": states,
                "world_size": info.world_size,
                "config": dump_config(cfg),
                "arch": cfg.model.arch,
                "method": cfg.ssl.method,
            }
            if method.teacher is not None:
                state["teacher"] = method.teacher.state_dict()
                state["center"] = method.criterion.center
            save_checkpoint(ckpt_path, state)
        barrier()

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
            loss = forward_backward(method, student, micro, step, amp_dtype=amp_dtype, scaler=scaler)
            if step < cfg.ssl.freeze_last_layer_steps:
                method.cancel_last_layer_grad()
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = clip_gradients(method.student.parameters(), cfg.optim.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
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
                checkpoint(done)
        step = end
    finally:
        bar.close()
        stream.close()
    result: dict[str, Any] = {"losses": losses, "steps": step, "out": str(out), "world_size": info.world_size}
    if step >= t.steps and info.is_main:
        result["backbone"] = str(export(method, cfg, out, step))
        result["plots"] = [str(p) for p in logger.plot(out)]
    logger.close()
    barrier()
    return result


@torch.no_grad()
def probe_rankme(method: DINO | SimCLR, probe: torch.Tensor, size: int, device: torch.device) -> float:
    """RankMe of the exported backbone's embeddings of the probe tiles."""
    backbone = method.export_backbone()
    was_training = backbone.training
    backbone.eval()
    feats = torch.cat([backbone(probe_views(chunk.to(device), size)).float() for chunk in probe.split(64)])
    backbone.train(was_training)
    return rankme(feats)


def export(method: DINO | SimCLR, cfg: PretrainConfig, out: Path, step: int) -> Path:
    """Write the backbone ``slidestream embed`` uses (DINO teacher / SimCLR student)."""
    meta = {
        "method": cfg.ssl.method,
        "step": step,
        "tile_size": cfg.data.tile_size,
        "mpps": list(cfg.data.mpps),
        "img_size": cfg.model.img_size,
        "timm_kwargs": cfg.model.timm_kwargs,
        "source": "slidestream pretrain",
        "train_crop_size": cfg.augment.global_size,
    }
    return backbones.save_backbone(method.export_backbone(), out / "backbone.safetensors", meta)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/pretrain/)")
    parser.add_argument("--out", default=None, help="output directory (default: train.out_dir of the config)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when present")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=50"
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    try:
        result = run(cfg, out_dir=args.out, resume=args.resume)
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        losses = result["losses"]
        if losses:
            print(f"steps {result['steps']}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        if "backbone" in result:
            print(f"backbone: {result['backbone']}")
    return 0
