"""``slidestream convert SRC DST.zarr``: write a slide as OME-Zarr (zarr v3, sharded).

Prints what it did: levels, how each was written (JPEG pass-through, re-encoded, generated),
bytes and seconds. Errors exit with code 2 and a one-line message.

The conversion runs in a worker process with a memory limit and a time limit
(:class:`pipelines.runtime.SlideWorker`; ``--no-isolation`` runs it in this process): a native
crash, a hang or runaway memory while reading the source is an error exit with a message naming
the file and the error class (``Crashed(SIGABRT)``, ``Timeout``, ``MemoryLimit``), and the
partial output is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="slide path or URL (http(s)://, s3://, memory://, file://)")
    parser.add_argument("dst", help="output OME-Zarr directory (local), e.g. slide.zarr")
    parser.add_argument(
        "--tile",
        type=int,
        default=256,
        help="chunk (tile) size in px (default 256); equal to the source's JPEG tile size, "
        "e.g. 240 for the demo slide, tiles are copied without re-encoding",
    )
    parser.add_argument(
        "--codec",
        choices=("jpeg", "zstd", "blosc", "none"),
        default="jpeg",
        help="chunk codec: jpeg (slidestream.jpeg, lossy), zstd/blosc/none (lossless)",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding (default 90)")
    parser.add_argument("--shard-tiles", type=int, default=16, help="tiles per shard side (default 16)")
    parser.add_argument(
        "--levels",
        type=lambda s: [float(v) for v in s.split(",")],
        default=None,
        help="comma-separated level downsamples, e.g. 1,4,16 (default: the source's "
        "levels, then 2x down to <= 1024 px)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--backend", default="auto", help="backend that reads SRC (auto, tiff, openslide, zarr)"
    )
    parser.add_argument("--mpp", type=float, default=None, help="µm/px of level 0 when the source lacks it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-isolation", action="store_true", help="convert in this process, not in a worker with limits"
    )
    parser.add_argument(
        "--worker-memory-gb", type=float, default=8.0, help="memory limit of the worker in GiB (default 8)"
    )
    parser.add_argument(
        "--timeout", type=float, default=24 * 3600.0, help="seconds the conversion may take (default 24 h)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _remove_partial(dst: str, pid: int | None) -> None:
    """The temporary output a worker killed mid-conversion left (``wsi.atomic`` names)."""
    import shutil

    d = Path(dst)
    if pid is None or not d.parent.is_dir():
        return
    for p in d.parent.glob(f".{d.name}.tmp-{pid}-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def main(args: argparse.Namespace) -> int:
    from wsi.convert import convert
    from wsi.errors import SlideError

    from ..runtime import IsolationConfig, SlideWorker, WorkerFailure

    kwargs = dict(
        tile=args.tile,
        codec=args.codec,
        quality=args.quality,
        shard_tiles=args.shard_tiles,
        levels=args.levels,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        backend=args.backend,
        mpp=args.mpp,
    )
    try:
        if args.no_isolation:
            out = convert(args.src, args.dst, **kwargs)
        else:
            limits = IsolationConfig(
                memory_gb=args.worker_memory_gb, slide_timeout_s=args.timeout, stall_timeout_s=args.timeout
            )
            with SlideWorker(limits.memory_gb, preload=("wsi.convert",)) as w:
                pid = None
                try:
                    w.call(int, 0, limits=limits)  # started: its pid names its temporary output
                    pid = w.pid
                    out = w.call(
                        convert, args.src, args.dst, what=args.src, url=args.src, limits=limits, **kwargs
                    )
                except WorkerFailure:
                    _remove_partial(args.dst, pid)
                    raise
    except (SlideError, OSError, ValueError) as e:
        cls = f" [{e.error_class}]" if isinstance(e, WorkerFailure) else ""
        print(f"slidestream convert: error{cls}: {e}", file=sys.stderr)
        return 2
    meta = json.loads((Path(out) / "zarr.json").read_text())["attributes"]["slidestream"]
    conv = meta["conversion"]
    if args.json:
        print(json.dumps({"dst": out, "codec": meta["codec"], "tile": meta["tile_size"], **conv}))
        return 0
    print(
        f"wrote {out}: {len(conv['levels'])} levels, codec {meta['codec']}, tile {meta['tile_size']}, "
        f"{conv['bytes'] / 1e6:.1f} MB in {conv['seconds']:.1f} s"
    )
    for lv in conv["levels"]:
        n = lv["passthrough_tiles"] + lv["reencoded_tiles"] + lv["generated_tiles"]
        how = {
            "passthrough": "JPEG pass-through (source tiles copied)",
            "reencoded": "decoded and re-encoded",
            "generated": "generated from the next finer level",
        }[lv["mode"]]
        if lv["mode"] == "passthrough" and lv["reencoded_tiles"]:
            how += f", {lv['reencoded_tiles']} tiles re-encoded"
        print(
            f"  level {lv['path']}: {lv['width']}x{lv['height']} (downsample {lv['downsample']:g}), "
            f"{n} tiles, {how}, {lv['seconds']:.2f} s"
        )
    return 0
