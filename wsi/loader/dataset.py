"""The online tile loader: a torch ``IterableDataset`` of tiles read straight from slides.

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
are read through ``Slide.read_regions`` in ``read_threads`` threads with at most ``prefetch``
tiles in flight, and resized to the target µm/px. Nothing (handle, event loop, fsspec session,
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
sequence, used by :class:`TileLoader` to resume). Transforms belong on the training side.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..sampling import DEFAULT_MPPS, RandomSampler, TileRecord, iter_grid, shard_index
from ..tissue.masks import TissueMask
from .mosaic import mosaic, save_mosaic_per_mpp
from .reader import ErrorCounts, SlidePool, TileReader
from .sources import SlideSpec, resolve_slides

log = logging.getLogger("wsi.loader")

__all__ = [
    "SlideSpec",
    "TileDataset",
    "TileLoader",
    "collate_tiles",
    "make_loader",
    "mosaic",
    "resolve_slides",
    "save_mosaic_per_mpp",
]


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
        tissue_method: str | None = "otsu",
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
    ):
        super().__init__()
        if mode not in ("random", "grid"):
            raise ValueError(f"mode must be 'random' or 'grid', got {mode!r}")
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
        self.max_open = int(max_open)
        self.quarantine_after = int(quarantine_after)
        self.storage_options = storage_options
        self.overlap = int(overlap)
        self.stride = stride
        self.thumbnail_size = int(thumbnail_size)
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
        # validate sampler arguments now rather than inside a worker
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
        return state

    def set_epoch(self, epoch: int) -> None:
        """Random mode draws a new sequence per epoch (grid order does not depend on it)."""
        self.epoch = int(epoch)

    @property
    def errors(self) -> dict:
        """Error counts of the last iteration in *this* process (see :class:`ErrorCounts`)."""
        return (self._pool.errors if self._pool is not None else ErrorCounts()).as_dict()

    def _new_pool(self) -> SlidePool:
        return SlidePool(
            self.specs,
            max_open=self.max_open,
            tissue_method=self.tissue_method,
            thumbnail_size=self.thumbnail_size,
            masks=self.masks,
            quarantine_after=self.quarantine_after,
            storage_options=self.storage_options,
            geo_cache=self._geo_cache,
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
        )
        stop = None
        if self.samples_per_epoch is not None:
            q, r = divmod(self.samples_per_epoch, nw)
            stop = q + (local < r)
        return sampler.iter(self.epoch, shard, start=start, stop=stop)

    def _sync_shared(self) -> None:
        info = get_worker_info()
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
            pool, read_threads=self.read_threads, prefetch=self.prefetch, upsample=self.upsample
        )
        try:
            records = self.records(pool, shard, n, local, nw, start=self.start.get(shard, 0))
            for k, rec, chw in reader.run(records):
                yield {
                    "image": torch.from_numpy(chw),
                    "slide_id": rec.slide_id,
                    "coords": torch.tensor((rec.x, rec.y), dtype=torch.int64),
                    "mpp": torch.tensor(rec.mpp, dtype=torch.float32),
                    "shard": shard,
                    "index": k,
                }
        finally:
            pool.close()


def collate_tiles(items: list[dict]) -> dict:
    """Stack items into a batch; inside a worker, attach the worker's error counts (``_errors``)."""
    # numpy stacks on this thread; torch.stack may wake intra-op threads that compete with decoding
    batch = {
        "image": torch.from_numpy(np.stack([it["image"].numpy() for it in items])),
        "slide_id": [it["slide_id"] for it in items],
        "coords": torch.from_numpy(np.stack([it["coords"].numpy() for it in items])),
        "mpp": torch.from_numpy(np.stack([it["mpp"].numpy() for it in items])),
        "shard": torch.tensor([it["shard"] for it in items], dtype=torch.int64),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
    }
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, TileDataset):
        batch["_errors"] = info.dataset.errors
    return batch


class TileLoader:
    """A DataLoader over a :class:`TileDataset` with epochs, exact mid-epoch resume and error
    counts. Made by :func:`make_loader`. Batches: ``{"image": (B,3,S,S) uint8, "slide_id":
    list[str], "coords": (B,2) int64, "mpp": (B,) float32}``.

    Resume: the state records, per shard, how many sequence positions were consumed by the batches
    *yielded so far* (workers run ahead; that does not count) plus which worker is next, so a fresh
    loader with the same dataset settings, ``num_workers`` and world size continues with exactly the
    batches the old one would have produced. Workers are started for each iteration (the epoch and
    resume position travel with the dataset to the workers) unless ``persistent_workers`` (the
    default): then the workers live as long as the loader, keep their open slides and masks, and
    read the epoch and resume position from a small shared-memory array at the start of each
    iteration. With ``multiprocessing_context="forkserver"`` the fork server
    preloads :mod:`wsi.loader` (torch included), so a new set of workers starts in well under a
    second instead of each spawned worker importing torch again (several seconds on a busy machine).
    """

    def __init__(
        self,
        dataset: TileDataset,
        *,
        batch_size: int,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        multiprocessing_context: str = "spawn",
        prefetch_factor: int | None = None,
        drop_last: bool = False,
    ):
        if not isinstance(dataset, TileDataset):
            raise TypeError(f"make_loader needs a TileDataset, got {type(dataset).__name__}")
        if multiprocessing_context not in ("spawn", "forkserver"):
            raise ValueError(
                f"multiprocessing_context must be 'spawn' or 'forkserver' (zarr v3 and fsspec async are not "
                f"fork-safe), got {multiprocessing_context!r}"
            )
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.multiprocessing_context = multiprocessing_context
        self.prefetch_factor = prefetch_factor
        self.drop_last = drop_last
        self._consumed: dict[int, int] = {}
        self._rotation = 0
        self._finished = False
        self._worker_errors: dict[int, dict] = {}
        self._dl: DataLoader | None = None  # kept across epochs with persistent workers

    @property
    def num_shards(self) -> int:
        return self.dataset.world_size * max(1, self.num_workers)

    def __len__(self) -> int:
        """Batches per epoch on this rank, random mode with ``samples_per_epoch`` (an upper bound:
        tiles that fail to read make an epoch shorter). Grid and endless streams have no length."""
        ds = self.dataset
        if ds.mode != "random" or ds.samples_per_epoch is None:
            raise TypeError("only a random-mode TileDataset with samples_per_epoch has a length")
        nw = max(1, self.num_workers)
        q, r = divmod(ds.samples_per_epoch, nw)
        per = [q + (w < r) for w in range(nw)]
        if self.drop_last:
            return sum(n // self.batch_size for n in per)
        return sum(-(-n // self.batch_size) for n in per)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (a different epoch resets the position; the same keeps it)."""
        if int(epoch) != self.dataset.epoch:
            self._consumed, self._rotation, self._finished = {}, 0, False
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {
            "epoch": self.dataset.epoch,
            "consumed": {int(k): int(v) for k, v in self._consumed.items()},
            "rotation": self._rotation,
            "finished": self._finished,
            "num_shards": self.num_shards,
            "num_workers": self.num_workers,
            "mode": self.dataset.mode,
            "seed": self.dataset.seed,
        }

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (
            ("num_shards", self.num_shards),
            ("num_workers", self.num_workers),
            ("mode", self.dataset.mode),
            ("seed", self.dataset.seed),
        ):
            if sd.get(key) != mine:
                raise ValueError(
                    f"loader state was saved with {key}={sd.get(key)!r} but this loader has {mine!r}; resume "
                    f"with the same world size, num_workers, mode and seed"
                )
        self.dataset.set_epoch(sd["epoch"])
        self._consumed = {int(k): int(v) for k, v in sd["consumed"].items()}
        self._rotation = int(sd["rotation"])
        self._finished = bool(sd["finished"])

    @property
    def errors(self) -> dict:
        """Error counts summed over workers (of batches received so far) or the in-process counts."""
        if self.num_workers == 0:
            return self.dataset.errors
        tot = ErrorCounts()
        for e in self._worker_errors.values():
            tot.tile_errors += e["tile_errors"]
            tot.slide_errors += e["slide_errors"]
            tot.skipped += e["skipped"]
            tot.quarantined.extend(q for q in e["quarantined"] if q not in tot.quarantined)
        return tot.as_dict()

    def _dataloader(self) -> DataLoader:
        ds = self.dataset
        if self._dl is not None:
            return self._dl
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            if self.multiprocessing_context == "forkserver":
                # the fork server imports torch and wsi once; workers forked from it start in ~0.1 s
                # instead of re-importing everything (only takes effect before the server starts)
                multiprocessing.set_forkserver_preload(["wsi.loader"])
            ctx = multiprocessing.get_context(self.multiprocessing_context)
            kw = {"multiprocessing_context": ctx, "persistent_workers": self.persistent_workers}
            if self.prefetch_factor is not None:
                kw["prefetch_factor"] = self.prefetch_factor
            if self.persistent_workers:
                ds._shared = ctx.RawArray("q", 2 + self.num_workers)
        dl = DataLoader(
            ds,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_tiles,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            **kw,
        )
        if self.persistent_workers:
            self._dl = dl
        return dl

    def __iter__(self) -> Iterator[dict]:
        if self._finished:  # iterating again without set_epoch repeats the epoch
            self._consumed, self._rotation, self._finished = {}, 0, False
        ds = self.dataset
        if ds._rank_from_dist and self._dl is None:
            # torch.distributed may have been initialised after the dataset was made
            ds.rank, ds.world_size = _dist_rank_world()
        ds.start = dict(self._consumed)
        ds.rotation = self._rotation
        dl = self._dataloader()
        nw = max(1, self.num_workers)
        if ds._shared is not None:  # persistent workers read epoch and position from shared memory
            ds._shared[0], ds._shared[1] = ds.epoch, self._rotation
            for local in range(nw):
                ds._shared[2 + local] = self._consumed.get(ds.rank * nw + local, 0)
        for batch in dl:
            shard = int(batch.pop("shard")[0])
            self._consumed[shard] = int(batch.pop("index")[-1]) + 1
            self._rotation = (self._rotation + 1) % nw
            errs = batch.pop("_errors", None)
            if errs is not None:
                self._worker_errors[shard] = errs
            yield batch
        self._finished = True


def make_loader(
    dataset: TileDataset,
    *,
    batch_size: int,
    num_workers: int = 2,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    multiprocessing_context: str = "spawn",
    prefetch_factor: int | None = None,
    drop_last: bool = False,
) -> TileLoader:
    """A :class:`TileLoader` (DataLoader with spawn/forkserver workers, resumable state)."""
    return TileLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers,
        multiprocessing_context=multiprocessing_context,
        prefetch_factor=prefetch_factor,
        drop_last=drop_last,
    )
