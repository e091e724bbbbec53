"""Loaders of ``slidestream finetune``: each split's items as batches ``{"image": uint8 (B, 3, S,
S), "y": int64 (B, tasks), "id": int64 (B,) or None}`` (``id``: the item's index in its split,
which keys a teacher's cached logits), with the protocol :class:`pipelines.training.Stream` needs
(epochs, exact mid-epoch resume).

- CSV tiles: :class:`wsi.loader.TileDataset` with ``tiles=`` (the one tile path: batched
  ``Slide.read_regions_mpp`` in threads, sharded over ranks and workers); training reads one
  permutation per epoch, evaluation the list in order.
- Annotated slides: :class:`wsi.loader.TileDataset` with ``within="annotations"``; the label of a
  tile is the class covering most of its annotated pixels (:func:`mask_labels`).
- ImageFolder: :class:`ImageLoader` over :class:`ImageFolderDataset`, in the same order as a tile
  list (:func:`wsi.sampling.tile_list_order`: a permutation per epoch cut into equal rank shards).

Training batches are full (the last incomplete batch of an epoch is dropped: mixup's batch and
pair modes need an even batch, and DDP ranks step together).

:class:`Augment` is the training augmentation (``augment`` section), on whole batches from a
``torch.Generator`` the checkpointer saves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from models.augment import color_jitter, flip_rot90, hed_jitter, random_resized_crop, to_float

from ..errors import InputError
from ..training import DistInfo, EpochPosition
from .config import FinetuneAugmentConfig, FinetuneConfig
from .data import MISSING, SplitData


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from files as uint8 (3, S, S), resized (bilinear, antialiased) when not S × S."""

    def __init__(self, paths: list[str], tile_size: int) -> None:
        self.paths = list(paths)
        self.tile_size = int(tile_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert("RGB")
                if im.size != (self.tile_size, self.tile_size):
                    im = im.resize(
                        (self.tile_size, self.tile_size), Image.Resampling.BILINEAR, reducing_gap=None
                    )
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(
                f"{self.paths[i]}: cannot be read as an image ({e}); remove or replace it"
            ) from None
        return {"image": torch.from_numpy(arr.transpose(2, 0, 1).copy()), "tile": i}


def _collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "tile": torch.tensor([it["tile"] for it in items], dtype=torch.int64),
    }


class ImageLoader(EpochPosition):
    """Batches of an :class:`ImageFolderDataset` for one rank: the order of
    :func:`wsi.sampling.tile_list_order` (shuffled per epoch for training), this rank's shard,
    ``batch_size`` at a time; ``state_dict`` holds the epoch and the batches consumed."""

    def __init__(
        self,
        dataset: ImageFolderDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_workers = int(num_workers)

    def _batches(self) -> list[list[int]]:
        from wsi.sampling import tile_list_order

        order = tile_list_order(
            len(self.dataset),
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            num_shards=self.world_size,
        )[self.rank :: self.world_size].tolist()
        bs = self.batch_size
        stop = len(order) - len(order) % bs if self.shuffle else len(order)
        return [order[i : i + bs] for i in range(0, stop, bs)]

    def __iter__(self) -> Iterator[dict]:
        batches = self._batches()[self.position :]
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            import multiprocessing

            kw = {"multiprocessing_context": multiprocessing.get_context("spawn")}
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=_collate, **kw
        )
        for batch in dl:
            self.position += 1
            yield batch
        self.position = 0


def mask_labels(masks: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B,) the class covering most annotated pixels of each tile's mask (B, S, S) (values ≥
    ``n_classes`` — unannotated, ignored — do not count); :data:`MISSING` for a tile without any."""
    flat = masks.reshape(masks.shape[0], -1).long()
    valid = flat < n_classes
    counts = torch.zeros(masks.shape[0], n_classes + 1, dtype=torch.int64)
    counts.scatter_add_(1, torch.where(valid, flat, n_classes), torch.ones_like(flat))
    counts = counts[:, :n_classes]
    return torch.where(counts.sum(1) > 0, counts.argmax(1), MISSING)


class LabelledLoader:
    """Batches ``{"image", "y", "id"}`` of a loader over one split (see the module docstring)."""

    def __init__(self, loader: Any, y: np.ndarray | None, n_classes: int) -> None:
        self.loader = loader
        self.y = None if y is None else torch.from_numpy(y)
        self.n_classes = n_classes

    def __iter__(self) -> Iterator[dict]:
        for b in self.loader:
            if self.y is not None:
                ids = b["tile"]
                yield {"image": b["image"], "y": self.y[ids], "id": ids}
            else:
                yield {"image": b["image"], "y": mask_labels(b["mask"], self.n_classes)[:, None], "id": None}

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.loader.load_state_dict(sd)

    @property
    def errors(self) -> dict:
        return dict(getattr(self.loader, "errors", {}) or {})


def _slide_specs(urls: list[str], mpp: dict[str, float | None] | None = None) -> list:
    from wsi.loader import SlideSpec, check_unique_ids

    specs = [SlideSpec(u, mpp=(mpp or {}).get(u)) for u in dict.fromkeys(urls)]
    try:
        check_unique_ids(specs)
    except ValueError as e:
        raise InputError(str(e)) from None
    return specs


def check_slides(urls: list[str], overrides: dict[str, float | None] | None = None) -> None:
    """Open every slide once and require its µm/px: one clear error before training."""
    from wsi.slide import open_slide

    for u in dict.fromkeys(urls):
        with open_slide(u, mpp=(overrides or {}).get(u)) as s:
            s.require_mpp()


def split_loader(
    split: SplitData,
    cfg: FinetuneConfig,
    info: DistInfo,
    classes: list[str],
    *,
    train: bool,
    batch_size: int,
    seed: int = 0,
) -> LabelledLoader:
    """The loader of one split on this rank: training (shuffled per epoch, full batches, DataLoader
    workers kept) or evaluation (every item once across ranks, in order). ``classes``: the first
    task's class names (annotated slides map their GeoJSON classes onto them)."""
    d = cfg.data
    n_classes = len(classes)
    rank, world = info.rank, info.world_size
    if split.kind == "imagefolder":
        ds = ImageFolderDataset(split.refs, d.tile_size)
        loader: Any = ImageLoader(
            ds, batch_size, shuffle=train, seed=seed, rank=rank, world_size=world, num_workers=d.num_workers
        )
        return LabelledLoader(loader, split.y, n_classes)
    from wsi.loader import TileDataset, make_loader

    common = dict(
        tile_size=d.tile_size,
        tissue_method=None,
        upsample=True,
        seed=seed,
        read_threads=d.read_threads,
        rank=rank,
        world_size=world,
    )
    if split.kind == "csv":
        specs = _slide_specs([r[0] for r in split.refs])
        ids = {s.url: s.slide_id for s in specs}
        tiles = [(ids[u], x, y, m) for u, x, y, m in split.refs]
        ds = TileDataset(specs, mode="random" if train else "grid", tiles=tiles, **common)
    else:
        from wsi.annotations import ClassLabels
        from wsi.loader import SlideSpec
        from wsi.sampling import IGNORE_LABEL

        labels = ClassLabels(
            class_map={c: i for i, c in enumerate(classes)}, n_classes=n_classes, background=IGNORE_LABEL
        )
        specs = [SlideSpec(s.slide, mpp=s.mpp, annotations=s.annotations) for s in split.refs]
        ds = TileDataset(
            specs,
            mode="random" if train else "grid",
            within="annotations",
            labels=labels,
            mpps=(d.mpp,),
            class_balance=d.class_balance,
            max_tiles=d.eval_max_tiles,
            **common,
        )
    loader = make_loader(
        ds, batch_size=batch_size, num_workers=d.num_workers, persistent_workers=train, drop_last=train
    )
    return LabelledLoader(loader, split.y, n_classes)


class Augment:
    """The training augmentation of ``cfg`` on a batch (uint8 or float) → float [0, 1]:
    random resized crop (``crop_scale``), flips and 90° rotations, H&E jitter, colour jitter."""

    def __init__(self, cfg: FinetuneAugmentConfig, size: int) -> None:
        self.cfg = cfg
        self.size = int(size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        a = self.cfg
        x = to_float(images)
        if not a.enabled:
            return x
        lo, hi = (float(v) for v in a.crop_scale)
        if lo < 1.0 or hi < 1.0:
            x = random_resized_crop(x, self.size, (lo, hi), generator=generator)
        if a.flip_rot90:
            x = flip_rot90(x, generator)
        if a.hed_sigma > 0:
            x = hed_jitter(x, a.hed_sigma, a.hed_sigma / 3, p=1.0, generator=generator)
        if a.color > 0 or a.hue > 0:
            x = color_jitter(x, a.color, a.color, a.color, a.hue, p=0.8, generator=generator)
        return x
