"""``slidestream bench tissue``: tissue-mask quality, U-Net vs Otsu.

1. Real slides (the demo slide, and ``--extra-slides`` when given): the thumbnail masks of the
   U-Net and of Otsu scored by IoU against a reference mask made from the slide's full-resolution
   pixels (:func:`pipelines.tasks.reference_tissue_mask`: stain optical density against the
   glass colour, morphology in µm; checked by eye, ``--overlays DIR`` draws the three contours).
   Target: U-Net IoU ≥ 0.9 on every slide.
2. Composited thumbnails (:mod:`wsi.tissue.synth`, held-out seed and held-out tissue pieces, exact
   labels): IoU of the U-Net mask and of the Otsu mask, overall and on the pen-mark subset (every
   second composite carries pen marks, the others none). These come from the generator the U-Net
   was trained on, so they test the pen marks the real slides lack, not generalisation. Targets:
   U-Net IoU ≥ 0.95; on the pen subset U-Net ≥ Otsu + 0.10.
3. CPU seconds per thumbnail for both methods (the U-Net on a 1024-px thumbnail).

The baseline (Otsu) is measured in the same run. ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np

#: real slides whose reference mask covers less of the thumbnail than this are reported, not scored
MIN_REFERENCE_FRACTION = 0.005


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=40, help="held-out composites")
    parser.add_argument(
        "--extra-slides",
        type=Path,
        nargs="*",
        default=[],
        help="more real slides: tissue source for composites and real thumbnails for the agreement check "
        "(the shipped weights used histolab/tcga-cr-7395-01a-01-ts1.svs and histolab/kidney-48-5.tif)",
    )
    parser.add_argument("--seed", type=int, default=1000, help="seed of the held-out composites")
    parser.add_argument("--size", type=int, default=512, help="side of each composite (px)")
    parser.add_argument(
        "--thumbnail-size", type=int, default=1024, help="long side of the real slides' thumbnails"
    )
    parser.add_argument(
        "--weights", type=Path, default=None, help="U-Net weights (default: the shipped ones)"
    )
    parser.add_argument(
        "--assume-mpp",
        type=float,
        default=None,
        help="level-0 µm/px for real slides that do not record it (their reference mask needs it; "
        "without it they are skipped)",
    )
    parser.add_argument(
        "--overlays", type=Path, default=None, help="write reference/U-Net/Otsu contour PNGs here"
    )


def main(args: argparse.Namespace) -> int:
    result = run(
        n=args.n,
        seed=args.seed,
        size=args.size,
        thumbnail_size=args.thumbnail_size,
        weights=args.weights,
        extra_slides=args.extra_slides,
        assume_mpp=args.assume_mpp,
        overlays=args.overlays,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0


def run(
    *,
    n: int = 40,
    seed: int = 1000,
    size: int = 512,
    thumbnail_size: int = 1024,
    weights: str | Path | None = None,
    extra_slides: list[str | Path] = (),
    assume_mpp: float | None = None,
    overlays: str | Path | None = None,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    from models.seg import tissue_net
    from pipelines.tasks import downsample_mask, reference_tissue_mask
    from pipelines.tissue import iou
    from wsi.tissue import otsu_mask, unet_mask
    from wsi.tissue import synth as tissue_synth

    sources = tissue_synth.load_sources(tissue_synth.default_source_paths(extra_slides))
    unet_mask(np.full((64, 64, 3), 240, np.uint8), weights=weights)  # load + warm up once
    rows = []
    pairs = tissue_synth.make_set(sources, seed, n, size=(size, size), split="heldout", pen_every=2)
    for rgb, label, info in tqdm(pairs, desc="held-out composites", disable=not progress, file=sys.stderr):
        u = unet_mask(rgb, weights=weights)
        o = otsu_mask(rgb)
        rows.append({"pen": bool(info["pen"]), "unet": iou(u, label), "otsu": iou(o, label)})

    def summary(sel):
        sel = list(sel)
        return {
            "n": len(sel),
            "unet_iou": _r(np.mean([r["unet"] for r in sel])) if sel else None,
            "otsu_iou": _r(np.mean([r["otsu"] for r in sel])) if sel else None,
        }

    held = {
        "all": summary(rows),
        "pen": summary(r for r in rows if r["pen"]),
        "no_pen": summary(r for r in rows if not r["pen"]),
        "seed": seed,
        "size": size,
    }

    real = []
    t_unet, t_otsu = [], []
    for path in tissue_synth.default_source_paths(extra_slides):
        thumb = tissue_synth.read_thumbnail(str(path), thumbnail_size)
        if thumb is None:
            real.append({"slide": path.name, "error": "unreadable in this build"})
            continue
        t0 = time.perf_counter()
        u = unet_mask(thumb, weights=weights)
        t1 = time.perf_counter()
        o = otsu_mask(thumb)
        t2 = time.perf_counter()
        t_unet.append(t1 - t0)
        t_otsu.append(t2 - t1)
        row = {
            "slide": path.name,
            "thumbnail": list(thumb.shape[1::-1]),
            "unet_fraction": _r(u.mean()),
            "otsu_fraction": _r(o.mean()),
            "unet_seconds": _r(t1 - t0),
            "otsu_seconds": _r(t2 - t1),
        }
        try:
            ref_full, _ = reference_tissue_mask(path, mpp=assume_mpp)
        except ValueError as e:
            row["error"] = f"no reference: {e}"
            real.append(row)
            continue
        ref = downsample_mask(ref_full, u.shape)
        if ref.mean() < MIN_REFERENCE_FRACTION:  # IoU against (almost) nothing measures nothing
            row["error"] = (
                f"not scored: the reference mask holds {ref.mean():.2%} tissue (under "
                f"{MIN_REFERENCE_FRACTION:.1%}; a wrong --assume-mpp drops small tissue as specks)"
            )
            real.append(row)
            continue
        row.update(reference_fraction=_r(ref.mean()), unet_iou=_r(iou(u, ref)), otsu_iou=_r(iou(o, ref)))
        real.append(row)
        if overlays is not None:
            _overlay(Path(overlays) / f"{path.stem}_tissue.png", thumb, ref, u, o)
    pen = held["pen"]
    targets = {
        "heldout_unet_iou>=0.95": bool(
            held["all"]["unet_iou"] is not None and held["all"]["unet_iou"] >= 0.95
        ),
        "pen_unet_minus_otsu>=0.10": bool(pen["n"] and pen["unet_iou"] - pen["otsu_iou"] >= 0.10),
        "real_unet_iou>=0.9": bool(
            any("unet_iou" in r for r in real) and all(r["unet_iou"] >= 0.9 for r in real if "unet_iou" in r)
        ),
        "unet_cpu_seconds<1": bool(t_unet and float(np.median(t_unet)) < 1.0),
    }
    return {
        "bench": "tissue",
        "heldout": held,
        "real": real,
        "unet_seconds_per_thumbnail": _r(float(np.median(t_unet))) if t_unet else None,
        "otsu_seconds_per_thumbnail": _r(float(np.median(t_otsu))) if t_otsu else None,
        # the U-Net runs with predict_proba's default thread count (1)
        "torch_threads": inspect.signature(tissue_net.predict_proba).parameters["threads"].default,
        "targets": targets,
    }


def _r(x: float) -> float:
    return round(float(x), 4)


def _overlay(path: Path, thumb: np.ndarray, ref: np.ndarray, unet: np.ndarray, otsu: np.ndarray) -> None:
    """Contours over the thumbnail: reference green, U-Net red, Otsu blue."""
    from PIL import Image
    from scipy import ndimage as ndi

    from wsi.atomic import atomic_path

    out = thumb.copy()
    for m, colour in ((otsu, (0, 0, 255)), (unet, (255, 0, 0)), (ref, (0, 190, 0))):
        out[m ^ ndi.binary_erosion(m)] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(out).save(tmp, format="PNG")


def _print(r: dict) -> None:
    h = r["heldout"]
    print(f"held-out composites (seed {h['seed']}, {h['size']} px): IoU vs exact labels")
    print(f"  {'subset':<8} {'n':>3} {'U-Net':>7} {'Otsu':>7} {'U-Net - Otsu':>13}")
    for k in ("all", "pen", "no_pen"):
        s = h[k]
        if s["n"]:
            print(
                f"  {k:<8} {s['n']:>3} {s['unet_iou']:>7.4f} {s['otsu_iou']:>7.4f} {s['unet_iou'] - s['otsu_iou']:>+13.4f}"
            )
    print("real slides: IoU against the full-resolution reference mask")
    for s in r["real"]:
        if "unet_iou" not in s:
            print(f"  {s['slide']}: {s['error']}")
        else:
            print(
                f"  {s['slide']:<34} U-Net {s['unet_iou']:.4f}  Otsu {s['otsu_iou']:.4f}  tissue: reference "
                f"{s['reference_fraction']:.3f} U-Net {s['unet_fraction']:.3f} Otsu {s['otsu_fraction']:.3f}"
            )
    print(
        f"U-Net {r['unet_seconds_per_thumbnail']} s/thumbnail vs Otsu {r['otsu_seconds_per_thumbnail']} s "
        f"(ratio {r['unet_seconds_per_thumbnail'] / max(r['otsu_seconds_per_thumbnail'], 1e-9):.1f}x, "
        f"{r['torch_threads']} torch threads)"
    )
    for k, v in r["targets"].items():
        print(f"  target {k}: {'met' if v else 'NOT met'}")
