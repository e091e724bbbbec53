"""The online tile loader's dataset: a torch ``IterableDataset`` of tiles read straight from
slides (the DataLoader side, :class:`~wsi.loader.TileLoader`, is :mod:`wsi.loader.loader`).

::

    ds = TileDataset("archive/", mode="random", mpps=(0.25, 0.5, 1.0, 2.0), samples_per_epoch=100_000)
    loader = make_loader(ds, batch_size=64, num_workers=2)
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)
        for batch in loader:            # {"image": (B,3,224,224) uint8, "slide_id": [..], "coords": (B,2), "mpp": (B,)}
            ...
        state = loader.state_dict()      # save with the checkpoint; loader.load_state_dict(state) resumes

How it works. Each process that iterates (the main process with ``num_workers=0``, else each
DataLoader worker, started with *spawn* or *forkserver*) builds its own slide pool and thread pool
(:mod:`wsi.loader.reader`): slides are opened lazily in that process (LRU of ``max_open``
handles), tissue masks are computed once per slide per process and kept across epochs
(persistent workers, the default; ``wsi.tissue.tissue_mask``; pass ``masks=`` or call
:meth:`TileDataset.compute_masks` to compute them once in the parent instead), tiles
are read through ``Slide.read_regions_mpp`` (batched per level box, resized to the target µm/px)
in ``read_threads`` threads with at most ``prefetch`` tiles in flight. Nothing (handle, event loop, fsspec session,
thread) crosses a fork. Tiles come from :mod:`wsi.sampling`: shards are
``rank * num_workers + worker`` of ``world_size * num_workers``; the ``k``-th tile of a shard is
a function of ``(seed, epoch, shard, k)``, which is what makes resume exact.

Failures. A tile that fails to read is logged (logger ``wsi.loader``) and counted and is *not*
yielded (no blank substitute); after ``quarantine_after`` failures, or at once when it cannot be
opened, a slide is quarantined and its remaining tiles skipped. The stream goes on. Counts:
``dataset.errors`` in the process that iterates; :attr:`TileLoader.errors` sums them over
workers (each collated batch carries its worker's counts, so they cover the batches received so
far). Counts start again with each iteration (epoch).

Items are dicts ``{"image": uint8 (3, S, S), "slide_id": str, "coords": int64 (2,) level-0 x, y,
"mpp": float32 (), "shard": int, "index": int}`` (``shard``/``index``: position in the sampled
sequence, used by :class:`TileLoader` to resume), plus ``"mask": uint8 (S, S)`` class labels when
sampling inside annotations (``within="annotations"``, segmentation), and ``"tile": int`` (the
tile's position in the list) when reading a given list of tiles (``tiles=``, e.g. a labelled tile
table). Transforms belong on the training side; the one exception is ``stain_norm="METHOD:TARGET"``
(:mod:`wsi.loader.stain`: Macenko or Reinhard to a target image or the demo's reference region),
a normalisation of the data itself, applied batched in torch to each decoded chunk of tiles. With
``decode="gpu"`` an item carries ``"raw"`` (a :class:`wsi.loader.gpu.RawTile`: the encoded tiles)
instead of ``"image"``; :class:`TileLoader` decodes each batch on the GPU.

Decoding less. ``aligned=True`` puts every sample on the encoded-tile grid of the level that serves
its µm/px (:mod:`wsi.sampling.aligned`; a random offset inside the tile where the tile is smaller),
so a delivered tile costs one decode (2×2 for a 2× reduction) instead of about four (nine);
default: on in grid mode (where the tile size allows), off in random mode — SSL pretraining turns
it on (``pretrain``'s config). ``scaled_decode=True`` decodes 2×/4×/8× reductions at the output size
in the JPEG DCT domain (:mod:`wsi.decode`; pixels within a few levels of the exact box average);
default off (exact), on in ``pretrain``'s config. ``tile_cache_mb``: a per-process cache of decoded
tiles, where reads overlap (default: 64 MB in grid mode, off in random mode, where a tile is almost
never read twice). :attr:`TileDataset.read_stats` / :attr:`TileLoader.read_stats` count tiles and
pixels delivered and decoded and the cache's hits and misses.

Copying less. The read threads only read and decode; the HWC-to-CHW copy is made on the consuming
thread, and ``channels_last=True`` skips it (images are views of the decoded pixels, batches
``torch.channels_last``; pretraining's config turns it on). :class:`TileLoader`'s persistent
workers stack images into shared-memory slots they reuse (:mod:`wsi.loader.shm`) instead of a new
shared-memory segment per batch, and send the small per-tile arrays inline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..annotations import ClassLabels
from ..sampling import (
    DEFAULT_MPPS,
    LabelSampler,
    RandomSampler,
    TileRecord,
    footprint0,
    iter_grid,
    iter_label_grid,
    iter_tile_list,
    shard_index,
)
from ..tissue.detect import DEFAULT_METHOD
from ..tissue.masks import TissueMask
from .reader import ErrorCounts, SlidePool, TileReader
from .sources import SlideSpec, resolve_slides

log = logging.getLogger("wsi.loader")

__all__ = ["TileDataset"]


@dataclass(frozen=True, slots=True)
class TileListRecord(TileRecord):
    """A :class:`TileRecord` from a given tile list, with its ``position`` in that list."""

    position: int


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TileDataset(IterableDataset):
    """Tiles streamed from slides (see the module docstring).

    ``mode="random"``: endless (or ``samples_per_epoch`` per DDP rank, split over workers; counted
    in sampled positions, so failed tiles make an epoch shorter, never longer) uniform-over-tissue
    tiles, µm/px drawn from ``mpps`` with ``mpp_weights``, slides weighted ``"uniform"`` or by
    tissue ``"area"``. ``mode="grid"``: every grid tile (``overlap``/``stride`` in target px) with
    tissue fraction ≥ ``min_tissue`` at each µm/px of ``mpps``, exactly once across shards.
    ``upsample=False`` skips a µm/px finer than a slide's level 0 for that slide (True: upsample).
    ``tissue_method=None`` uses no mask (every position is tissue). ``rank``/``world_size``
    default to ``torch.distributed`` when initialised (else 0/1).

    ``within="annotations"`` (segmentation) samples inside annotated areas instead of tissue:
    every slide's :class:`SlideSpec` names its ``annotations``, ``labels`` says how they become
    classes, ``mpps`` holds one µm/px; random mode is :class:`wsi.sampling.LabelSampler`
    (``class_balance``), grid mode :func:`wsi.sampling.iter_label_grid` (at most ``max_tiles``),
    and each item carries ``"mask"``: uint8 (S, S) class labels of the tile's box.

    ``tiles=[(slide_id, x, y, mpp), ...]`` reads exactly these tiles (level-0 top-left ``x, y``,
    ``tile_size`` px at ``mpp``) instead of sampling (:func:`wsi.sampling.iter_tile_list`):
    ``mode="grid"`` in list order, each once across shards; ``mode="random"`` one permutation per
    epoch, every shard the same length. Each item carries ``"tile"``, its position in the list.

    Decoding less (module docstring): ``aligned`` (None: grid yes, random no), ``scaled_decode``
    (default False: exact), ``tile_cache_mb`` (None: 64 in grid mode, 0 in random mode) and
    ``decode`` ("cpu", or "gpu": items carry encoded tiles that :class:`TileLoader` decodes on the
    GPU). :attr:`read_stats` counts what was delivered and decoded. ``channels_last=True``: each
    image is a (3, S, S) view of the decoded (S, S, 3) pixels and batches are (B, 3, S, S) tensors
    in ``torch.channels_last`` memory format — the same values and shape without the per-tile
    HWC-to-CHW copy (about 40 µs of a ~1.3 ms tile here); torch ops, ``.to(device)`` and
    convolutions take either layout (``.contiguous()`` gives the usual one).
    """

    def __init__(
        self,
        slides: Any,
        *,
        mode: str = "random",
        mpps: Sequence[float] = DEFAULT_MPPS,
        mpp_weights: Sequence[float] | None = None,
        tile_size: int = 224,
        min_tissue: float = 0.4,
        tissue_method: str | None = DEFAULT_METHOD,
        masks: dict[str, TissueMask] | None = None,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        slide_weighting: str = "uniform",
        upsample: bool = False,
        read_threads: int = 2,
        prefetch: int = 64,
        max_open: int = 8,
        quarantine_after: int = 5,
        storage_options: dict | None = None,
        overlap: int = 0,
        stride: int | None = None,
        thumbnail_size: int = 1024,
        rank: int | None = None,
        world_size: int | None = None,
        within: str = "tissue",
        labels: ClassLabels | None = None,
        class_balance: bool = True,
        max_tiles: int | None = None,
        chunk: int = 16,
        tiles: Sequence[tuple[str, int, int, float]] | None = None,
        stain_norm: str | None = None,
        aligned: bool | None = None,
        scaled_decode: bool = False,
        tile_cache_mb: float | None = None,
        decode: str = "cpu",
        channels_last: bool = False,
    ):
        super().__init__()
        if mode not in ("random", "grid"):
            raise ValueError(f"mode must be 'random' or 'grid', got {mode!r}")
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
        if tile_cache_mb is not None and tile_cache_mb < 0:
            raise ValueError(f"tile_cache_mb must be >= 0 or None, got {tile_cache_mb}")
        if within not in ("tissue", "annotations"):
            raise ValueError(f"within must be 'tissue' or 'annotations', got {within!r}")
        if samples_per_epoch is not None and samples_per_epoch < 0:
            raise ValueError(f"samples_per_epoch must be >= 0 or None, got {samples_per_epoch}")
        self.specs: list[SlideSpec] = resolve_slides(slides, storage_options=storage_options)
        self.mode = mode
        self.mpps = tuple(float(m) for m in mpps)
        self.mpp_weights = None if mpp_weights is None else tuple(float(w) for w in mpp_weights)
        self.tile_size = int(tile_size)
        self.min_tissue = float(min_tissue)
        self.tissue_method = tissue_method
        self.masks: dict[str, TissueMask] = dict(masks or {})
        self.seed = int(seed)
        self.samples_per_epoch = samples_per_epoch
        self.slide_weighting = slide_weighting
        self.upsample = bool(upsample)
        self.read_threads = int(read_threads)
        self.prefetch = int(prefetch)
        #: tiles per read task of the thread pool (at most ``prefetch // chunk`` tasks in flight)
        self.chunk = int(chunk)
        self.max_open = int(max_open)
        self.quarantine_after = int(quarantine_after)
        self.storage_options = storage_options
        self.overlap = int(overlap)
        self.stride = stride
        self.thumbnail_size = int(thumbnail_size)
        self.within = within
        self.labels = labels
        self.class_balance = bool(class_balance)
        self.max_tiles = max_tiles
        #: samples on the encoded-tile grid (None: grid mode yes, random mode no)
        self.aligned = (mode == "grid") if aligned is None else bool(aligned)
        self.scaled_decode = bool(scaled_decode)
        #: decoded-tile cache per process, MB (None: 64 in grid mode, 0 in random mode)
        self.tile_cache_mb = (
            (64.0 if mode == "grid" else 0.0) if tile_cache_mb is None else float(tile_cache_mb)
        )
        self.decode = decode
        #: images are (3, S, S) views of (S, S, 3) pixels (batches: torch.channels_last) instead of
        #: contiguous copies: the same values, one copy per tile less
        self.channels_last = bool(channels_last)
        if stain_norm and decode == "gpu":
            raise ValueError(
                "stain_norm= normalises decoded tiles in the loader; with decode='gpu' the tiles are "
                "decoded after it: normalise on the GPU after decoding (as embed does) or use decode='cpu'"
            )
        if within == "annotations":
            missing = [s.url for s in self.specs if not s.annotations]
            if labels is None or len(self.mpps) != 1 or missing:
                raise ValueError(
                    "within='annotations' needs labels=, exactly one µm/px in mpps and annotations "
                    f"for every slide (missing for {missing[:3]})"
                )
        #: ``METHOD:TARGET`` (:mod:`wsi.loader.stain`), fitted once here and applied per chunk
        self.stain_norm = stain_norm
        self.stain = None
        if stain_norm:
            from .stain import stain_normalizer_from_spec

            self.stain = stain_normalizer_from_spec(stain_norm)
        self.tiles = None if tiles is None else [(str(s), int(x), int(y), float(m)) for s, x, y, m in tiles]
        if self.tiles is not None:
            if within != "tissue":
                raise ValueError(
                    "tiles= lists the tiles to read; it does not combine with within='annotations'"
                )
            known = {s.slide_id for s in self.specs}
            unknown = sorted({t[0] for t in self.tiles} - known)
            if unknown:
                raise ValueError(f"tiles name slides that are not in the slide list: {unknown[:5]}")
        self.rank, self.world_size = rank, world_size
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank= and world_size=, or neither")
        self._rank_from_dist = rank is None
        if rank is None:
            self.rank, self.world_size = _dist_rank_world()
        shard_index(self.rank, self.world_size, 0, 1)  # validates
        self.epoch = 0
        #: shard -> first sequence index to produce (resume); set by TileLoader.load_state_dict
        self.start: dict[int, int] = {}
        #: DataLoader worker w plays local shard (w + rotation) % num_workers (resume order)
        self.rotation = 0
        self._pool: SlidePool | None = None
        #: slide id -> geometry (size, mpp, mask), kept across epochs in this process
        self._geo_cache: dict = {}
        #: shared int64 array [epoch, rotation, start of local shard 0, 1, ...] written by a TileLoader
        #: with persistent workers, read by each worker at the start of every iteration
        self._shared: Any = None
        #: reused shared-memory image slots of a TileLoader's persistent workers (wsi.loader.shm)
        self._batch_buffers: Any = None
        # validate sampler arguments now rather than inside a worker
        if within == "tissue":
            RandomSampler(
                [s.slide_id for s in self.specs],
                lambda i: None,
                mpps=self.mpps,
                mpp_weights=self.mpp_weights,
                slide_weighting=slide_weighting,
                seed=self.seed,
            )

    def __getstate__(self) -> dict:
        # open handles and thread pools never travel to workers; geometry (masks) may
        state = self.__dict__.copy()
        state["_pool"] = None
        if get_spawning_popen() is None:  # shared state goes only to the workers a TileLoader starts
            state["_batch_buffers"] = state["_shared"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Random mode draws a new sequence per epoch (grid order does not depend on it)."""
        self.epoch = int(epoch)

    @property
    def errors(self) -> dict:
        """Error counts of the last iteration in *this* process (see :class:`ErrorCounts`)."""
        return (self._pool.errors if self._pool is not None else ErrorCounts()).as_dict()

    @property
    def read_stats(self) -> dict:
        """Tiles/pixels delivered and decoded and tile-cache hits/misses of the last iteration in
        *this* process (:meth:`wsi.loader.SlidePool.read_stats`; zeros before any)."""
        if self._pool is None:
            return SlidePool([]).read_stats()
        return self._pool.read_stats()

    def _new_pool(self) -> SlidePool:
        annotated = self.within == "annotations"
        return SlidePool(
            self.specs,
            max_open=self.max_open,
            tissue_method=self.tissue_method,
            thumbnail_size=self.thumbnail_size,
            masks=self.masks,
            quarantine_after=self.quarantine_after,
            storage_options=self.storage_options,
            geo_cache=self._geo_cache,
            labels=self.labels if annotated else None,
            label_tile=(self.tile_size, self.mpps[0]) if annotated else None,
            tile_cache_bytes=int(self.tile_cache_mb * 2**20),
        )

    def compute_masks(self) -> dict[str, TissueMask]:
        """Compute every slide's tissue mask here (once) and keep them in ``self.masks`` so workers
        receive them instead of each computing its own. Slides that fail are logged and left out."""
        pool = self._new_pool()
        try:
            for sp in self.specs:
                geo = pool.geometry(sp.slide_id)
                if geo is not None and geo.mask is not None:
                    self.masks[sp.slide_id] = geo.mask
        finally:
            pool.close()
        return self.masks

    def shard(self) -> tuple[int, int, int, int]:
        """``(shard, num_shards, local_worker, num_workers)`` of the calling process."""
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        local = (w + self.rotation) % nw
        shard, n = shard_index(self.rank, self.world_size, local, nw)
        return shard, n, local, nw

    def records(
        self, pool: SlidePool, shard: int, num_shards: int, local: int, nw: int, start: int = 0
    ) -> Iterator[tuple[int, TileRecord]]:
        """The ``(index, record)`` sequence of one shard (no pixels read)."""
        ids = [s.slide_id for s in self.specs]
        if self.tiles is not None:
            return self._list_records(pool, shard, num_shards, start)
        if self.within == "annotations":
            return self._label_records(pool, ids, shard, num_shards, local, nw, start)
        if self.mode == "grid":
            return iter_grid(
                (pool.geometry(i) for i in ids),
                mpps=self.mpps,
                tile_size=self.tile_size,
                overlap=self.overlap,
                stride=self.stride,
                min_tissue=self.min_tissue,
                upsample=self.upsample,
                shard=shard,
                num_shards=num_shards,
                start=start,
                aligned=self.aligned,
            )
        sampler = RandomSampler(
            ids,
            lambda i: pool.geometry(ids[i]),
            mpps=self.mpps,
            mpp_weights=self.mpp_weights,
            tile_size=self.tile_size,
            min_tissue=self.min_tissue,
            slide_weighting=self.slide_weighting,
            upsample=self.upsample,
            seed=self.seed,
            aligned=self.aligned,
        )
        return sampler.iter(self.epoch, shard, start=start, stop=self._stop(local, nw))

    def _label_records(
        self, pool: SlidePool, ids: list[str], shard: int, num_shards: int, local: int, nw: int, start: int
    ) -> Iterator[tuple[int, TileRecord]]:
        if self.mode == "grid":
            return iter_label_grid(
                (pool.geometry(i) for i in ids),
                mpp=self.mpps[0],
                tile_size=self.tile_size,
                max_tiles=self.max_tiles if self.max_tiles is not None else 1 << 62,
                shard=shard,
                num_shards=num_shards,
                start=start,
            )
        sampler = LabelSampler(
            ids,
            lambda i: pool.geometry(ids[i]),
            n_classes=self.labels.n_classes,
            mpp=self.mpps[0],
            tile_size=self.tile_size,
            class_balance=self.class_balance,
            seed=self.seed,
        )
        return sampler.iter(self.epoch, shard, start=start, stop=self._stop(local, nw))

    def _list_records(
        self, pool: SlidePool, shard: int, num_shards: int, start: int
    ) -> Iterator[tuple[int, TileRecord]]:
        """The given tiles of this shard (``tiles=``); a tile of a slide that cannot be opened is
        skipped (the pool counts and logs the slide)."""
        for k, i in iter_tile_list(
            len(self.tiles),
            shuffle=self.mode == "random",
            seed=self.seed,
            epoch=self.epoch,
            shard=shard,
            num_shards=num_shards,
            start=start,
        ):
            sid, x, y, mpp = self.tiles[i]
            geo = pool.geometry(sid)
            if geo is None:
                continue
            size0 = footprint0(self.tile_size, mpp, geo.base_mpp)
            yield k, TileListRecord(sid, x, y, size0, mpp, self.tile_size, i)

    def _stop(self, local: int, nw: int) -> int | None:
        """Records of this epoch for local worker ``local`` of ``nw`` (None: endless)."""
        if self.samples_per_epoch is None:
            return None
        q, r = divmod(self.samples_per_epoch, nw)
        return q + (local < r)

    def _sync_shared(self) -> None:
        info = get_worker_info()
        if self._batch_buffers is not None and info is not None:
            self._batch_buffers.reset(info.id)  # a new iteration: every slot of this worker is free
        if self._shared is None or info is None:
            return
        sh = self._shared
        self.epoch, self.rotation = int(sh[0]), int(sh[1])
        local = (info.id + self.rotation) % info.num_workers
        shard, _ = shard_index(self.rank, self.world_size, local, info.num_workers)
        self.start = {shard: int(sh[2 + local])}

    def __iter__(self) -> Iterator[dict]:
        self._sync_shared()
        shard, n, local, nw = self.shard()
        pool = self._pool = self._new_pool()
        reader = TileReader(
            pool,
            read_threads=self.read_threads,
            prefetch=self.prefetch,
            upsample=self.upsample,
            chunk=self.chunk,
            scaled=self.scaled_decode,
            raw=self.decode == "gpu",
        )
        try:
            records = self.records(pool, shard, n, local, nw, start=self.start.get(shard, 0))
            items = self._items(reader.run(records), pool, shard)
            yield from items if self.stain is None else self._stained(items)
        finally:
            pool.close()

    def _stained(self, items: Iterator[dict]) -> Iterator[dict]:
        """``items`` with their images stain-normalised in batches of ``chunk`` tiles (one batched
        torch call per chunk; each image is normalised on its own, so grouping does not matter)."""
        group: list[dict] = []
        for item in items:
            group.append(item)
            if len(group) < self.chunk:
                continue
            yield from self._normalise(group)
            group = []
        yield from self._normalise(group)

    def _normalise(self, group: list[dict]) -> list[dict]:
        if group:
            with torch.no_grad():
                out = self.stain(torch.stack([g["image"] for g in group]))
            for g, img in zip(group, out):
                g["image"] = img
        return group

    def _items(self, tiles: Iterator[Any], pool: Any, shard: int) -> Iterator[dict]:
        annotated = self.within == "annotations"
        raw = self.decode == "gpu"
        for k, rec, px in tiles:
            # HWC -> CHW here, on the consuming thread (the read thread is the bottleneck)
            if raw:
                image = px
            elif self.channels_last:  # a view (read-only arrays, e.g. from PIL, are copied)
                image = torch.from_numpy(px if px.flags.writeable else px.copy()).permute(2, 0, 1)
            else:
                image = torch.from_numpy(np.ascontiguousarray(px.transpose(2, 0, 1)))
            item = {
                ("raw" if raw else "image"): image,
                "slide_id": rec.slide_id,
                "coords": torch.tensor((rec.x, rec.y), dtype=torch.int64),
                "mpp": torch.tensor(rec.mpp, dtype=torch.float32),
                "shard": shard,
                "index": k,
            }
            if annotated:
                item["mask"] = torch.from_numpy(pool.label_tile_mask(rec))
            if isinstance(rec, TileListRecord):
                item["tile"] = rec.position
            yield item
