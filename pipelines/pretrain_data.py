"""Data side of pretraining: the online tile loader (``wsi.loader``) as an endless, resumable
stream of uint8 batches, the fixed probe set for RankMe, and the augmentation pipeline.

Nothing is written to disk: tiles are read from the slides as the training loop asks for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from models.augment import MultiCropAugment, TwoViewAugment

from .pretrain_config import PretrainConfig


class BatchLoader(Protocol):
    """What the training loop needs from a loader (``wsi.loader.TileLoader`` is one)."""

    def __iter__(self) -> Iterator[dict]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, sd: dict) -> None: ...


class Stream:
    """Endless iteration over a loader's epochs, with a state that resumes mid-epoch.

    Batches are drawn inside ``torch.random.fork_rng``: a DataLoader draws its workers' base seed
    from the global torch RNG when an iteration starts, which would otherwise shift the training
    RNG (drop-path) of a resumed run against an uninterrupted one."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.epoch = 0
        self._it: Iterator[dict] | None = None

    def next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                with torch.random.fork_rng(devices=[]):
                    return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
        raise RuntimeError("the tile loader yields no batches: check the slide list and the tissue settings")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.close()
        self.epoch = int(sd["epoch"])
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(sd["loader"])

    def close(self) -> None:
        """Stop the loader's workers (an endless epoch never ends on its own)."""
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if callable(close):
            close()


class TensorLoader:
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
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.position = 0
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])

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
        **kw,
    )


def build_loader(cfg: PretrainConfig) -> BatchLoader:
    """The online loader of ``cfg.data`` (rank and world size from torch.distributed)."""
    from wsi.loader import make_loader

    ds = make_dataset(cfg)
    if cfg.data.num_workers > 0:
        ds.compute_masks()  # once here instead of once per worker
    return make_loader(ds, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, drop_last=True)


def build_probe(cfg: PretrainConfig) -> torch.Tensor | None:
    """A fixed set of ``cfg.data.probe_tiles`` tiles (own seed, read in this process) for RankMe."""
    n = cfg.data.probe_tiles
    if n <= 0:
        return None
    from wsi.loader import make_loader

    ds = make_dataset(cfg, seed=cfg.data.seed + 7919, samples_per_epoch=n, rank=0, world_size=1)
    loader = make_loader(ds, batch_size=n, num_workers=0)
    batches = [b["image"] for b in loader]
    return torch.cat(batches) if batches else None


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


def probe_views(images: torch.Tensor, size: int) -> torch.Tensor:
    """Probe tiles resized to the global crop size and normalised (no random augmentation)."""
    from models.augment import normalize, to_float

    x = to_float(images)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return normalize(x)
