"""``slidestream bench isolation``: what containment costs. ``slidestream embed`` over a clean archive
with each slide read in a worker process (the default: memory and time limits, crashes contained;
the encoder stays in the job's process) against the same job with ``--no-isolation`` (everything in
one process), in the same run: slides/hour of each and their ratio (target: within 5 %).

The two modes alternate, ``--repeats`` times each (the order flips every round, so a drift in the
machine's load hits both); a first round of each is a warm-up and is not counted (imports, encoder
set-up, the worker's start). The worker's start is measured on its own and printed: a job pays it
once (and again after each slide that kills its worker). The features of both modes are compared:
they must be identical, bit for bit.

The archive, unless ``--slides`` is given, is ``--n-slides`` tiled JPEG pyramids written from the
real pixels of the shipped demo slide (``--size`` px square, mpp 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi.data import DEMO_SLIDE as DEMO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slides", help="a clean archive to embed (default: generated from the demo slide)")
    parser.add_argument("--n-slides", type=int, default=6, help="generated slides (default 6)")
    parser.add_argument(
        "--size", type=int, default=2048, help="side of a generated slide in px (default 2048)"
    )
    parser.add_argument("--encoder", default="resnet18", help="timm name or .safetensors (default resnet18)")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--read-threads", type=int, default=2, help="decode threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _archive(d: Path, n: int, size: int) -> Path:
    from wsi.slide import open_slide
    from wsi.synth import mirror_tile, write_tiff_pyramid

    d.mkdir(parents=True)
    with open_slide(DEMO) as s:
        level0 = s.read_region((0, 0), 0, s.dimensions)
    for i in range(n):
        y, x = 600 + 97 * (i % 8), 300 + 61 * (i % 8)  # crops of the tissue, each a little elsewhere
        px = mirror_tile(level0[y : y + 1400, x : x + 1400], (size, size))
        write_tiff_pyramid(d / f"clean{i}.svs", px, tile=256, downsamples=(1, 4), mpp=0.5)
    return d


def _features(out: Path) -> dict[str, np.ndarray]:
    import h5py

    feats = {}
    for p in sorted(out.glob("*.h5")):
        with h5py.File(p, "r") as f:
            feats[p.stem] = f["features"][()]
    return feats


def main(args: argparse.Namespace) -> int:
    import torch

    from pipelines.embed import embed_slides, resolve
    from pipelines.runtime import SlideWorker, close_idle_workers

    with tempfile.TemporaryDirectory(prefix="slidestream-bench-isolation-") as tmp:
        tmp = Path(tmp)
        slides = args.slides or _archive(tmp / "slides", args.n_slides, args.size)
        specs = resolve(slides, None)
        kw = dict(
            mpp=args.mpp,
            tile_size=args.tile_size,
            batch_size=args.batch_size,
            read_threads=args.read_threads,
            device=args.device,
            progress=False,
        )
        close_idle_workers()
        t = time.perf_counter()
        with SlideWorker(preload=("pipelines.embed.worker",), echo=False) as w:
            w.call(int, 0)
        start_s = time.perf_counter() - t

        def run(isolated: bool, out: Path) -> tuple[float, int]:
            t0 = time.perf_counter()
            summary = embed_slides(specs, args.encoder, out=out, isolation={"enabled": isolated}, **kw)
            wall = time.perf_counter() - t0
            if not summary.ok:
                print(summary.table(), file=sys.stderr)
                raise SystemExit("the clean archive had failed slides; the comparison would mean nothing")
            return wall, summary.n_tiles

        walls: dict[bool, list[float]] = {True: [], False: []}
        tiles = {}
        for r in range(args.repeats + 1):
            for isolated in (True, False) if r % 2 == 0 else (False, True):
                wall, n = run(isolated, tmp / f"out-{isolated}-{r}")
                tiles[isolated] = n
                if r > 0:  # round 0 warms up both modes
                    walls[isolated].append(wall)
        identical = all(
            np.array_equal(a, _features(tmp / "out-False-0")[k])
            for k, a in _features(tmp / "out-True-0").items()
        )
    rate = {m: len(specs) / statistics.median(w) * 3600 for m, w in walls.items()}
    result = {
        "slides": len(specs),
        "tiles_per_job": tiles[True],
        "encoder": args.encoder,
        "device": ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "isolated_wall_s": [round(w, 2) for w in walls[True]],
        "in_process_wall_s": [round(w, 2) for w in walls[False]],
        "isolated_slides_per_hour": round(rate[True], 1),
        "in_process_slides_per_hour": round(rate[False], 1),
        "isolated_over_in_process": round(rate[True] / rate[False], 3),
        "worker_start_s": round(start_s, 2),
        "features_identical": identical,
    }
    if args.json:
        print(json.dumps(result))
    else:
        w = max(len(k) for k in result)
        for k, v in result.items():
            print(f"{k:<{w}}  {v}")
    return 0 if identical else 1
