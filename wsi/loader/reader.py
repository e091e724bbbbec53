"""The worker-side read engine of :mod:`wsi.loader` (no torch here).

:class:`SlidePool` opens slides lazily (bounded LRU of handles), computes each slide's geometry
and tissue mask once, counts errors and quarantines slides. :class:`TileReader` turns a stream of
``(index, TileRecord)`` into ``(index, record, HWC uint8 array)``: records are cut into chunks,
each chunk is read by a thread of a per-process pool (one ``Slide.read_regions`` call per slide,
level and box size; decode and PIL resize release the GIL), at most ``prefetch`` tiles in flight,
results in input order. Everything is created inside the process that iterates, so nothing crosses
a fork.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from ..annotations import ClassLabels, GeoJSONAnnotations, LabelMask
from ..decode import DecodeStats, TileCache
from ..errors import SlideError
from ..sampling import LabelMap, SlideGeometry, TileRecord, coarse_downsample, level_grids
from ..slide import Slide, open_slide
from ..tissue.detect import DEFAULT_METHOD
from ..tissue.masks import TissueMask
from .sources import SlideSpec

log = logging.getLogger("wsi.loader")


@dataclass
class ErrorCounts:
    """Read failures seen by one process. ``tile_errors``: tiles that failed to read (never
    replaced); ``slide_errors``: slides that failed to open or to give geometry/mask;
    ``skipped``: records dropped because their slide was quarantined; ``quarantined``: slide ids;
    ``first_error``: the message of the first tile that failed (empty when none did)."""

    tile_errors: int = 0
    slide_errors: int = 0
    skipped: int = 0
    quarantined: list[str] = field(default_factory=list)
    first_error: str = ""

    def as_dict(self) -> dict:
        return {
            "tile_errors": self.tile_errors,
            "slide_errors": self.slide_errors,
            "skipped": self.skipped,
            "quarantined": list(self.quarantined),
            "first_error": self.first_error,
        }


def load_spec_mask(spec: SlideSpec, slide: Slide) -> TissueMask | None:
    """The mask a :class:`SlideSpec` carries (object, saved mask PNG+json, or user mask/GeoJSON)."""
    m = spec.mask
    if m is None or isinstance(m, TissueMask):
        return m
    if str(m).lower().endswith(".png") and _exists(str(m) + ".json"):
        return TissueMask.load(m)
    from ..tissue import tissue_mask

    return tissue_mask(slide, method="mask", mask_path=m)


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)


class SlidePool:
    """Open slides (LRU of at most ``max_open``), per-slide geometry cache, error counts."""

    def __init__(
        self,
        specs: list[SlideSpec],
        *,
        max_open: int = 8,
        tissue_method: str | None = DEFAULT_METHOD,
        thumbnail_size: int = 1024,
        masks: dict[str, TissueMask] | None = None,
        quarantine_after: int = 5,
        storage_options: dict | None = None,
        geo_cache: dict | None = None,
        labels: ClassLabels | None = None,
        label_tile: tuple[int, float] | None = None,
        tile_cache_bytes: int = 0,
    ):
        self.specs = {s.slide_id: s for s in specs}
        #: decodes of every slide this pool opens (one counter for the process) and tiles delivered
        self.decode_stats = DecodeStats()
        self.delivered_tiles = 0
        self.delivered_px = 0
        self._uncounted = False  # a slide whose backend does not count decodes was read
        #: decoded tiles shared by the slides of this process (None: off)
        self.tile_cache = TileCache(tile_cache_bytes) if tile_cache_bytes > 0 else None
        #: segmentation: how annotations become labels, and the (tile size, µm/px) they are read at
        self.labels = labels
        self.label_tile = label_tile
        self._ann: dict[str, GeoJSONAnnotations | LabelMask] = {}
        self.max_open = max(1, int(max_open))
        self.tissue_method = tissue_method
        self.thumbnail_size = thumbnail_size
        self.masks = dict(masks or {})
        self.quarantine_after = quarantine_after
        self.storage_options = storage_options
        self.errors = ErrorCounts()
        self._open: OrderedDict[str, Slide] = OrderedDict()
        self._refs: dict[str, int] = {}
        self._closing: dict[str, Slide] = {}
        # geometry of slides that opened (shared across iterations when the caller passes a dict);
        # failures are not cached there, so a later epoch tries the slide again
        self._geo: dict[str, SlideGeometry] = geo_cache if geo_cache is not None else {}
        self._failed_geo: set[str] = set()
        self._tile_err: dict[str, int] = {}
        self._quarantined: set[str] = set()

    # --- quarantine -----------------------------------------------------------------------------
    def is_quarantined(self, sid: str) -> bool:
        return sid in self._quarantined

    def quarantine(self, sid: str, reason: str) -> None:
        if sid not in self._quarantined:
            self._quarantined.add(sid)
            self.errors.quarantined.append(sid)
            log.error("slide %s quarantined: %s", sid, reason)
            self._evict(sid)

    def tile_failed(self, rec: TileRecord, err: BaseException) -> None:
        self.errors.tile_errors += 1
        if not self.errors.first_error:
            self.errors.first_error = f"tile ({rec.x}, {rec.y}) of {rec.slide_id}: {err}"
        n = self._tile_err[rec.slide_id] = self._tile_err.get(rec.slide_id, 0) + 1
        log.warning("tile %s (%d, %d) @ %g µm/px failed: %s", rec.slide_id, rec.x, rec.y, rec.mpp, err)
        if n >= self.quarantine_after:
            self.quarantine(rec.slide_id, f"{n} tile errors (quarantine_after={self.quarantine_after})")

    def slide_failed(self, sid: str, err: BaseException) -> None:
        self.errors.slide_errors += 1
        self.quarantine(sid, f"{type(err).__name__}: {err}")

    # --- handles --------------------------------------------------------------------------------
    def acquire(self, sid: str) -> Slide:
        """An open handle (opened if needed); pair with :meth:`release`. Raises ``OSError``."""
        slide = self._open.get(sid)
        if slide is None:
            spec = self.specs[sid]
            slide = open_slide(spec.url, storage_options=self.storage_options, mpp=spec.mpp)
            if slide.decode_stats is None:
                self._uncounted = True
            slide.decode_stats = self.decode_stats
            slide.tile_cache = self.tile_cache
            self._open[sid] = slide
            self._shrink()
        else:
            self._open.move_to_end(sid)
        self._refs[sid] = self._refs.get(sid, 0) + 1
        return slide

    def release(self, sid: str) -> None:
        n = self._refs[sid] = self._refs[sid] - 1
        if n == 0 and sid in self._closing:
            self._closing.pop(sid).close()

    def _shrink(self) -> None:
        while len(self._open) > self.max_open:
            self._evict(next(iter(self._open)))

    def _evict(self, sid: str) -> None:
        slide = self._open.pop(sid, None)
        if slide is None:
            return
        if self._refs.get(sid, 0) > 0:
            self._closing[sid] = slide  # closed when its last in-flight read is done
        else:
            slide.close()

    def read_stats(self) -> dict:
        """Tiles and pixels delivered, tiles and pixels decoded (None when a slide's backend does not
        count: OpenSlide, Zarr), decoded per delivered pixel, tile-cache hits and misses."""
        d = self.decode_stats.as_dict()
        decoded = None if self._uncounted else d["decoded_px"]
        return {
            "delivered_tiles": self.delivered_tiles,
            "delivered_px": self.delivered_px,
            "decoded_tiles": None if self._uncounted else d["decoded_tiles"],
            "decoded_px": decoded,
            "cache_hits": d["cache_hits"],
            "cache_misses": d["cache_misses"],
        }

    @property
    def open_count(self) -> int:
        return len(self._open) + len(self._closing)

    def close(self) -> None:
        for s in [*self._open.values(), *self._closing.values()]:
            s.close()
        self._open.clear()
        self._closing.clear()

    # --- geometry -------------------------------------------------------------------------------
    def geometry(self, sid: str) -> SlideGeometry | None:
        """Level-0 size, µm/px and tissue mask of slide ``sid`` (computed once); None (counted,
        logged, quarantined) when the slide cannot be opened or has no µm/px."""
        if sid in self._geo:
            return self._geo[sid]
        if sid in self._failed_geo or self.is_quarantined(sid):
            return None
        try:
            slide = self.acquire(sid)
            slide.decode_stats = DecodeStats()  # the mask's thumbnail is not a tile read
            try:
                mask = self.masks.get(sid)
                if mask is None:
                    mask = load_spec_mask(self.specs[sid], slide)
                if mask is None and self.tissue_method is not None:
                    from ..tissue import tissue_mask

                    mask = tissue_mask(slide, method=self.tissue_method, thumbnail_size=self.thumbnail_size)
                base = slide.require_mpp()
                geo = SlideGeometry(
                    sid, slide.dimensions, base, mask, self._label_map(sid, slide, base), level_grids(slide)
                )
            finally:
                slide.decode_stats = self.decode_stats
                self.release(sid)
        except OSError as e:  # SlideError, FileNotFoundError, network errors
            self._failed_geo.add(sid)
            self.slide_failed(sid, e)
            return None
        self._geo[sid] = geo
        return geo

    # --- annotations (segmentation) ---------------------------------------------------------------
    def annotations(self, sid: str) -> GeoJSONAnnotations | LabelMask:
        """The annotations of slide ``sid`` (loaded and validated once per pool)."""
        if sid not in self._ann:
            if self.labels is None:
                raise ValueError("this pool was made without class labels (labels=)")
            spec = self.specs[sid]
            if not spec.annotations:
                raise ValueError(f"slide {spec.url} has no annotations; give each slide its annotation file")
            slide = self.acquire(sid)
            try:
                dims = slide.dimensions
            finally:
                self.release(sid)
            self._ann[sid] = self.labels.load(spec.annotations, dims, spec.annotation_downsample)
        return self._ann[sid]

    def _label_map(self, sid: str, slide: Slide, base_mpp: float) -> LabelMap | None:
        if self.labels is None or self.label_tile is None:
            return None
        W, H = slide.dimensions
        ds = coarse_downsample((W, H), base_mpp, *self.label_tile)
        size = (max(1, round(W / ds)), max(1, round(H / ds)))
        coarse = self.labels.rasterize(self.annotations(sid), (0, 0, W, H), size)
        return LabelMap(coarse, W / coarse.shape[1])

    def label_tile_mask(self, rec: TileRecord) -> np.ndarray:
        """(out_size, out_size) uint8 class labels of a record's level-0 box."""
        s = rec.size0
        return self.labels.rasterize(
            self.annotations(rec.slide_id), (rec.x, rec.y, s, s), (rec.out_size,) * 2
        )


class TileReader:
    """Concurrent, bounded, in-order tile reads for one process (see the module docstring)."""

    def __init__(
        self,
        pool: SlidePool,
        *,
        read_threads: int = 2,
        prefetch: int = 64,
        upsample: bool = False,
        chunk: int = 16,
        scaled: bool = False,
        raw: bool = False,
    ):
        self.pool = pool
        self.read_threads = max(1, int(read_threads))
        self.chunk = max(1, min(int(chunk), int(prefetch)))
        self.max_chunks = max(1, int(prefetch) // self.chunk)
        self.upsample = upsample
        #: reductions by 2/4/8 decoded in the JPEG DCT domain (``Slide.read_regions_mpp(scaled=)``)
        self.scaled = scaled
        #: yield :class:`wsi.loader.gpu.RawTile` s (encoded tiles for a GPU decode) instead of pixels
        self.raw = raw

    def run(self, records: Iterator[tuple[int, TileRecord]]) -> Iterator[tuple[int, TileRecord, np.ndarray]]:
        it = iter(records)
        inflight: deque[tuple[Future, list]] = deque()
        ex = ThreadPoolExecutor(self.read_threads, thread_name_prefix="slidestream-read")
        try:
            more = True
            while more or inflight:
                while more and len(inflight) < self.max_chunks:
                    part = list(islice(it, self.chunk))
                    if len(part) < self.chunk:
                        more = False
                    jobs = self._prepare(part)
                    if jobs:
                        inflight.append((ex.submit(self._read, jobs), jobs))
                if not inflight:
                    break
                fut, jobs = inflight.popleft()
                results = fut.result()
                for (k, rec, _slide, _lvl, _box), res in zip(jobs, results):
                    if self.pool.is_quarantined(rec.slide_id):
                        # decided in sequence order, so which tiles are dropped does not depend on timing
                        self.pool.errors.skipped += 1
                    elif isinstance(res, BaseException):
                        self.pool.tile_failed(rec, res)
                    else:
                        self.pool.delivered_tiles += 1
                        self.pool.delivered_px += rec.out_size * rec.out_size
                        yield k, rec, res
                for job in jobs:
                    self.pool.release(job[1].slide_id)
        finally:
            for fut, _jobs in inflight:
                fut.cancel()
            ex.shutdown(wait=True, cancel_futures=True)
            for _fut, jobs in inflight:
                for job in jobs:
                    self.pool.release(job[1].slide_id)

    def _read(self, jobs: list[tuple]) -> list:
        if self.raw:
            from .gpu import read_raw_jobs

            return read_raw_jobs(jobs, self.pool.decode_stats)
        return _read_jobs(jobs, self.upsample, self.scaled)

    def _prepare(self, part: list[tuple[int, TileRecord]]) -> list[tuple]:
        """Acquire handles and compute (level, level box) for each record of a chunk."""
        jobs = []
        pool = self.pool
        for k, rec in part:
            sid = rec.slide_id
            if pool.is_quarantined(sid):
                pool.errors.skipped += 1
                continue
            try:
                slide = pool.acquire(sid)
            except OSError as e:
                pool.slide_failed(sid, e)
                pool.errors.skipped += 1
                continue
            try:
                level, box = slide.region_for_mpp(
                    (rec.x, rec.y), (rec.out_size, rec.out_size), rec.mpp, allow_upsample=self.upsample
                )
            except SlideError as e:
                pool.release(sid)
                pool.tile_failed(rec, e)
                continue
            jobs.append((k, rec, slide, level, box))
        return jobs


def _read_jobs(jobs: list[tuple], upsample: bool, scaled: bool = False) -> list[np.ndarray | BaseException]:
    """Read and resize one chunk (runs in a pool thread). Returns HWC uint8 arrays or the error
    of each tile (the CHW copy is made by the consuming thread, :meth:`TileDataset._items`, so the
    read thread only reads and decodes); one :meth:`Slide.read_regions_mpp` call per (slide, µm/px, tile size) — which
    makes one ``read_regions`` call per level box — and a per-tile retry when a batched call
    fails, so one bad tile does not fail its neighbours."""
    out: list[np.ndarray | BaseException | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, (_k, rec, slide, _level, _box) in enumerate(jobs):
        groups.setdefault((id(slide), rec.mpp, rec.out_size), []).append(i)
    for (_sid, mpp, n), idx in groups.items():
        slide = jobs[idx[0]][2]
        locs = [(jobs[i][1].x, jobs[i][1].y) for i in idx]
        try:
            imgs: list = slide.read_regions_mpp(
                locs, (n, n), mpp, allow_upsample=upsample, threads=1, scaled=scaled
            )
        except OSError:
            imgs = []
            for loc in locs:
                try:
                    imgs.append(
                        slide.read_regions_mpp(
                            [loc], (n, n), mpp, allow_upsample=upsample, threads=1, scaled=scaled
                        )[0]
                    )
                except OSError as e:
                    imgs.append(e)
        for i, img in zip(idx, imgs):
            out[i] = img
    return out  # type: ignore[return-value]
