"""Seeding: one call seeds every generator a loop draws from (torch, numpy's global RNG, Python's
``random``). Per-rank randomness (augmentation, dropout) is seeded with :func:`rank_seed` so that
ranks differ and a run is reproducible for a given world size."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global RNG and Python's ``random`` with ``seed``."""
    seed = int(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank ``rank`` of a run seeded with ``seed`` (distinct per rank, never 0-based
    equal to ``seed`` itself so that per-rank streams do not repeat the shared initialisation)."""
    return int(seed) * 1000 + int(rank) + 1
