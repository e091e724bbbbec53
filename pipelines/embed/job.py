"""``slidestream embed``: batch inference over slide archives, one feature file per slide.

Per slide: tissue mask → grid tiles inside tissue → batched encoder forward
(``torch.inference_mode``; AMP and channels-last on GPU; the encoder's own mean/std) →
``DIR/<slide_id>.h5`` (layout in :mod:`wsi.io`: datasets ``features`` (N, D) float32 and
``coords`` (N, 2) int64 level-0 top-left x, y; attributes ``mpp``, ``tile_size_px``,
``tile_size_level0``, ``level``, ``encoder``, ``encoder_weights_sha256``, ``slidestream_version``,
``slide_url``, ``slide_size``, ``slide_mtime``, ``slide_sha256`` (with ``--hash-slides``),
``tissue_method``, ``min_tissue``, ``n_tiles``, ``complete``; for a foundation-model preset also
``encoder_preset``, ``encoder_hub_id``, ``encoder_hub_revision`` (the snapshot's commit),
``encoder_weights_file``, ``encoder_arch``, ``encoder_pooling``, ...; TRIDENT's and CLAM's
attribute names alongside, see :mod:`wsi.io`). Features are appended batch by batch
to a temporary file that is renamed only when the slide is complete.

``DIR/manifest.csv`` has one row per slide (see :mod:`pipelines.embed.manifest`). A rerun skips a
slide whose file validates (opens, ``complete``, row counts agree, attributes match this job:
encoder, weights hash, mpp, tile, tissue method, min_tissue, slide size and mtime); failed slides
are retried only with ``--retry-failed``; ``--overwrite`` redoes everything. A slide that cannot
be embedded (unopenable, too many unreadable tiles, no tissue, no mpp without ``--mpp-override``)
is recorded with its reason and error class and the job goes on; the exit code is 1 when any
slide failed.

Containment (:mod:`pipelines.runtime`, on unless ``--no-isolation``): each slide's reading — open,
tissue mask, tile decoding — runs in a worker process with a memory limit and time limits, while
the encoder stays in the job's process; a native crash, a hang or runaway memory fails that slide
(``Crashed(SIGABRT)``, ``Timeout``, ``MemoryLimit``, ...) and the job goes on with a new worker.
Each slide is marked in flight (``DIR/.inflight/embed/``) before its work starts, so a rerun after
the whole job died records the slide it was on as failed (``Interrupted``; ``--retry-failed`` tries
it again) instead of dying on it again.

Slide ids come from :func:`wsi.io.safe_slide_id` (also applied to ids given in a CSV), so no id
can write outside DIR; local names keep ``#``, ``?``, ``::`` and non-ASCII letters distinct. Two
slides whose names map to one id (``a b.svs`` and ``a_b.svs``) get distinct ids — the first by
URL keeps it, the other gets a suffix from its URL's hash — and the job says so; only two slides
*given* the same id in a CSV are refused.

Under ``torchrun`` slides are assigned to ranks greedily, largest file first, to the least loaded
rank (deterministic: rank 0 decides and broadcasts); each rank writes its own files and manifest
part; rank 0 merges the manifest after a barrier. A slide is always embedded whole by one rank with
the same batches, so its features do not depend on the number of ranks. Across nodes DIR must be a
shared POSIX filesystem (NFS, Lustre, a FUSE-mounted bucket): h5py writes local files, so fsspec
URLs are not accepted as DIR (slides themselves may be any fsspec URL).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi.io import safe_slide_id
from wsi.tissue import DEFAULT_METHOD

from ..errors import ConfigError
from ..runtime import INTERRUPTED, InFlight, IsolationConfig, error_class, interrupted_reason, maybe_isolated
from . import manifest
from .manifest import Row

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """Outcome of :func:`embed_slides`: this job's rows (all ranks) and the manifest path."""

    rows: list[Row]
    manifest: Path
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {s: sum(r.status == s for r in self.rows) for s in manifest.STATUSES}

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def n_tiles(self) -> int:
        return sum(r.n_tiles for r in self.rows if r.status == "done")

    def table(self) -> str:
        return (
            manifest.summary_table(self.rows) + f"\nwall time {self.seconds:.1f} s; manifest {self.manifest}"
        )


def assign_to_ranks(sizes: list[int | None], world_size: int) -> list[list[int]]:
    """Indices of slides per rank: largest first, each to the least loaded rank (ties: lowest
    rank; equal sizes keep input order). Unknown sizes count as 1 byte."""
    order = sorted(range(len(sizes)), key=lambda i: (-(sizes[i] or 1), i))
    load = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        out[r].append(i)
        load[r] += sizes[i] or 1
    return out


def _first_reason(reason: str) -> str:
    """The original failure reason of a slide that was carried over unretried (maybe many times)."""
    return reason.removeprefix("not retried: ").removesuffix(" (pass --retry-failed)")


def _check_out_dir(out: str | os.PathLike) -> Path:
    s = os.fspath(out)
    if "://" in s and not s.startswith("file://"):
        raise ConfigError(
            f"--out {s}: feature files are written with h5py to a local or shared POSIX "
            f"filesystem; mount the bucket (or use a shared filesystem) and pass its path"
        )
    if not s:
        raise ConfigError("--out DIR is required")
    return Path(s.removeprefix("file://"))


def resolve(slides: Any, storage_options: dict | None) -> list[Any]:
    """The slide specs of ``slides`` (anything :func:`wsi.loader.resolve_slides` takes) with
    file-name-safe, unique slide ids: ids given in a CSV are made file-name safe too, and ids that
    collide (``a b.svs`` and ``a_b.svs``) are made distinct deterministically and logged
    (:func:`wsi.loader.dedupe_slide_ids`), never a refusal of the whole job."""
    from dataclasses import replace

    from wsi.loader import dedupe_slide_ids, resolve_slides

    specs = resolve_slides(slides, storage_options=storage_options)
    # ids given in a CSV are user text: make them file-name safe too, then make them unique again
    specs = [
        s if safe_slide_id(s.slide_id) == s.slide_id else replace(s, slide_id=safe_slide_id(s.slide_id))
        for s in specs
    ]
    try:
        specs, renamed = dedupe_slide_ids(specs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for url, sid in renamed.items():
        log.warning("%s shares its slide id with another slide; it is embedded as %s.h5", url, sid)
    return specs


def _one_slide(
    spec: Any,
    stat: tuple[Any, Any],
    enc: Any,
    job: Any,
    prev: Row | None,
    marker: dict | None,
    *,
    journal: InFlight,
    worker: Any,
    isolation: IsolationConfig,
    rank: int,
    overwrite: bool,
    retry_failed: bool,
    stain: Any = None,
) -> Row:
    """One slide's row: skipped (valid file), carried over (failed before, not retried), failed
    because an earlier run died on it, or the outcome of embedding it now (marked in flight)."""
    from .worker import check_feature_file, clean_temp_files, embed_one, expected_attrs, failure_reason

    ts = time.perf_counter()
    clean_temp_files(job.out_dir, spec.slide_id)
    final = job.out_dir / f"{spec.slide_id}.h5"
    valid, why, n = (False, "", 0)
    if not overwrite and final.exists():
        valid, why, n = check_feature_file(final, expected_attrs(job, enc, spec, *stat))
    if valid:
        return Row(spec.slide_id, spec.url, "skipped", "already embedded (file validates)", n, 0.0, rank)
    if not (retry_failed or overwrite):
        if marker is not None:
            reason = interrupted_reason(marker, "rerun with --retry-failed to try it again")
            return Row(spec.slide_id, spec.url, "failed", reason, 0, 0.0, rank, error=INTERRUPTED)
        if prev is not None and prev.status == "failed":
            reason = f"not retried: {_first_reason(prev.reason)} (pass --retry-failed)"
            return Row(spec.slide_id, spec.url, "failed", reason, 0, 0.0, rank, error=prev.error)
    if why:
        log.info("%s: redoing %s: %s", spec.slide_id, final.name, why)
    journal.begin(spec.slide_id, spec.url)
    try:
        return embed_one(spec, enc, job, rank=rank, worker=worker, limits=isolation, stain=stain)
    except KeyboardInterrupt:
        journal.end(spec.slide_id)  # stopped on purpose: not a slide that takes the job down
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one slide is recorded, the job goes on
        log.debug("slide %s failed", spec.url, exc_info=True)
        secs = time.perf_counter() - ts
        return Row(spec.slide_id, spec.url, "failed", failure_reason(e), 0, secs, rank, error=error_class(e))


def _stain(spec: str | None) -> Any:
    """The fitted stain normaliser of ``spec`` (None without one); a bad spec is a ConfigError."""
    if not spec:
        return None
    from wsi.loader import stain_normalizer_from_spec

    try:
        return stain_normalizer_from_spec(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def embed_slides(
    slides: Any,
    encoder: Any,
    *,
    out: str | os.PathLike,
    mpp: float = 0.5,
    tile_size: int = 224,
    batch_size: int = 64,
    tissue_method: str = DEFAULT_METHOD,
    min_tissue: float = 0.4,
    overwrite: bool = False,
    retry_failed: bool = False,
    mpp_override: float | None = None,
    read_threads: int = 2,
    decode: str = "cpu",
    scaled_decode: bool = False,
    device: str = "auto",
    hash_slides: bool = False,
    max_failed_tiles: float = 0.05,
    progress: bool = True,
    storage_options: dict | None = None,
    dist_timeout_s: int = 7 * 24 * 3600,
    isolation: IsolationConfig | dict | None = None,
    stain_norm: str | None = None,
) -> Summary:
    """Embed ``slides`` (anything :func:`wsi.loader.resolve_slides` takes) with
    ``encoder`` (timm name, ``.safetensors`` path from pretraining, ``name=weights``, a preset
    such as ``uni`` or ``hf-hub:ORG/NAME``, or an ``nn.Module``; :func:`models.encoders.load_encoder`) into
    ``out/<slide_id>.h5`` plus ``out/manifest.csv``. Runs as one process or under ``torchrun``.
    ``isolation`` (an :class:`pipelines.runtime.IsolationConfig` or its dict) sets how slides are
    contained (default: a worker process per rank with the default limits). ``stain_norm``
    (``macenko:TARGET`` / ``reinhard:TARGET``, :mod:`wsi.loader.stain`) normalises each batch on the
    encoder's device before the encoder; feature files record it. Returns a
    :class:`Summary`; failed slides do not raise (check ``summary.ok``)."""
    import torch
    from tqdm import tqdm

    from models.encoders import load_encoder

    from .. import training as dist
    from .worker import Job, slide_stat

    t0 = time.perf_counter()
    if not 0 <= max_failed_tiles < 1:
        raise ConfigError(
            f"max_failed_tiles is a fraction of a slide's tiles in [0, 1), got {max_failed_tiles}"
        )
    if decode not in ("cpu", "gpu"):
        raise ConfigError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
    if tile_size <= 0 or batch_size <= 0 or not mpp > 0:
        raise ConfigError(
            f"tile_size ({tile_size}), batch_size ({batch_size}) and mpp ({mpp}) must be positive"
        )
    out_dir = _check_out_dir(out)
    stain = _stain(stain_norm)
    if not isinstance(isolation, IsolationConfig):
        isolation = IsolationConfig(**(isolation or {}))
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = dist.init_distributed(device, timeout_s=dist_timeout_s)
    try:
        specs = resolve(slides, storage_options)
        out_dir.mkdir(parents=True, exist_ok=True)
        root = out_dir.resolve()
        for s in specs:  # belt and braces: safe_slide_id already guarantees this
            if (root / f"{s.slide_id}.h5").resolve().parent != root:
                raise ValueError(f"slide id {s.slide_id!r} would write outside {root}")
        # rank 0 decides the run id and the assignment; everyone gets the same answer
        if info.is_main:
            stats = [slide_stat(s.url, storage_options) for s in specs]
            plan = (uuid.uuid4().hex[:12], stats, assign_to_ranks([st[0] for st in stats], info.world_size))
        else:
            plan = None
        run, stats, assignment = dist.all_gather_objects(plan)[0]
        before = manifest.previous_rows(out_dir)  # read by every rank before anyone writes a part
        journal = InFlight(out_dir, "embed")
        in_flight = journal.stale()  # slides an earlier run was on when it died
        dist.barrier()
        if info.device.type == "cuda":  # the same kernels every run: features do not depend on the run
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        enc = load_encoder(encoder, info.device)
        if decode == "gpu" and enc.device.type != "cuda":
            raise ConfigError(
                f"decode=gpu decodes tiles on the encoder's CUDA device, but it runs on {enc.device}; "
                f"use decode=cpu or device=cuda"
            )
        if enc.mpp is not None and abs(enc.mpp - mpp) > 0.1 * enc.mpp:
            log.warning("encoder %s was trained at %g µm/px; embedding at %g µm/px", enc.name, enc.mpp, mpp)
        job = Job(
            out_dir=out_dir,
            mpp=mpp,
            tile_size=tile_size,
            batch_size=batch_size,
            tissue_method=tissue_method,
            min_tissue=min_tissue,
            mpp_override=mpp_override,
            read_threads=read_threads,
            decode=decode,
            scaled_decode=scaled_decode,
            hash_slides=hash_slides,
            max_failed_tiles=max_failed_tiles,
            progress=progress and info.is_main,
            storage_options=storage_options,
            stain_norm=stain_norm or None,
        )
        if stain is not None:
            stain = stain.to(info.device)
        mine = assignment[info.rank]
        part = manifest.part_path(out_dir, run, info.rank)
        rows: list[Row] = []
        bar = tqdm(
            total=len(mine),
            desc=f"embed rank {info.rank}" if info.distributed else "embed",
            unit="slide",
            disable=not job.progress,
            position=0,
            dynamic_ncols=True,
        )
        with maybe_isolated(isolation, preload=("pipelines.embed.worker",)) as worker:
            for i in mine:
                spec = specs[i]
                row = _one_slide(
                    spec, stats[i], enc, job, before.get(spec.slide_id), in_flight.get(spec.slide_id),
                    journal=journal, worker=worker, isolation=isolation, rank=info.rank, stain=stain,
                    overwrite=overwrite, retry_failed=retry_failed,
                )  # fmt: skip
                rows.append(row)
                manifest.write_rows(part, rows)
                journal.end(spec.slide_id)  # the outcome is recorded
                bar.update(1)
                bar.set_postfix(failed=sum(r.status == "failed" for r in rows))
        bar.close()
        dist.barrier()
        everyone = [r for rs in dist.all_gather_objects(rows) for r in rs]
        if info.is_main:
            manifest.merge(out_dir, before, everyone)
            journal.tidy()
        dist.barrier()
        by_id = {r.slide_id: r for r in everyone}
        return Summary(
            [by_id[s.slide_id] for s in specs], out_dir / manifest.MANIFEST, time.perf_counter() - t0
        )
    finally:
        if owns_group:
            dist.cleanup()
