"""The DataLoader side of :mod:`wsi.loader`: :class:`TileLoader` (epochs, exact mid-epoch resume,
error counts summed over workers; made by :func:`make_loader`) and :func:`collate_tiles`.
The dataset it iterates is :class:`wsi.loader.dataset.TileDataset`."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from .dataset import TileDataset, _dist_rank_world
from .reader import ErrorCounts


def collate_tiles(items: list[dict]) -> dict:
    """Stack items into a batch; inside a worker, attach the worker's error counts (``_errors``) and
    read counts (``_stats``). Items of a GPU-decode dataset keep their encoded tiles (``raw``: a list)."""
    return _collate(items, into_buffers=False)


def _collate_into_buffers(items: list[dict]) -> dict:
    """:func:`collate_tiles` for a :class:`TileLoader`'s persistent workers: images go into a
    reused shared-memory slot (:mod:`wsi.loader.shm`) when one is free, and the batch carries
    ``_buf`` instead of ``image``; the TileLoader copies them out."""
    return _collate(items, into_buffers=True)


def _channels_last_view(t: torch.Tensor) -> bool:
    """A (C, H, W) tensor that is a view of contiguous (H, W, C) pixels (C > 1)."""
    return t.dim() == 3 and t.shape[0] > 1 and not t.is_contiguous() and t.permute(1, 2, 0).is_contiguous()


def _collate(items: list[dict], into_buffers: bool) -> dict:
    # numpy stacks on this thread; torch.stack may wake intra-op threads that compete with decoding
    info = get_worker_info()
    ds = info.dataset if info is not None and isinstance(info.dataset, TileDataset) else None
    if "raw" in items[0]:
        pixels = {"raw": [it["raw"] for it in items]}
    else:
        tensors = [it["image"] for it in items]
        nhwc = all(_channels_last_view(t) for t in tensors)  # TileDataset(channels_last=True)
        images = [t.permute(1, 2, 0).numpy() if nhwc else t.numpy() for t in tensors]
        buffers = ds._batch_buffers if ds is not None and into_buffers else None
        ref = buffers.put(info.id, images) if buffers is not None else None
        if ref is not None:  # a reused shared-memory slot (wsi.loader.shm)
            pixels = {"_buf": ref}
        else:  # a new array (which the DataLoader shares with the main process itself)
            stacked = torch.from_numpy(np.stack(images))
            pixels = {"image": stacked.permute(0, 3, 1, 2) if nhwc else stacked}
    small = {
        "coords": np.stack([it["coords"].numpy() for it in items]),
        "mpp": np.stack([it["mpp"].numpy() for it in items]),
        "shard": np.array([it["shard"] for it in items], dtype=np.int64),
        "index": np.array([it["index"] for it in items], dtype=np.int64),
    }
    if "tile" in items[0]:
        small["tile"] = np.array([it["tile"] for it in items], dtype=np.int64)
    if not into_buffers:
        small = {k: torch.from_numpy(v) for k, v in small.items()}
    # else: small arrays travel pickled inline (a torch tensor would cost a new shared-memory
    # segment and a file-descriptor round trip each); TileLoader makes them tensors
    batch = {**pixels, "slide_id": [it["slide_id"] for it in items], **small}
    if "mask" in items[0]:
        batch["mask"] = torch.from_numpy(np.stack([it["mask"].numpy() for it in items]))
    if ds is not None:
        batch["_errors"] = ds.errors
        batch["_stats"] = ds.read_stats
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

    A dataset made with ``decode="gpu"`` yields encoded tiles; this loader decodes each batch on
    ``decode_device`` (default "cuda"; :func:`wsi.loader.gpu.decode_raw_tiles`) in the process that
    iterates it, so ``"image"`` arrives as a uint8 tensor on that device. Workers never touch CUDA.
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
        decode_device: str = "cuda",
        reuse_shared_memory: bool = True,
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
        self._worker_stats: dict[int, dict] = {}
        self.decode_device = decode_device
        self.reuse_shared_memory = bool(reuse_shared_memory)
        self._buffers = None  # wsi.loader.shm.BatchBuffers of the persistent workers
        self._shared = None  # [epoch, rotation, starts...] read by the persistent workers
        if (
            dataset.decode == "gpu"
            and str(decode_device).startswith("cuda")
            and not torch.cuda.is_available()
        ):
            raise ValueError(
                "decode='gpu' needs a CUDA device and none is available; use decode='cpu' (the default)"
            )
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
            tot.first_error = tot.first_error or e.get("first_error", "")
        return tot.as_dict()

    def close(self) -> None:
        """Stop persistent workers now (they otherwise live as long as the loader). A later
        iteration starts new ones."""
        self._dl = None  # the DataLoader and its iterator go with it; its workers are shut down

    @property
    def read_stats(self) -> dict:
        """Read counts summed over workers (of batches received so far) or the in-process counts,
        with ``decoded_per_delivered`` (decoded / delivered pixels; None when a slide's backend does
        not count its decodes) and ``cache_hit_rate``. See :attr:`TileDataset.read_stats`."""
        if self.num_workers == 0:
            parts = [self.dataset.read_stats]
        else:
            parts = list(self._worker_stats.values())
        tot: dict = {}
        for p in parts:
            for k, v in p.items():
                tot[k] = None if v is None or tot.get(k, 0) is None else tot.get(k, 0) + v
        for k in (
            "delivered_tiles",
            "delivered_px",
            "decoded_tiles",
            "decoded_px",
            "cache_hits",
            "cache_misses",
        ):
            tot.setdefault(k, 0)
        dec, dlv = tot["decoded_px"], tot["delivered_px"]
        tot["decoded_per_delivered"] = dec / dlv if dec is not None and dlv else None
        n = tot["cache_hits"] + tot["cache_misses"]
        tot["cache_hit_rate"] = tot["cache_hits"] / n if n else None
        return tot

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
                self._shared = ctx.RawArray("q", 2 + self.num_workers)
                self._buffers = self._make_buffers(ctx)
        dl = DataLoader(
            ds,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_collate_into_buffers if self._buffers is not None else collate_tiles,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            **kw,
        )
        if self.persistent_workers:
            self._dl = dl
        return dl

    def _make_buffers(self, ctx: Any):
        """Reused shared-memory image buffers for the persistent workers (:mod:`wsi.loader.shm`;
        None where they do not apply: GPU decode, or turned off)."""
        ds = self.dataset
        if not self.reuse_shared_memory or ds.decode == "gpu":
            return None
        from .shm import BatchBuffers

        # a worker has at most prefetch_factor batches in flight and one being collated; one spare
        slots = (self.prefetch_factor or 2) + 2
        s = ds.tile_size
        shape = (self.batch_size, s, s, 3) if ds.channels_last else (self.batch_size, 3, s, s)
        return BatchBuffers(ctx, self.num_workers, slots, shape)

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
        # this loader's shared state (workers are started, and receive it, at the first iteration;
        # another loader over the same dataset has its own)
        ds._shared, ds._batch_buffers = self._shared, self._buffers
        nw = max(1, self.num_workers)
        if ds._shared is not None:  # persistent workers read epoch and position from shared memory
            ds._shared[0], ds._shared[1] = ds.epoch, self._rotation
            for local in range(nw):
                ds._shared[2 + local] = self._consumed.get(ds.rank * nw + local, 0)
        pin = self.pin_memory and torch.cuda.is_available()
        for batch in dl:
            ref = batch.pop("_buf", None)
            if ref is not None:  # images in a reused shared-memory slot: copy out, hand it back
                image = self._buffers.take(ref, pin_memory=pin)
                batch = {"image": image.permute(0, 3, 1, 2) if ds.channels_last else image, **batch}
            for k, v in batch.items():  # small arrays sent inline (_collate_into_buffers)
                if isinstance(v, np.ndarray):
                    batch[k] = torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v)
            shard = int(batch.pop("shard")[0])
            self._consumed[shard] = int(batch.pop("index")[-1]) + 1
            self._rotation = (self._rotation + 1) % nw
            errs = batch.pop("_errors", None)
            if errs is not None:
                self._worker_errors[shard] = errs
            stats = batch.pop("_stats", None)
            if stats is not None:
                self._worker_stats[shard] = stats
            if "raw" in batch:
                from .gpu import decode_raw_tiles

                batch["image"] = decode_raw_tiles(batch.pop("raw"), self.decode_device)
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
    decode_device: str = "cuda",
    reuse_shared_memory: bool = True,
) -> TileLoader:
    """A :class:`TileLoader` (DataLoader with spawn/forkserver workers, resumable state;
    ``decode_device``: where a ``decode="gpu"`` dataset's batches are decoded;
    ``reuse_shared_memory``: persistent workers stack images into reused shared-memory slots,
    :mod:`wsi.loader.shm`)."""
    return TileLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers,
        multiprocessing_context=multiprocessing_context,
        prefetch_factor=prefetch_factor,
        drop_last=drop_last,
        decode_device=decode_device,
        reuse_shared_memory=reuse_shared_memory,
    )
