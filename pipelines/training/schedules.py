"""Per-step schedules, precomputed as arrays (DINOv2 style): linear warm-up then cosine.

:func:`lr_schedule` and :func:`wd_schedule` read an
:class:`~pipelines.training.optim.OptimConfig`; a loop indexes the arrays by step and hands the
values to :func:`~pipelines.training.optim.apply_schedules`."""

from __future__ import annotations

import math

import numpy as np


def warmup_cosine(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, start: float = 0.0
) -> np.ndarray:
    """``warmup_steps`` linear from ``start`` to ``base``, then cosine from ``base`` to ``final``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps)
    warm = np.linspace(start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    n = total_steps - warmup_steps
    t = np.arange(n) / max(1, n - 1) if n > 1 else np.zeros(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t))
    return np.concatenate([warm, cos]).astype(np.float64)


def scaled_lr(base_lr: float, global_batch: int, reference: int = 256) -> float:
    """Linear scaling rule: lr = base_lr × global_batch / 256."""
    return base_lr * global_batch / reference


def lr_schedule(cfg, total_steps: int, global_batch: int | None = None) -> np.ndarray:
    """Learning rate per step for ``cfg`` (an ``OptimConfig``): warm-up over
    ``cfg.warmup_steps`` from 0, then cosine to ``cfg.min_lr``; the peak is ``cfg.lr``, scaled by
    ``global_batch / 256`` when ``cfg.lr_scaling == "linear"``."""
    peak = peak_lr(cfg, global_batch)
    return warmup_cosine(peak, cfg.min_lr, total_steps, cfg.warmup_steps)


def peak_lr(cfg, global_batch: int | None = None) -> float:
    """The peak learning rate of ``cfg`` for ``global_batch`` (see :func:`lr_schedule`)."""
    if cfg.lr_scaling == "linear":
        if global_batch is None:
            raise ValueError("lr_scaling=linear needs the global batch size")
        return scaled_lr(cfg.lr, global_batch)
    return float(cfg.lr)


def wd_schedule(cfg, total_steps: int) -> np.ndarray:
    """Weight decay per step: cosine from ``cfg.weight_decay`` to ``cfg.weight_decay_end``
    (constant when that is None)."""
    end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    return warmup_cosine(cfg.weight_decay, end, total_steps, 0)
