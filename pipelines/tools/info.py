"""``slidestream info SLIDE``: levels, dimensions, downsamples, µm/px, tile sizes, vendor, backend
and associated images of a slide (local path or URL). ``--json`` prints one JSON object."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "slide", help="slide path or URL (file://, http(s)://, s3://, memory://, or a .zarr store)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--backend", default="auto", help="auto (default), tiff, zarr or openslide")
    p.add_argument("--mpp", type=float, default=None, help="µm/px at level 0, for slides without it")
    p.add_argument("--properties", action="store_true", help="also list all properties")


def describe(slide) -> dict:
    """The facts ``info`` prints, as a JSON-ready dict."""
    levels = []
    tiles = slide.level_tile_sizes
    for i, (dims, ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
        levels.append(
            {
                "level": i,
                "width": int(dims[0]),
                "height": int(dims[1]),
                "downsample": float(ds),
                "mpp": float(slide.mpp * ds) if slide.mpp is not None else None,
                "tile": list(tiles[i]) if tiles is not None else None,
            }
        )
    # sizes from metadata: nothing is decoded (a label declaring 50000x50000 costs nothing here)
    assoc = {name: [int(w), int(h)] for name, (w, h) in slide.associated_image_sizes.items()}
    return {
        "url": slide.url,
        "backend": slide.backend,
        "vendor": slide.vendor,
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "mpp": slide.mpp,
        "objective_power": slide.properties.get("openslide.objective-power"),
        "levels": levels,
        "associated_images": assoc,
    }


def main(args: argparse.Namespace) -> int:
    import wsi

    try:
        with wsi.open_slide(args.slide, backend=args.backend, mpp=args.mpp) as slide:
            info = describe(slide)
            if args.properties:
                info["properties"] = dict(slide.properties)
    except (wsi.SlideError, FileNotFoundError, ValueError) as e:
        print(f"slidestream info: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
        return 0
    mpp = f"{info['mpp']:.4g} µm/px" if info["mpp"] is not None else "unknown (pass --mpp)"
    print(f"slide:    {info['url']}")
    print(f"backend:  {info['backend']}    vendor: {info['vendor']}")
    print(
        f"size:     {info['dimensions'][0]} x {info['dimensions'][1]} px    mpp: {mpp}"
        + (f"    objective: {info['objective_power']}x" if info["objective_power"] else "")
    )
    print(f"{'level':>5} {'width':>8} {'height':>8} {'downsample':>11} {'µm/px':>8} {'tile':>11}")
    for lv in info["levels"]:
        m = f"{lv['mpp']:.4g}" if lv["mpp"] is not None else "-"
        t = f"{lv['tile'][0]}x{lv['tile'][1]}" if lv["tile"] else "-"
        print(f"{lv['level']:>5} {lv['width']:>8} {lv['height']:>8} {lv['downsample']:>11.4f} {m:>8} {t:>11}")
    if info["associated_images"]:
        print(
            "associated images: "
            + ", ".join(f"{k} ({w}x{h})" for k, (w, h) in info["associated_images"].items())
        )
    if args.properties:
        for k, v in sorted(info["properties"].items()):
            print(f"  {k} = {v!r}" if "\n" in v else f"  {k} = {v}")
    return 0
