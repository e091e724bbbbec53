"""Image + mask tiles for segmentation, streamed by the online loader (:mod:`wsi.loader`).

Training and validation tiles come from :class:`wsi.loader.TileDataset` with
``within="annotations"``: the loader opens each slide and its annotations lazily in the process
that reads (DataLoader workers start by spawn), computes a coarse label map of the slide once
(:mod:`wsi.sampling.labels`), and yields each tile with its class mask rasterised for the same
level-0 box (:mod:`wsi.annotations`). Tiles are read in threads, batched per level box
(:meth:`wsi.Slide.read_regions_mpp`), sharded over ranks and workers, and resumable exactly
(:class:`wsi.loader.TileLoader` state, saved by the checkpointer as the sampler position).

- Training: an endless class-balanced stream (:class:`wsi.sampling.LabelSampler`).
- Validation: a finite, deterministic grid of annotated tiles (at most ``val_max_tiles``).

Augmentation runs on the training side, on whole batches, from a ``torch.Generator`` that the
checkpointer saves: the same random flips and 90° rotations on image and mask, colour jitter
(brightness, contrast, saturation) on the image alone (:func:`augment_pairs`). Masks hold class
indices with :data:`IGNORE` (255) for pixels that do not count; :func:`to_batch` turns 255 into
the losses' ``ignore_index``.
"""

from __future__ import annotations

import torch

from models.seg.losses import IGNORE_INDEX
from wsi.annotations import ClassLabels
from wsi.loader import SlideSpec, TileDataset, TileLoader, make_loader
from wsi.sampling import IGNORE_LABEL

from ..errors import ConfigError
from .config import AnnotatedSlideConfig, SegmentDataConfig

IGNORE = IGNORE_LABEL


def class_labels(cfg: SegmentDataConfig) -> ClassLabels:
    """How the config's annotations become class indices."""
    return ClassLabels(
        class_map=cfg.name_map(),
        n_classes=len(cfg.classes),
        on_unknown=cfg.unknown_classes,
        background=0 if cfg.unannotated == "background" else IGNORE,
    )


def slide_specs(slides: list[AnnotatedSlideConfig]) -> list[SlideSpec]:
    return [
        SlideSpec(s.slide, mpp=s.mpp, annotations=s.annotations, annotation_downsample=s.mask_downsample)
        for s in slides
    ]


def tile_dataset(
    cfg: SegmentDataConfig, *, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1
) -> TileDataset:
    """The training stream (``train=True``) or the validation grid of ``cfg``."""
    slides = cfg.train if train else cfg.val
    if not slides:
        which = "data.train" if train else "data.val"
        raise ConfigError(
            f"no slides given for {'training' if train else 'validation'}; list them under {which}"
        )
    return TileDataset(
        slide_specs(slides),
        mode="random" if train else "grid",
        within="annotations",
        labels=class_labels(cfg),
        mpps=(cfg.mpp,),
        tile_size=cfg.tile_size,
        class_balance=cfg.class_balance,
        max_tiles=cfg.val_max_tiles,
        tissue_method=None,
        upsample=True,
        seed=seed,
        read_threads=cfg.read_threads,
        rank=rank,
        world_size=world_size,
    )


def tile_loader(dataset: TileDataset, batch_size: int, num_workers: int = 0) -> TileLoader:
    """A resumable loader over ``dataset`` (spawned workers; slide handles are not fork-safe)."""
    return make_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=dataset.mode == "random"
    )


def augment_pairs(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, jitter: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: the same random 90° rotation and horizontal flip of image (B, 3, T, T) uint8 and
    mask (B, T, T); then saturation, contrast and brightness factors in ``1 ± jitter`` on the image
    alone. Returns uint8 images and masks."""
    n = images.shape[0]
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    factors = 1 + (torch.rand(n, 3, generator=generator) * 2 - 1) * jitter
    out_i, out_m = [], []
    for i in range(n):
        img, m = torch.rot90(images[i], int(k[i]), (1, 2)), torch.rot90(masks[i], int(k[i]), (0, 1))
        if flip[i]:
            img, m = img.flip(2), m.flip(1)
        if jitter > 0:
            b, c, s = (float(v) for v in factors[i])
            f = img.float()
            grey = f.mean(0, keepdim=True)
            f = grey + (f - grey) * s  # saturation
            f = (f - f.mean()) * c + f.mean()  # contrast
            f = f * b  # brightness
            img = f.clamp(0, 255).to(torch.uint8)
        out_i.append(img)
        out_m.append(m)
    return torch.stack(out_i).contiguous(), torch.stack(out_m).contiguous()


def to_batch(
    images: torch.Tensor, masks: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, 3, H, W) → float [0, 1] on ``device``; masks → int64 with 255 → ignore_index."""
    x = images.to(device, non_blocking=True).float().div_(255)
    y = masks.to(device, non_blocking=True).long()
    y = torch.where(y == IGNORE, torch.full_like(y, IGNORE_INDEX), y)
    return x, y
