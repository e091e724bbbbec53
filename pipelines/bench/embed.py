"""``slidestream bench embed``: slides/hour and tiles/s of ``slidestream embed`` against the
encoder-only rate on tensors already in memory (same encoder, batch and tile size, same run).

The ratio pipeline/encoder-only is the pipeline's efficiency: 1.0 means reading, tissue masking,
resizing and writing cost nothing beyond the forward passes. ``slide_setup_s`` (open, tissue mask,
grid; measured separately) and the ratio without it show how much of the gap is per-slide set-up,
which dominates on small slides. The read-only rate (tiles read,
resized and normalised, no encoder) is printed too, to tell which side bounds the pipeline.

The archive, unless ``--slides`` is given, is the shipped demo slide plus slides written here from
its real pixels (tiled JPEG TIFF pyramids, 2 levels, mpp 0.5).

Rows per decode (``--decode``; default ``cpu``, plus ``gpu`` when a CUDA device is present: the
encoded tiles decoded in batches by nvJPEG on the encoder's device): the read-only rate with its
CPU ms/tile (process tree) and decoded pixels per delivered pixel, and the pipeline's slides/hour
and tiles/s with CPU ms/tile and RSS at start and end. Every row states its decode resources:
``read_threads`` threads in the one embedding process (P×T = 1 × ``--read-threads``) and torch's
intra-op threads for the encoder. Without a CUDA device the GPU rows are not measured and the
report says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi.data import DEMO_SLIDE

from .resources import load_avg, measure

DEMO = DEMO_SLIDE  # the shipped CC0 slide (package data: found from an installed package too)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--slides", help="slides to embed (default: demo slide + 3 generated from its pixels)"
    )
    parser.add_argument("--encoder", default="resnet18", help="timm name or .safetensors (default resnet18)")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--read-threads", type=int, default=2, help="decode threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--decode",
        default="auto",
        help="comma-separated cpu,gpu (default: cpu, and gpu when CUDA is present)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _archive(d: Path) -> Path:
    import tifffile

    from wsi.slide import open_slide

    src = d / "slides"
    src.mkdir()
    (src / DEMO.name).symlink_to(DEMO)
    with open_slide(DEMO) as s:
        for i, (x, y) in enumerate([(600, 600), (1000, 1600), (300, 1900)]):
            img = s.read_region((x, y), 0, (1024, 1024))
            desc = "Aperio Image Library v12.0.15\r\n1024x1024 (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5"
            with tifffile.TiffWriter(src / f"gen{i}.svs") as t:
                t.write(
                    img,
                    tile=(256, 256),
                    compression="jpeg",
                    photometric="rgb",
                    description=desc,
                    subfiletype=0,
                )
                t.write(
                    np.ascontiguousarray(img[::4, ::4]),
                    tile=(256, 256),
                    compression="jpeg",
                    photometric="rgb",
                    subfiletype=1,
                )
    return src


def _encoder_only(encoder, batch: int, tile: int, n_batches: int) -> float:
    import torch

    x = torch.randn(batch, 3, tile, tile)
    encoder.forward(x)  # warm-up
    t = time.perf_counter()
    for _ in range(n_batches):
        encoder.forward(x)
    return n_batches * batch / (time.perf_counter() - t)


def _read_only(specs, encoder, job) -> tuple[float, float, dict]:
    """(tiles/s of the embedding's read path alone: read, resize, normalise, no encoder;
    seconds of per-slide set-up: open, tissue mask, grid; summed read counters)."""
    from pipelines.embed import grid, open_with_mpp, slide_mask, tile_batches

    n, secs, setup = 0, 0.0, 0.0
    totals = {"delivered_px": 0, "decoded_px": 0, "cpu_s": 0.0}
    for spec in specs:
        t = time.perf_counter()
        slide, base, _ = open_with_mpp(spec.url, spec.mpp, job)
        with slide:
            mask = slide_mask(slide, spec, job.tissue_method)
            records = grid(
                spec.slide_id,
                slide,
                mask,
                base_mpp=base,
                mpp=job.mpp,
                tile_size=job.tile_size,
                min_tissue=job.min_tissue,
            )
        setup += time.perf_counter() - t
        if not records:
            continue
        last = None
        with measure() as w:
            for b in tile_batches(spec, len(records), mask, base, job, encoder):
                n += len(b.x)
                last = b.read_stats
        secs += w.wall_s
        totals["cpu_s"] += w.cpu_s
        if last:
            totals["delivered_px"] += last["delivered_px"]
            totals["decoded_px"] += last["decoded_px"] or 0
    totals["tiles"] = n
    return (n / secs if secs else float("nan")), setup, totals


def main(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from models.encoders import load_encoder
    from pipelines.embed import Job, embed_slides, resolve

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cuda = device.type == "cuda"
    decodes = (["cpu", "gpu"] if cuda else ["cpu"]) if args.decode == "auto" else args.decode.split(",")
    if any(d not in ("cpu", "gpu") for d in decodes) or ("gpu" in decodes and not cuda):
        print("error: --decode takes cpu and gpu; gpu needs a CUDA device (--device cuda)", file=sys.stderr)
        return 2
    rows = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="slidestream-bench-embed-") as tmp:
        tmp = Path(tmp)
        slides = args.slides or _archive(tmp)
        specs = resolve(slides, None)
        enc = load_encoder(args.encoder, device)
        base_job = Job(
            out_dir=tmp / "out",
            mpp=args.mpp,
            tile_size=args.tile_size,
            batch_size=args.batch_size,
            tissue_method="otsu",
            min_tissue=0.4,
            mpp_override=None,
            read_threads=args.read_threads,
            hash_slides=False,
            max_failed_tiles=0.05,
            progress=False,
        )
        n_batches = 6
        enc_before = _encoder_only(enc, args.batch_size, args.tile_size, n_batches)
        for dec in decodes:
            job = dataclasses.replace(base_job, decode=dec, out_dir=tmp / f"out-{dec}")
            read_rate, setup_s, reads = _read_only(specs, enc, job)
            with measure() as w:
                summary = embed_slides(
                    specs,
                    args.encoder,
                    out=job.out_dir,
                    mpp=args.mpp,
                    tile_size=args.tile_size,
                    batch_size=args.batch_size,
                    read_threads=args.read_threads,
                    decode=dec,
                    device=args.device,
                    progress=not args.json,
                )
            ok = ok and summary.ok
            rows.append(_row(dec, summary, w, read_rate, setup_s, reads, args))
        # before and after the pipeline runs, averaged: the machine's load drifts
        enc_rate = (enc_before + _encoder_only(enc, args.batch_size, args.tile_size, n_batches)) / 2
    for r in rows:
        r["encoder_only_tiles_per_s"] = round(enc_rate, 1)
        if r["slide_s"]:
            r["pipeline_over_encoder_only"] = round(r["tiles"] / r["slide_s"] / enc_rate, 3)
            if r["slide_s"] > r["slide_setup_s"]:
                r["pipeline_over_encoder_only_excl_setup"] = round(
                    r["tiles"] / (r["slide_s"] - r["slide_setup_s"]) / enc_rate, 3
                )
    cpu_row = rows[0]
    result = {
        "encoder": enc.name,
        "device": str(device),
        "mpp": args.mpp,
        "tile_size": args.tile_size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "read_threads": args.read_threads,
        "load_avg": round(load_avg(), 2),
        **{k: v for k, v in cpu_row.items() if k != "decode"},
        "rows": rows,
        "gpu_decode": "measured"
        if "gpu" in decodes
        else "not measured: no CUDA device"
        if not cuda
        else "not asked",
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k in (
            "encoder",
            "device",
            "mpp",
            "tile_size",
            "batch_size",
            "threads",
            "read_threads",
            "load_avg",
        ):
            print(f"{k:<14}  {result[k]}")
        keys = [k for k in rows[0] if k != "decode"]
        w = max(len(k) for k in keys)
        print(f"{'':<{w}}  " + "  ".join(f"{'decode=' + r['decode']:>14}" for r in rows))
        for k in keys:
            print(f"{k:<{w}}  " + "  ".join(f"{_fmt(r.get(k)):>14}" for r in rows))
        print(f"gpu decode: {result['gpu_decode']}")
        print(
            "pipeline_tiles_per_s counts per-slide time (open, tissue mask, read, forward, write); "
            "_wall adds job start-up (encoder load, listing)",
            file=sys.stderr,
        )
    return 0 if ok else 1


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def _row(dec: str, summary, w, read_rate: float, setup_s: float, reads: dict, args) -> dict:
    n_tiles = summary.n_tiles
    done = summary.counts["done"]
    wall = w.wall_s
    slide_secs = sum(r.seconds for r in summary.rows if r.status == "done")
    dlv = reads["delivered_px"]
    return {
        "decode": dec,
        "procs_x_threads": f"1x{args.read_threads}",
        "slides": done,
        "failed": summary.counts["failed"],
        "tiles": n_tiles,
        "wall_s": round(wall, 2),
        "slide_s": round(slide_secs, 2),
        "slides_per_hour": round(done / wall * 3600, 1) if wall else None,
        "pipeline_tiles_per_s": round(n_tiles / slide_secs, 1) if slide_secs else None,
        "pipeline_tiles_per_s_wall": round(n_tiles / wall, 1) if wall else None,
        "pipeline_cpu_ms_per_tile": round(1e3 * w.cpu_s / n_tiles, 2) if n_tiles else None,
        "read_only_tiles_per_s": round(read_rate, 1),
        "read_only_cpu_ms_per_tile": round(1e3 * reads["cpu_s"] / reads["tiles"], 2)
        if reads["tiles"]
        else None,
        "decoded_per_delivered": round(reads["decoded_px"] / dlv, 3) if dlv else None,
        "slide_setup_s": round(setup_s, 2),
        "rss_start_mb": round(w.rss_start_mb, 1),
        "rss_end_mb": round(w.rss_end_mb, 1),
    }
