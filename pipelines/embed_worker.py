"""The per-slide work of ``slidestream embed``: load the encoder, check an existing feature file,
embed one slide (tissue mask → grid tiles → batched forward → ``<slide_id>.h5``).

Tiles are read by the online loader's engine (:mod:`wsi.loader.reader`: batched byte-range reads,
decode in threads, bounded prefetch ahead of the encoder), resized to the target µm/px and never
written to disk. Features are appended to the :class:`wsi.io.FeatureWriter` batch by batch, so
memory does not grow with the slide.
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
from typing import Any

import numpy as np
import torch

from wsi.errors import MissingMppError, SlideError, UnreadableTileError, missing_mpp
from wsi.io import FeatureWriter
from wsi.slide import open_slide

from . import __version__
from .embed_manifest import Row

log = logging.getLogger(__name__)


# --- encoder ------------------------------------------------------------------------------------
@dataclass
class Encoder:
    """A feature extractor ready for inference, with what the feature files record about it."""

    model: torch.nn.Module
    name: str
    weights_sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    device: torch.device


def _module_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_encoder(encoder: str | os.PathLike | torch.nn.Module, device: torch.device) -> Encoder:
    """``encoder`` is a timm model name, a ``.safetensors`` file exported by ``slidestream
    pretrain`` (its metadata names the timm architecture) or an ``nn.Module`` already built.

    A bare timm name has no weights here (nothing is downloaded): it is initialised from seed 0,
    so its features are reproducible but only useful for testing; a message says so.
    """
    from models import backbones

    if isinstance(encoder, torch.nn.Module):
        model, name, sha = encoder, type(encoder).__name__, _module_sha256(encoder)
    else:
        spec = os.fspath(encoder)
        if spec.endswith(".safetensors") or Path(spec).is_file():
            if not Path(spec).is_file():
                raise FileNotFoundError(
                    f"encoder weights {spec} not found; pass a timm model name or the "
                    f".safetensors file written by `slidestream pretrain`"
                )
            model = backbones.create(None, weights=spec, num_classes=0)
            name = backbones.read_metadata(spec).get(backbones.META_ARCH) or backbones.architecture(model)
            sha = backbones.weights_sha256(spec)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = backbones.create(spec, num_classes=0)
            name, sha = spec, "random-init-seed0"
            log.warning(
                "encoder %s has no weights (none are downloaded): using a seed-0 random "
                "initialisation; pass the .safetensors from `slidestream pretrain` for real features",
                spec,
            )
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    dim = backbones.feature_dim(model)
    return Encoder(model, name, sha, tuple(cfg["mean"]), tuple(cfg["std"]), int(dim), device)


# --- slide facts --------------------------------------------------------------------------------
def slide_stat(url: str, storage_options: dict | None = None) -> tuple[int | None, Any]:
    """(size in bytes, mtime) of a slide file or store, via fsspec; (None, None) if unknown."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
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
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.isdir(path):
        return None
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


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
def _mask(slide: Any, spec: Any, job: Job) -> Any:
    """The slide list's own mask when it gives one, else ``wsi.tissue.tissue_mask``."""
    from wsi.loader.reader import load_spec_mask
    from wsi.tissue import tissue_mask

    mask = load_spec_mask(spec, slide)
    return mask if mask is not None else tissue_mask(slide, method=job.tissue_method)


def _grid(
    slide_id: str, slide: Any, mask: Any, *, base_mpp: float, mpp: float, tile: int, min_tissue: float
) -> list[Any]:
    from wsi.sampling import grid_records

    return grid_records(
        slide_id,
        slide.dimensions,
        mask,
        base_mpp=base_mpp,
        mpp=mpp,
        tile_size=tile,
        overlap=0,
        min_tissue=min_tissue,
    )


@dataclass
class TileBatch:
    """A batch of tiles ready for the encoder."""

    x: torch.Tensor  # (B, 3, tile, tile) float32, normalised with the encoder's mean/std
    coords: np.ndarray  # (B, 2) int64 level-0 top-left corners
    consumed: int  # grid records handled so far (read or failed), for progress


def tile_batches(
    spec: Any, records: list[Any], mask: Any, base_mpp: float, job: Job, enc: Encoder
) -> Iterator[TileBatch]:
    """Batches of ``records`` read by the online loader's engine (:class:`wsi.loader.reader.TileReader`:
    batched byte-range reads decoded in ``job.num_workers`` threads, bounded prefetch, in order).

    A tile that cannot be read is left out (never replaced). When more than
    ``job.max_failed_tiles`` of the slide's tiles fail, the loader quarantines the slide and this
    raises :class:`UnreadableTileError` with the first tile's error. Batches hold the next
    ``job.batch_size`` tiles read, so their content does not depend on timing."""
    from wsi.loader.reader import SlidePool, TileReader

    sid = spec.slide_id
    allowed = int(job.max_failed_tiles * len(records))
    pool = SlidePool(
        [replace(spec, mpp=base_mpp, mask=None)],
        max_open=1,
        tissue_method=None,
        masks={sid: mask},
        quarantine_after=allowed + 1,
        storage_options=job.storage_options,
    )
    reader = TileReader(
        pool,
        read_threads=max(1, job.num_workers),
        prefetch=2 * job.batch_size,
        chunk=max(1, min(16, job.batch_size // max(1, job.num_workers))),
    )
    mean = torch.tensor(enc.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(enc.std, dtype=torch.float32).view(1, 3, 1, 1)
    arrs: list[np.ndarray] = []
    xy: list[tuple[int, int]] = []
    seen = 0

    def batch() -> TileBatch:
        x = torch.from_numpy(np.stack(arrs)).float().div_(255.0)
        x = (x - mean) / std
        if enc.device.type == "cuda":
            x = x.pin_memory()
        return TileBatch(x, np.asarray(xy, dtype=np.int64).reshape(-1, 2), seen)

    try:
        for k, rec, arr in reader.run(enumerate(records)):
            arrs.append(arr)
            xy.append((rec.x, rec.y))
            seen = k + 1
            if len(arrs) == job.batch_size:
                yield batch()
                arrs, xy = [], []
        seen = len(records)
        if pool.is_quarantined(sid):
            raise _unreadable(pool, records, job)
        if arrs:
            yield batch()
    finally:
        pool.close()


def _unreadable(pool: Any, records: list[Any], job: Job) -> UnreadableTileError:
    """The error for a slide the loader quarantined, with the first failing tile's message."""
    n = pool.errors.tile_errors
    spec = next(iter(pool.specs.values()))
    first = ""
    with open_slide(spec.url, storage_options=job.storage_options, mpp=spec.mpp) as s:
        for r in records:  # the first failing tile, for the message
            try:
                s.read_region_mpp((r.x, r.y), (r.out_size, r.out_size), r.mpp)
            except OSError as e:
                first = f"; first: tile ({r.x}, {r.y}): {e}"
                break
    return UnreadableTileError(
        f"at least {n} of {len(records)} tiles unreadable (more than --max-failed-tiles "
        f"{job.max_failed_tiles:g} of them){first}",
        spec.url,
    )


def _forward(enc: Encoder, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        if enc.device.type == "cuda":
            x = x.to(enc.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                y = enc.model(x)
        else:
            y = enc.model(x.to(enc.device))
        if y.ndim != 2:
            raise RuntimeError(
                f"encoder {enc.name} returned features of shape {tuple(y.shape)}; "
                f"expected (batch, dim) — build it with num_classes=0"
            )
        return y.float().cpu().numpy()


class SlideFailed(RuntimeError):
    """A slide cannot be embedded; the message is the manifest's reason."""


@dataclass
class Job:
    """What one slide's embedding needs to know about the job."""

    out_dir: Path
    mpp: float
    tile: int
    batch_size: int
    tissue_method: str  # as requested ("auto" is resolved per slide)
    min_tissue: float
    mpp_override: float | None
    num_workers: int
    hash_slides: bool
    max_failed_tiles: float
    progress: bool
    storage_options: dict | None = None


def expected_attrs(job: Job, enc: Encoder, spec: Any, slide_size: Any, slide_mtime: Any) -> dict[str, Any]:
    """The attributes an existing feature file must carry to be reused by this job."""
    from wsi.tissue import resolve_method

    method = "mask" if getattr(spec, "mask", None) is not None else resolve_method(job.tissue_method)
    return {
        "encoder": enc.name,
        "encoder_weights_sha256": enc.weights_sha256,
        "mpp": job.mpp,
        "tile_size_px": job.tile,
        "tissue_method": method,
        "min_tissue": job.min_tissue,
        "slide_size": slide_size,
        "slide_mtime": slide_mtime,
    }


def _open(url: str, spec_mpp: float | None, job: Job) -> tuple[Any, float, str]:
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


def embed_one(spec: Any, enc: Encoder, job: Job, *, rank: int = 0, pbar_position: int = 1) -> Row:
    """Embed one slide to ``job.out_dir/<slide_id>.h5``; returns its manifest row ("done"), or
    raises :class:`SlideFailed` / a slide error for the caller to record."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    url, sid = str(spec.url), spec.slide_id
    final = job.out_dir / f"{sid}.h5"
    size, mtime = slide_stat(url, job.storage_options)
    slide, base_mpp, mpp_source = _open(url, getattr(spec, "mpp", None), job)
    with slide:
        if job.mpp < base_mpp * (1 - 1e-3):
            raise SlideFailed(
                f"{url}: level 0 is {base_mpp:.4g} µm/px, coarser than the requested {job.mpp} µm/px "
                f"(tiles are never upsampled); embed it at --mpp {base_mpp:.4g} or coarser"
            )
        mask = _mask(slide, spec, job)
        records = _grid(
            sid, slide, mask, base_mpp=base_mpp, mpp=job.mpp, tile=job.tile, min_tissue=job.min_tissue
        )
        if not records:
            raise SlideFailed(
                f"no tissue: no {job.tile}px tile at {job.mpp} µm/px has tissue fraction "
                f">= {job.min_tissue} (mask {mask.method}, {mask.area_fraction:.1%} of the "
                f"thumbnail); lower --min-tissue or check the slide"
            )
        level = slide.region_for_mpp((records[0].x, records[0].y), (job.tile, job.tile), job.mpp)[0]
        attrs = {
            **expected_attrs(job, enc, spec, size, mtime),
            "level": level,
            "tile_size_level0": int(round(records[0].size0)),
            "slidestream_version": __version__,
            "slide_id": sid,
            "slide_url": url,
            "slide_mpp": base_mpp,
            "mpp_source": mpp_source,
            "slide_width": slide.dimensions[0],
            "slide_height": slide.dimensions[1],
            "feature_dim": enc.dim,
            "n_grid_tiles": len(records),
        }
        if job.hash_slides:
            attrs["slide_sha256"] = slide_sha256(url, job.storage_options)
        size0 = attrs["tile_size_level0"]
        # CLAM draws coords with patch_size at patch_level; TRIDENT reads patch_size_level0
        writer = FeatureWriter(
            final,
            enc.dim,
            attrs,
            coords_attrs={
                "patch_size": size0,
                "patch_level": 0,
                "patch_size_level0": size0,
                "target_patch_size": job.tile,
            },
        )
        bar = tqdm(
            total=len(records),
            desc=sid[:30],
            unit="tile",
            leave=False,
            position=pbar_position,
            disable=not job.progress,
            dynamic_ncols=True,
        )
        try:
            done = 0
            with contextlib.closing(tile_batches(spec, records, mask, base_mpp, job, enc)) as batches:
                for b in batches:
                    writer.append(_forward(enc, b.x), b.coords)
                    bar.update(b.consumed - done)
                    done = b.consumed
            out_n = writer.n
            n_failed = len(records) - out_n
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
