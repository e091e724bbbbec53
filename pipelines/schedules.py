"""Per-step schedules, precomputed as arrays (DINOv2 style): warm-up then cosine."""

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
