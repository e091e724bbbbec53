"""Data side of pretraining: the online tile loader (:mod:`wsi.loader`) for ``cfg.data``, an
in-memory loader with the same protocol (benchmarks, tests), and the augmentation pipeline. The
training loop draws batches through :class:`pipelines.training.Stream` (endless, resumable).

Nothing is written to disk: tiles are read from the slides as the training loop asks for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from models.augment import MultiCropAugment, TwoViewAugment

from ..training.stream import BatchLoader, EpochPosition
from .config import PretrainConfig


class TensorLoader(EpochPosition):
    """A loader over tiles already in memory: ``(N, 3, S, S)`` uint8, random batches per epoch.

    Same protocol as ``wsi.loader.TileLoader`` (epochs, exact resume). Used for the synthetic
    baseline of ``slidestream bench train`` and by tests."""

    def __init__(
        self, images: torch.Tensor, batch_size: int, *, seed: int = 0, batches_per_epoch: int | None = None
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"TensorLoader needs (N,3,S,S) uint8 images, got {tuple(images.shape)} {images.dtype}"
            )
        self.images = images
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches_per_epoch = batches_per_epoch or max(1, len(images) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.images)
        order = torch.cat(
            [torch.randperm(n, generator=g) for _ in range(-(-self.batches_per_epoch * self.batch_size // n))]
        )
        while self.position < self.batches_per_epoch:
            idx = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            self.position += 1
            yield {"image": self.images[idx]}
        self.position = 0


def make_dataset(
    cfg: PretrainConfig,
    *,
    seed: int | None = None,
    samples_per_epoch: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Any:
    from wsi.loader import TileDataset

    d = cfg.data
    kw: dict[str, Any] = {}
    if rank is not None:
        kw = {"rank": rank, "world_size": world_size}
    return TileDataset(
        d.slides,
        mode="random",
        mpps=tuple(d.mpps),
        mpp_weights=d.mpp_weights,
        tile_size=d.tile_size,
        min_tissue=d.min_tissue,
        tissue_method=d.tissue_method,
        seed=d.seed if seed is None else seed,
        samples_per_epoch=d.samples_per_epoch if samples_per_epoch is None else samples_per_epoch,
        slide_weighting=d.slide_weighting,
        upsample=d.upsample,
        read_threads=d.read_threads,
        aligned=d.aligned,
        scaled_decode=d.scaled_decode,
        channels_last=d.channels_last,
        decode=d.decode,
        **kw,
    )


def build_loader(cfg: PretrainConfig) -> BatchLoader:
    """The online loader of ``cfg.data`` (rank and world size from torch.distributed)."""
    from wsi.loader import make_loader

    ds = make_dataset(cfg)
    if cfg.data.num_workers > 0:
        ds.compute_masks()  # once here instead of once per worker
    return make_loader(ds, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, drop_last=True)


def build_augment(cfg: PretrainConfig) -> MultiCropAugment | TwoViewAugment:
    a = cfg.augment
    photometric = {
        "p_hed": a.p_hed,
        "p_color": a.p_color,
        "p_gray": a.p_gray,
        "brightness": a.brightness,
        "contrast": a.contrast,
        "saturation": a.saturation,
        "hue": a.hue,
        "hed_sigma": a.hed_sigma,
        "hed_bias": a.hed_bias,
    }
    if cfg.ssl.method == "dino":
        return MultiCropAugment(
            global_size=a.global_size,
            local_size=a.local_size,
            n_local=a.n_local,
            global_scale=a.global_scale,
            local_scale=a.local_scale,
            **photometric,
        )
    return TwoViewAugment(size=a.global_size, scale=a.simclr_scale, **photometric)
