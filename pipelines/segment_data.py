"""Image + mask tiles for segmentation training, streamed from slides and their annotations.

:class:`SegTileDataset` is a torch ``IterableDataset``. Each DataLoader worker on each DDP rank is
one shard (``wsi.sampling.shard_index``); slides and annotations are opened lazily inside the
worker (zarr/fsspec handles are not fork-safe).

- Training (``train=True``): an endless stream. Each draw picks a slide, then a class — uniformly
  over the classes present when ``class_balance`` is on, else in proportion to their area — then a
  random position inside that class's annotated area (found on a coarse label map of the whole
  slide), and reads the tile at the target mpp (``Slide.read_region_mpp``) with the mask
  rasterised for the same level-0 box (:mod:`wsi.annotations`). Image and mask get the same random
  flips and 90° rotations; the image alone gets colour jitter (brightness, contrast, saturation).
- Validation (``train=False``): a finite, deterministic grid of tiles over the slides, kept where
  any pixel is annotated, split over the shards.

Masks are uint8 class indices with :data:`IGNORE` (255) for pixels that do not count (unannotated
area when ``unannotated="ignore"``); :func:`to_batch` turns 255 into the losses' ``ignore_index``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from models.seg.losses import IGNORE_INDEX
from wsi.annotations import GeoJSONAnnotations, LabelMask, load_annotations
from wsi.sampling import shard_index

IGNORE = 255


@dataclass(kw_only=True)
class SlideSpec:
    """One annotated slide: ``annotations`` is a QuPath GeoJSON, a label image or a Zarr array."""

    slide: str
    annotations: str
    mask_downsample: float | None = None  # level-0 px per label-mask px (inferred when None)
    mpp: float | None = None  # overrides the slide's µm/px metadata


@dataclass(kw_only=True)
class DataConfig:
    train: list[SlideSpec] = field(default_factory=list)
    val: list[SlideSpec] = field(default_factory=list)
    classes: list[str] = field(default_factory=lambda: ["background", "foreground"])  # index order
    class_map: dict[str, int] = field(default_factory=dict)  # extra GeoJSON names → class index
    unknown_classes: Literal["error", "ignore"] = "error"
    unannotated: Literal["background", "ignore"] = "background"
    mpp: float = 1.0
    tile: int = 128
    class_balance: bool = True
    augment: bool = True
    jitter: float = 0.1  # colour-jitter strength (brightness, contrast, saturation ±)
    val_max_tiles: int = 256
    num_workers: int = 0

    def name_map(self) -> dict[str, int]:
        m = {name: i for i, name in enumerate(self.classes)}
        m.update(self.class_map)
        return m


class AnnotatedSlide:
    """A slide, its annotations and a coarse label map for sampling; opened on first use."""

    def __init__(self, spec: SlideSpec, cfg: DataConfig):
        self.spec, self.cfg = spec, cfg
        self._slide = None
        self._ann: GeoJSONAnnotations | LabelMask | None = None
        self._coarse: np.ndarray | None = None

    @property
    def slide(self):
        if self._slide is None:
            from wsi.slide import open_slide

            self._slide = open_slide(self.spec.slide, mpp=self.spec.mpp)
            self._slide.require_mpp()
        return self._slide

    @property
    def annotations(self) -> GeoJSONAnnotations | LabelMask:
        if self._ann is None:
            self._ann = load_annotations(
                self.spec.annotations,
                slide_dimensions=self.slide.dimensions,
                class_map=self.cfg.name_map(),
                on_unknown=self.cfg.unknown_classes,
                downsample=self.spec.mask_downsample,
            )
        return self._ann

    @property
    def size0(self) -> float:
        """Level-0 side of one tile."""
        return self.cfg.tile * self.cfg.mpp / self.slide.require_mpp()

    def mask(self, x: float, y: float) -> np.ndarray:
        bg = 0 if self.cfg.unannotated == "background" else IGNORE
        s = self.size0
        cmap = self.cfg.name_map() if isinstance(self.annotations, GeoJSONAnnotations) else None
        return self.annotations.rasterize(
            (x, y, s, s), (self.cfg.tile, self.cfg.tile), cmap, background=bg, on_unknown="ignore"
        )

    def image(self, x: float, y: float) -> np.ndarray:
        t = self.cfg.tile
        return self.slide.read_region_mpp((int(round(x)), int(round(y))), (t, t), self.cfg.mpp)

    def coarse(self) -> tuple[np.ndarray, float]:
        """(label map of the whole slide, level-0 px per map px), ≤ 1024 px on the long side."""
        W, H = self.slide.dimensions
        ds = max(self.size0 / 8, max(W, H) / 1024, 1.0)
        if self._coarse is None:
            bg = 0 if self.cfg.unannotated == "background" else IGNORE
            cmap = self.cfg.name_map() if isinstance(self.annotations, GeoJSONAnnotations) else None
            size = (max(1, round(W / ds)), max(1, round(H / ds)))
            self._coarse = self.annotations.rasterize(
                (0, 0, W, H), size, cmap, background=bg, on_unknown="ignore"
            )
        return self._coarse, W / self._coarse.shape[1]

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def _writable(a: np.ndarray) -> np.ndarray:
    return np.require(a, requirements=["C", "W"])


def augment_pair(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, jitter: float):
    """Same flips/rot90 on image and mask; brightness/contrast/saturation jitter on the image."""
    k = int(rng.integers(4))
    img, mask = np.rot90(img, k), np.rot90(mask, k)
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if jitter > 0:
        f = img.astype(np.float32)
        b, c, s = 1 + rng.uniform(-jitter, jitter, 3)
        grey = f.mean(axis=2, keepdims=True)
        f = grey + (f - grey) * s  # saturation
        f = (f - f.mean()) * c + f.mean()  # contrast
        f = f * b  # brightness
        img = np.clip(f, 0, 255).astype(np.uint8)
    return _writable(img), _writable(mask)


class SegTileDataset(IterableDataset):
    """Yields ``(image uint8 (3, T, T), mask uint8 (T, T))`` tensors (see the module docstring)."""

    def __init__(
        self,
        specs: list[SlideSpec],
        cfg: DataConfig,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if not specs:
            raise ValueError(
                "no slides given for "
                + ("training" if train else "validation")
                + "; list them under data.train / data.val in the config"
            )
        self.specs, self.cfg, self.train = list(specs), cfg, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return shard_index(self.rank, self.world_size, wid, nw)

    def __iter__(self):
        shard, n_shards = self._shard()
        slides = [AnnotatedSlide(s, self.cfg) for s in self.specs]
        try:
            if self.train:
                yield from self._random(slides, np.random.default_rng([self.seed, self.epoch, shard]))
            else:
                yield from self._grid(slides, shard, n_shards)
        finally:
            for s in slides:
                s.close()

    def _random(self, slides: list[AnnotatedSlide], rng: np.random.Generator):
        pools = []
        for s in slides:
            coarse, ds = s.coarse()
            classes = [c for c in range(len(self.cfg.classes)) if (coarse == c).any()]
            counts = np.array([(coarse == c).sum() for c in classes], dtype=np.float64)
            pools.append((classes, counts / counts.sum() if len(counts) else counts, coarse, ds))
        usable = [i for i, p in enumerate(pools) if p[0]]
        if not usable:
            raise ValueError(
                f"no annotated pixels of classes {self.cfg.classes} in "
                f"{[s.spec.annotations for s in slides]}; check data.classes and the class map"
            )
        while True:
            i = usable[int(rng.integers(len(usable)))]
            s = slides[i]
            classes, freq, coarse, ds = pools[i]
            c = (
                classes[int(rng.integers(len(classes)))]
                if self.cfg.class_balance
                else int(rng.choice(classes, p=freq))
            )
            ys, xs = np.nonzero(coarse == c)
            j = int(rng.integers(len(xs)))
            cx, cy = (xs[j] + rng.random()) * ds, (ys[j] + rng.random()) * ds
            W, H = s.slide.dimensions
            size = s.size0
            x = float(np.clip(cx - size / 2, 0, max(0.0, W - size)))
            y = float(np.clip(cy - size / 2, 0, max(0.0, H - size)))
            x, y = round(x), round(y)
            img, mask = s.image(x, y), s.mask(x, y)
            if self.cfg.augment:
                img, mask = augment_pair(img, mask, rng, self.cfg.jitter)
            yield (
                torch.from_numpy(_writable(img)).permute(2, 0, 1).contiguous(),
                torch.from_numpy(_writable(mask)),
            )

    def val_boxes(self, slides: list[AnnotatedSlide]) -> list[tuple[int, float, float]]:
        """(slide index, x, y) of the validation grid: tiles with any annotated pixel, at most
        ``val_max_tiles`` (evenly thinned, deterministic)."""
        boxes = []
        for i, s in enumerate(slides):
            coarse, ds = s.coarse()
            W, H = s.slide.dimensions
            size = s.size0
            for y in np.arange(0, max(1.0, H - size + 1), size):
                for x in np.arange(0, max(1.0, W - size + 1), size):
                    r0, c0 = int(y // ds), int(x // ds)
                    r1, c1 = max(r0 + 1, math.ceil((y + size) / ds)), max(c0 + 1, math.ceil((x + size) / ds))
                    if (coarse[r0:r1, c0:c1] != IGNORE).any():
                        boxes.append((i, round(float(x)), round(float(y))))
        if len(boxes) > self.cfg.val_max_tiles:
            keep = np.linspace(0, len(boxes) - 1, self.cfg.val_max_tiles).round().astype(int)
            boxes = [boxes[k] for k in keep]
        return boxes

    def _grid(self, slides: list[AnnotatedSlide], shard: int, n_shards: int):
        for i, x, y in self.val_boxes(slides)[shard::n_shards]:
            s = slides[i]
            img, mask = s.image(x, y), s.mask(x, y)
            yield (
                torch.from_numpy(_writable(img)).permute(2, 0, 1).contiguous(),
                torch.from_numpy(_writable(mask)),
            )


def to_batch(
    images: torch.Tensor, masks: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, 3, H, W) → float [0, 1] on ``device``; masks → int64 with 255 → ignore_index."""
    x = images.to(device, non_blocking=True).float().div_(255)
    y = masks.to(device, non_blocking=True).long()
    y = torch.where(y == IGNORE, torch.full_like(y, IGNORE_INDEX), y)
    return x, y


def make_loader(dataset: SegTileDataset, batch_size: int, num_workers: int = 0) -> Any:
    """A DataLoader over ``dataset``; workers start by spawn (slide handles are not fork-safe)."""
    from torch.utils.data import DataLoader

    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"multiprocessing_context": "spawn", "persistent_workers": dataset.train}
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **kwargs)
