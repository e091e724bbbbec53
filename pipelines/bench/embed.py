"""``slidestream bench embed``: slides/hour and tiles/s of ``slidestream embed`` against the
encoder-only rate on tensors already in memory (same encoder, batch and tile size, same run).

The ratio pipeline/encoder-only is the pipeline's efficiency: 1.0 means reading, tissue masking,
resizing and writing cost nothing beyond the forward passes. ``slide_setup_s`` (open, tissue mask,
grid; measured separately) and the ratio without it show how much of the gap is per-slide set-up,
which dominates on small slides. The read-only rate (tiles read,
resized and normalised, no encoder) is printed too, to tell which side bounds the pipeline.

The archive, unless ``--slides`` is given, is the shipped demo slide plus slides written here from
its real pixels (tiled JPEG TIFF pyramids, 2 levels, mpp 0.5).
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


def _read_only(specs, encoder, job) -> tuple[float, float]:
    """(tiles/s of the embedding's read path alone: read, resize, normalise, no encoder;
    seconds of per-slide set-up: open, tissue mask, grid)."""
    from pipelines.embed import grid, open_with_mpp, slide_mask, tile_batches

    n, secs, setup = 0, 0.0, 0.0
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
        t = time.perf_counter()
        for b in tile_batches(spec, len(records), mask, base, job, encoder):
            n += len(b.x)
        secs += time.perf_counter() - t
    return (n / secs if secs else float("nan")), setup


def main(args: argparse.Namespace) -> int:
    import torch

    from models.encoders import load_encoder
    from pipelines.embed import Job, embed_slides, resolve

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    with tempfile.TemporaryDirectory(prefix="slidestream-bench-embed-") as tmp:
        tmp = Path(tmp)
        slides = args.slides or _archive(tmp)
        specs = resolve(slides, None)
        enc = load_encoder(args.encoder, device)
        job = Job(
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
        read_rate, setup_s = _read_only(specs, enc, job)
        n_batches = 6
        enc_before = _encoder_only(enc, args.batch_size, args.tile_size, n_batches)
        t = time.perf_counter()
        summary = embed_slides(
            specs,
            args.encoder,
            out=tmp / "out",
            mpp=args.mpp,
            tile_size=args.tile_size,
            batch_size=args.batch_size,
            read_threads=args.read_threads,
            device=args.device,
            progress=not args.json,
        )
        wall = time.perf_counter() - t
        n_tiles = summary.n_tiles
        done = summary.counts["done"]
        # before and after the pipeline run, averaged: the machine's load drifts
        enc_rate = (enc_before + _encoder_only(enc, args.batch_size, args.tile_size, n_batches)) / 2
    slide_secs = sum(r.seconds for r in summary.rows if r.status == "done")
    result = {
        "encoder": enc.name,
        "device": str(device),
        "mpp": args.mpp,
        "tile_size": args.tile_size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "slides": done,
        "failed": summary.counts["failed"],
        "tiles": n_tiles,
        "wall_s": round(wall, 2),
        "slide_s": round(slide_secs, 2),
        "slides_per_hour": round(done / wall * 3600, 1) if wall else None,
        "pipeline_tiles_per_s": round(n_tiles / slide_secs, 1) if slide_secs else None,
        "pipeline_tiles_per_s_wall": round(n_tiles / wall, 1) if wall else None,
        "encoder_only_tiles_per_s": round(enc_rate, 1),
        "read_only_tiles_per_s": round(read_rate, 1),
        "pipeline_over_encoder_only": round(n_tiles / slide_secs / enc_rate, 3) if slide_secs else None,
        "slide_setup_s": round(setup_s, 2),
        "pipeline_over_encoder_only_excl_setup": (
            round(n_tiles / (slide_secs - setup_s) / enc_rate, 3) if slide_secs > setup_s else None
        ),
    }
    if args.json:
        print(json.dumps(result))
    else:
        w = max(len(k) for k in result)
        for k, v in result.items():
            print(f"{k:<{w}}  {v}")
        print(
            "pipeline_tiles_per_s counts per-slide time (open, tissue mask, read, forward, write); "
            "_wall adds job start-up (encoder load, listing)",
            file=sys.stderr,
        )
    return 0 if summary.ok else 1
