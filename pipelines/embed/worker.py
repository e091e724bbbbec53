"""The per-slide work of ``slidestream embed``: check an existing feature file, embed one slide
(tissue mask → grid tiles → batched forward → ``<slide_id>.h5``).

The work is split in two. The *reading side*, :func:`read_slide`, opens the slide, computes its
tissue mask and grid and then yields uint8 tile batches (:class:`RawBatch`); it runs in a worker
process with a memory limit and time limits (:mod:`pipelines.runtime`), so that a native crash,
a hang or runaway memory in a decoder or OpenSlide fails that slide and not the job. The *encoder
side*, :func:`embed_one`, stays in the job's process (and on its GPU): it normalises each batch,
runs the encoder and appends the features to the :class:`wsi.io.FeatureWriter`, so memory does not
grow with the slide. With isolation off both sides run in the job's process, through the same code.

Tiles are read by the online loader (:class:`wsi.loader.TileDataset` in grid mode over the one
slide: batched byte-range reads, decode in threads, bounded prefetch), resized to the target µm/px
and never written to disk. The encoder and its input preparation are
:func:`models.encoders.load_encoder`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wsi.byteio import local_path
from wsi.errors import MissingMppError, SlideError, UnreadableTileError, missing_mpp
from wsi.io import FeatureWriter
from wsi.slide import open_slide

from .. import __version__
from ..runtime import IsolationConfig, SlideWorker, run_stream
from .manifest import Row

if TYPE_CHECKING:  # the reading side runs in a worker that never needs the encoder (nor timm)
    from models.encoders import Encoder

log = logging.getLogger(__name__)


# --- slide facts --------------------------------------------------------------------------------
def _fs(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """The fsspec file system and path of ``url``; a local path is taken literally (``#``, ``?``
    and ``::`` are file-name characters, never a fragment, query or URL chain)."""
    import fsspec

    local = local_path(url)
    if local is not None:
        return fsspec.filesystem("file"), os.path.abspath(local)
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def slide_stat(url: str, storage_options: dict | None = None) -> tuple[int | None, Any]:
    """(size in bytes, mtime) of a slide file or store, via fsspec; (None, None) if unknown."""
    try:
        fs, path = _fs(url, storage_options)
        info = fs.info(path)
        size = info.get("size")
        if info.get("type") == "directory":
            size = fs.du(path)
        mtime = next(
            (
                info[k]
                for k in ("mtime", "LastModified", "last_modified", "updated", "created")
                if info.get(k) is not None
            ),
            None,
        )
    except (OSError, ValueError) as e:
        log.debug("cannot stat %s: %s", url, e)
        return None, None
    if mtime is not None and not isinstance(mtime, (int, float)):
        mtime = str(mtime)
    return (int(size) if size is not None else None), mtime


def slide_sha256(url: str, storage_options: dict | None = None) -> str | None:
    """sha256 of a slide file (streamed, 8 MiB at a time); None for a directory store."""
    fs, path = _fs(url, storage_options)
    if fs.isdir(path):
        return None
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


#: the ``stain_norm`` attribute of a feature file embedded without stain normalisation
NO_STAIN = "none"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return str(a) == str(b)


def check_feature_file(path: str | os.PathLike, expect: dict[str, Any]) -> tuple[bool, str, int]:
    """Whether ``path`` is a complete feature file for this configuration: it opens, has
    ``complete`` true, ``features``/``coords`` row counts agree with ``n_tiles``, and every
    attribute in ``expect`` matches (None in ``expect`` means "not checked"). Returns
    (valid, why not, n_tiles)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if not bool(attrs.get("complete", False)):
                return False, "file not marked complete", 0
            if "features" not in f or "coords" not in f:
                return False, "features/coords datasets missing", 0
            n_feat, n_coords = f["features"].shape[0], f["coords"].shape[0]
            n = int(attrs.get("n_tiles", -1))
            if not n_feat == n_coords == n:
                return False, f"row counts disagree (features {n_feat}, coords {n_coords}, n_tiles {n})", 0
    except (OSError, ValueError, KeyError) as e:
        return False, f"cannot open ({e})", 0
    for k, v in expect.items():
        if v is None:
            continue
        got = attrs.get(k)
        if got is None and k == "stain_norm" and v == NO_STAIN:  # files from before the option
            continue
        if isinstance(got, bytes):
            got = got.decode()
        if got is None or not _same(got, v):
            return False, f"attribute {k}={got!r} differs from this job's {v!r}", 0
    return True, "", n


def clean_temp_files(out_dir: Path, slide_id: str) -> int:
    """Remove temporary files that a killed writer left for ``<slide_id>.h5``; returns how many."""
    n = 0
    for p in out_dir.glob(f".{slide_id}.h5.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


# --- tiles ----------------------------------------------------------------------------------------
def slide_mask(slide: Any, spec: Any, tissue_method: str) -> Any:
    """The slide list's own mask when it gives one, else ``wsi.tissue.tissue_mask``."""
    from wsi.loader import load_spec_mask
    from wsi.tissue import tissue_mask

    mask = load_spec_mask(spec, slide)
    return mask if mask is not None else tissue_mask(slide, method=tissue_method)


def grid(
    slide_id: str, slide: Any, mask: Any, *, base_mpp: float, mpp: float, tile_size: int, min_tissue: float
) -> list[Any]:
    """The grid tiles of one slide that are embedded (row-major, tissue fraction ≥ ``min_tissue``),
    on the encoded-tile grid where the tile size allows (:func:`wsi.sampling.grid_coords`), as the
    loader's grid mode lays it."""
    from wsi.sampling import grid_records, level_grids

    return grid_records(
        slide_id,
        slide.dimensions,
        mask,
        base_mpp=base_mpp,
        mpp=mpp,
        tile_size=tile_size,
        overlap=0,
        min_tissue=min_tissue,
        levels=level_grids(slide),
    )


@dataclass
class RawBatch:
    """A batch of tiles as read: what the reading side sends to the encoder side."""

    images: np.ndarray | None  # (B, 3, tile, tile) uint8; None with GPU decode
    coords: np.ndarray  # (B, 2) int64 level-0 top-left corners
    consumed: int  # grid records handled so far (read or failed), for progress
    #: the loader's read counts so far (wsi.loader.TileDataset.read_stats)
    read_stats: dict | None = None
    #: with ``decode="gpu"``: the encoded tiles (:class:`wsi.loader.RawTile`), decoded by the encoder side
    raw: list | None = None


@dataclass
class TileBatch:
    """A batch of tiles ready for the encoder."""

    x: torch.Tensor  # (B, 3, tile, tile) float32, normalised with the encoder's mean/std
    coords: np.ndarray  # (B, 2) int64 level-0 top-left corners
    consumed: int  # grid records handled so far (read or failed), for progress
    #: the loader's read counts so far (wsi.loader.TileDataset.read_stats)
    read_stats: dict | None = None


def raw_batches(spec: Any, n_records: int, mask: Any, base_mpp: float, job: Job) -> Iterator[RawBatch]:
    """Batches of the slide's grid tiles (the ``n_records`` of :func:`grid`) read by the online
    loader: a :class:`wsi.loader.TileDataset` in grid mode over this one slide with its ``mask``,
    ``job.read_threads`` decode threads and a bounded prefetch, iterated in this process.

    With ``job.decode == "gpu"`` the loader hands over encoded tiles and each batch is decoded on
    the encoder's device (:func:`wsi.loader.decode_raw_tiles`); ``job.scaled_decode`` decodes 2×/4×/8×
    reductions in the DCT domain. A tile that cannot be read is left out (never replaced). When more than
    ``job.max_failed_tiles`` of the slide's tiles fail, the loader quarantines the slide and this
    raises :class:`UnreadableTileError` with the first tile's error. Batches hold the next
    ``job.batch_size`` tiles read, so their content does not depend on timing."""
    from wsi.loader import TileDataset

    sid = spec.slide_id
    allowed = int(job.max_failed_tiles * n_records)
    ds = TileDataset(
        [replace(spec, mpp=base_mpp, mask=None)],
        mode="grid",
        mpps=(job.mpp,),
        tile_size=job.tile_size,
        min_tissue=job.min_tissue,
        tissue_method=None,
        masks={sid: mask},
        read_threads=max(1, job.read_threads),
        prefetch=2 * job.batch_size,
        chunk=max(1, min(16, job.batch_size // max(1, job.read_threads))),
        max_open=1,
        quarantine_after=allowed + 1,
        storage_options=job.storage_options,
        rank=0,
        world_size=1,
        scaled_decode=job.scaled_decode,
        decode=job.decode,
    )
    images: list[torch.Tensor] = []
    xy: list[torch.Tensor] = []
    seen = 0

    def batch() -> RawBatch:
        coords = torch.stack(xy).numpy().astype(np.int64).reshape(-1, 2)
        stats = dict(ds.read_stats)
        if job.decode == "gpu":  # encoded tiles: the encoder side decodes them on its device
            return RawBatch(None, coords, seen, stats, raw=list(images))
        return RawBatch(torch.stack(images).numpy(), coords, seen, stats)

    for item in ds:
        images.append(item["raw"] if job.decode == "gpu" else item["image"])
        xy.append(item["coords"])
        seen = int(item["index"]) + 1
        if len(images) == job.batch_size:
            yield batch()
            images, xy = [], []
    seen = n_records
    errors = ds.errors
    if sid in errors["quarantined"]:
        first = f"; first: {errors['first_error']}" if errors["first_error"] else ""
        raise UnreadableTileError(
            f"at least {errors['tile_errors']} of {n_records} tiles unreadable (more than --max-failed-tiles "
            f"{job.max_failed_tiles:g} of them){first}",
            spec.url,
        )
    if images:
        yield batch()


def to_encoder_input(b: RawBatch, enc: Encoder, stain: Any = None) -> TileBatch:
    """A read batch normalised for ``enc``: decoded tiles on the CPU (pinned for a GPU; forward
    moves them), encoded tiles (``decode="gpu"``) decoded in one batch on ``enc.device``; for an
    encoder with a fixed input size (a preset), resized to it. With ``stain`` (a fitted
    :class:`models.stain.StainNormalizer` on the encoder's device) the uint8 tiles are first
    stain-normalised there, as one batch."""
    from models.encoders import preprocess

    size = enc.input_size if enc.fixed_input else None
    if b.raw is not None:
        from wsi.loader import decode_raw_tiles

        images = decode_raw_tiles(b.raw, enc.device)
    else:
        images = torch.from_numpy(b.images)
    if stain is not None:
        with torch.no_grad():
            images = stain(images.to(enc.device))
    x = preprocess(images, enc.mean, enc.std, size=size)
    if enc.device.type == "cuda" and not x.is_cuda:
        x = x.pin_memory()
    return TileBatch(x, b.coords, b.consumed, b.read_stats)


def tile_batches(
    spec: Any, n_records: int, mask: Any, base_mpp: float, job: Job, enc: Encoder
) -> Iterator[TileBatch]:
    """:func:`raw_batches` normalised for ``enc``, read in this process."""
    for b in raw_batches(spec, n_records, mask, base_mpp, job):
        yield to_encoder_input(b, enc)


class SlideFailed(RuntimeError):
    """A slide cannot be embedded; the message is the manifest's reason."""


@dataclass
class Job:
    """What one slide's embedding needs to know about the job."""

    out_dir: Path
    mpp: float
    tile_size: int
    batch_size: int
    tissue_method: str  # as requested ("auto" is resolved per slide)
    min_tissue: float
    mpp_override: float | None
    read_threads: int
    hash_slides: bool
    max_failed_tiles: float
    progress: bool
    storage_options: dict | None = None
    decode: str = "cpu"
    scaled_decode: bool = False
    stain_norm: str | None = None  # METHOD:TARGET (wsi.loader.stain), applied on the encoder side


def expected_attrs(job: Job, enc: Encoder, spec: Any, slide_size: Any, slide_mtime: Any) -> dict[str, Any]:
    """The attributes an existing feature file must carry to be reused by this job."""
    from wsi.tissue import resolve_method

    method = "mask" if getattr(spec, "mask", None) is not None else resolve_method(job.tissue_method)
    return {
        "encoder": enc.name,
        "encoder_weights_sha256": enc.weights_sha256,
        "mpp": job.mpp,
        "tile_size_px": job.tile_size,
        "tissue_method": method,
        "min_tissue": job.min_tissue,
        "slide_size": slide_size,
        "slide_mtime": slide_mtime,
        "stain_norm": job.stain_norm or NO_STAIN,
    }


def open_with_mpp(url: str, spec_mpp: float | None, job: Job) -> tuple[Any, float, str]:
    """Open a slide with its µm/px: the slide list's value, else the metadata, else
    ``job.mpp_override``; :class:`MissingMppError` when there is none."""
    slide = open_slide(url, storage_options=job.storage_options, mpp=spec_mpp)
    if slide.mpp is not None:
        return slide, slide.mpp, ("slide list" if spec_mpp else "metadata")
    slide.close()
    if job.mpp_override is None:
        raise missing_mpp(url)
    slide = open_slide(url, storage_options=job.storage_options, mpp=job.mpp_override)
    return slide, slide.mpp, "override"


@dataclass
class SlidePlan:
    """What the reading side learned about a slide before its first tile: the encoder side's
    feature-file attributes come from it."""

    size: int | None
    mtime: Any
    base_mpp: float
    mpp_source: str
    n_records: int
    level: int
    size0: int
    dimensions: tuple[int, int]
    sha256: str | None


def read_slide(spec: Any, job: Job) -> Iterator[SlidePlan | RawBatch]:
    """The reading side of one slide (see the module docstring): its :class:`SlidePlan`, then its
    :class:`RawBatch` es. Raises :class:`SlideFailed` (no tissue, level 0 coarser than the
    requested µm/px) or a slide error."""
    url, sid = str(spec.url), spec.slide_id
    size, mtime = slide_stat(url, job.storage_options)
    slide, base_mpp, mpp_source = open_with_mpp(url, getattr(spec, "mpp", None), job)
    with slide:
        if job.mpp < base_mpp * (1 - 1e-3):
            raise SlideFailed(
                f"{url}: level 0 is {base_mpp:.4g} µm/px, coarser than the requested {job.mpp} µm/px "
                f"(tiles are never upsampled); embed it at --mpp {base_mpp:.4g} or coarser"
            )
        mask = slide_mask(slide, spec, job.tissue_method)
        records = grid(
            sid,
            slide,
            mask,
            base_mpp=base_mpp,
            mpp=job.mpp,
            tile_size=job.tile_size,
            min_tissue=job.min_tissue,
        )
        if not records:
            raise SlideFailed(
                f"no tissue: no {job.tile_size}px tile at {job.mpp} µm/px has tissue fraction "
                f">= {job.min_tissue} (mask {mask.method}, {mask.area_fraction:.1%} of the "
                f"thumbnail); lower --min-tissue or check the slide"
            )
        level = slide.region_for_mpp((records[0].x, records[0].y), (job.tile_size, job.tile_size), job.mpp)[0]
        dims = (int(slide.dimensions[0]), int(slide.dimensions[1]))
    sha = slide_sha256(url, job.storage_options) if job.hash_slides else None
    yield SlidePlan(
        size, mtime, base_mpp, mpp_source, len(records), int(level), int(round(records[0].size0)), dims, sha
    )
    yield from raw_batches(spec, len(records), mask, base_mpp, job)


def tool_coords_attrs(job: Job, plan: SlidePlan, slide_id: str) -> dict[str, Any]:
    """The ``coords`` attributes TRIDENT (and Patho-Bench) and CLAM read: TRIDENT's ``patch_size``
    is the tile side at the target magnification, its level-0 footprint ``patch_size_level0``;
    magnifications are 10 / µm/px. CLAM's ``patch_level`` 0 says the coords are level-0 pixels."""
    return {
        "patch_size": job.tile_size,
        "patch_size_level0": plan.size0,
        "level0_magnification": 10.0 / plan.base_mpp,
        "target_magnification": 10.0 / job.mpp,
        "overlap": 0,
        "name": slide_id,
        "savetodir": str(job.out_dir),
        "level0_width": plan.dimensions[0],
        "level0_height": plan.dimensions[1],
        "patch_level": 0,
    }


def embed_one(
    spec: Any,
    enc: Encoder,
    job: Job,
    *,
    rank: int = 0,
    pbar_position: int = 1,
    worker: SlideWorker | None = None,
    limits: IsolationConfig | None = None,
    stain: Any = None,
) -> Row:
    """Embed one slide to ``job.out_dir/<slide_id>.h5``; returns its manifest row ("done"), or
    raises :class:`SlideFailed` / a slide error / a :class:`pipelines.runtime.WorkerFailure` for
    the caller to record. With a ``worker`` the reading side (:func:`read_slide`) runs there under
    ``limits``; without, in this process."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    url, sid = str(spec.url), spec.slide_id
    final = job.out_dir / f"{sid}.h5"
    limits = limits or IsolationConfig()
    stream = run_stream(worker, read_slide, spec, job, what=f"slide {url}", url=url, limits=limits)
    with contextlib.closing(stream):
        plan = next(stream)
        attrs = {
            **expected_attrs(job, enc, spec, plan.size, plan.mtime),
            "level": plan.level,
            "tile_size_level0": plan.size0,
            "slidestream_version": __version__,
            "slide_id": sid,
            "slide_url": url,
            "slide_mpp": plan.base_mpp,
            "mpp_source": plan.mpp_source,
            "slide_width": plan.dimensions[0],
            "slide_height": plan.dimensions[1],
            "feature_dim": enc.dim,
            "n_grid_tiles": plan.n_records,
            **enc.provenance,  # presets: encoder_preset, encoder_hub_id, encoder_hub_revision, ...
        }
        if job.hash_slides:
            attrs["slide_sha256"] = plan.sha256
        if stain is not None:
            attrs["stain_norm_target"] = stain.describe()  # the fitted target (JSON)
        writer = FeatureWriter(
            final,
            enc.dim,
            attrs,
            coords_attrs=tool_coords_attrs(job, plan, sid),
            features_attrs={"name": sid, "savetodir": str(job.out_dir)},
        )
        bar = tqdm(
            total=plan.n_records,
            desc=sid[:30],
            unit="tile",
            leave=False,
            position=pbar_position,
            disable=not job.progress,
            dynamic_ncols=True,
        )
        try:
            done = 0
            for raw in stream:
                b = to_encoder_input(raw, enc, stain)
                writer.append(enc.forward(b.x).cpu().numpy(), b.coords)
                bar.update(b.consumed - done)
                done = b.consumed
            out_n = writer.n
            n_failed = plan.n_records - out_n
            writer.close(n_failed_tiles=n_failed, complete=True)
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
    return Row(
        sid,
        url,
        "done",
        f"{n_failed} unreadable tiles skipped" if n_failed else "",
        out_n,
        time.perf_counter() - t0,
        rank,
    )


def failure_reason(e: BaseException) -> str:
    """A one-line manifest reason for an exception raised while embedding a slide."""
    if isinstance(e, MissingMppError):
        return (
            f"missing mpp: {e.url or 'the slide'} has no µm/px metadata; pass --mpp-override X (its real "
            f"µm/px) or an mpp column in a CSV slide list, then rerun with --retry-failed"
        )
    if isinstance(e, (SlideFailed, SlideError)):
        return str(e)
    return f"{type(e).__name__}: {e}"
