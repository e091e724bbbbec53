"""``slidestream tissue qc``: tissue masks and QC overlays for slides.

Per slide: ``<id>_mask.png`` (+ ``<id>_mask.png.json``, :meth:`wsi.tissue.TissueMask.save`) and
``<id>_qc.png``: the thumbnail, the mask contour, and the grid of tiles at ``tile_mpp`` whose
tissue fraction is at least ``min_tissue`` (:func:`wsi.sampling.grid_coords`). A slide that
cannot be read — refused, crashing its reader, hanging, exhausting memory — is recorded with its
error class in ``tissue_summary.json`` and skipped; the command exits non-zero after a summary when
any failed. ``masks`` (a directory) uses user masks (``<id>.png`` or ``<id>.geojson``) instead of
computing them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .config import TissueQCConfig


def run_qc(args: TissueQCConfig) -> int:
    """Masks and QC overlays of ``args.slides`` into ``args.out``; 1 when any slide failed.

    Each slide's work runs in a worker process with memory and time limits (``args.isolation``,
    :func:`pipelines.runtime.each_slide`): a crash, hang or runaway allocation in one slide is
    recorded with its error class in ``tissue_summary.json`` and the job goes on."""
    from tqdm import tqdm

    from wsi.io import unique_slide_ids

    from ..runtime import each_slide, run_call

    if args.weights and args.method in ("unet", "auto") and not args.masks:
        from models.seg.tissue_net import load as load_tissue_net

        load_tissue_net(args.weights)  # a bad or hostile weights file stops the job here, before any slide
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    urls = list(dict.fromkeys(str(u) for u in args.slides))  # a slide listed twice is done once
    ids, renamed = unique_slide_ids(urls)
    for url, sid in renamed.items():
        tqdm.write(
            f"note: {url} shares its name with another slide; its outputs are named {sid}", file=sys.stderr
        )

    def work(worker, sid: str, url: str) -> dict:
        return run_call(
            worker, qc_slide, url, out, sid, args, what=f"slide {url}", url=url, limits=args.isolation
        )

    done, failed = [], []
    outcomes = each_slide(
        zip(ids, urls),
        work,
        out_dir=out,
        job="tissue-qc",
        isolation=args.isolation,
        preload=("pipelines.tissue.qc",),
        catch=(OSError, ValueError, RuntimeError, MemoryError),  # SlideError is an OSError
    )
    for o in tqdm(
        outcomes, total=len(urls), desc="tissue", unit="slide", file=sys.stderr, disable=not args.progress
    ):
        if o.ok:
            done.append(o.result)
            continue
        failed.append({"slide": o.url, "id": o.slide_id, "error_class": o.error_class, "error": o.error})
        tqdm.write(f"FAILED {o.url}: {o.error_class}: {o.error}", file=sys.stderr)
    summary = {"done": done, "failed": failed}
    from wsi.atomic import atomic_write_text

    atomic_write_text(out / "tissue_summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"tissue: {len(done)} slide(s) done, {len(failed)} failed -> {out}")
    for f in failed:
        print(f"  failed: {f['slide']}: {f['error_class']}: {f['error']}")
    return 1 if failed else 0


def qc_slide(url: str, out: Path, sid: str, args: TissueQCConfig) -> dict:
    """Mask + QC overlay for one slide; returns a summary dict."""
    from wsi.slide import open_slide
    from wsi.tissue import tissue_mask

    with open_slide(url, mpp=args.mpp) as slide:
        thumb = slide.get_thumbnail((args.thumbnail_size, args.thumbnail_size))
        user = _user_mask_path(args.masks, sid) if args.masks else None
        if user is not None:
            mask = tissue_mask(slide, method="mask", mask_path=user)
        else:
            mask = tissue_mask(
                slide,
                method=args.method,
                thumbnail_size=args.thumbnail_size,
                weights=args.weights,
                thumbnail=thumb,
            )
        base_mpp = slide.mpp
        dims = slide.dimensions
    mask_path = mask.save(out / f"{sid}_mask.png")
    boxes, note = _tile_boxes(dims, mask, base_mpp, args)
    qc_path = out / f"{sid}_qc.png"
    draw_qc(
        thumb,
        mask,
        boxes,
        qc_path,
        title=f"{sid}  {mask.method}  tissue {mask.area_fraction:.1%}  {len(boxes)} tiles {note}",
    )
    return {
        "slide": str(url),
        "id": sid,
        "mask": str(mask_path),
        "qc": str(qc_path),
        "method": mask.method,
        "tissue_fraction": round(mask.area_fraction, 4),
        "tiles": len(boxes),
    }


def _user_mask_path(directory: Path, sid: str) -> Path | None:
    for ext in (".geojson", ".json", ".png", ".tif", ".tiff"):
        p = Path(directory) / f"{sid}{ext}"
        if p.exists():
            return p
    return None


def _tile_boxes(dims, mask, base_mpp, args) -> tuple[np.ndarray, str]:
    """Level-0 boxes (N, 4: x, y, w, h) of grid tiles with enough tissue."""
    note = f"({args.tile_size} px @ {args.tile_mpp} µm/px, ≥{args.min_tissue:.0%} tissue)"
    if base_mpp is None:
        # no µm/px: tiles of --tile level-0 px, said so on the overlay
        base_mpp, tile_mpp = 1.0, 1.0
        note = f"({args.tile_size} level-0 px: slide has no mpp; pass --mpp, ≥{args.min_tissue:.0%} tissue)"
    else:
        tile_mpp = args.tile_mpp
    from wsi.sampling import grid_coords

    coords = grid_coords(
        dims, mask, base_mpp=base_mpp, mpp=tile_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue
    )
    size0 = args.tile_size * tile_mpp / base_mpp
    boxes = np.column_stack([coords, np.full((len(coords), 2), size0)]) if len(coords) else np.zeros((0, 4))
    return boxes, note


def draw_qc(thumb: np.ndarray, mask, boxes: np.ndarray, path: Path, *, title: str = "") -> Path:
    """PNG of the thumbnail with the mask contour (green) and tile boxes (blue)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from wsi.atomic import atomic_path

    th, tw = thumb.shape[:2]
    W = mask.slide_dimensions[0] if mask.slide_dimensions else tw * mask.downsample
    s = tw / W  # thumbnail px per level-0 px
    fig = Figure(figsize=(10, 10 * th / tw + 0.4), dpi=100)
    ax = fig.subplots()
    ax.imshow(thumb)
    m = mask.mask.astype(float)
    mh, mw = m.shape
    # mask pixel (i, j) covers level-0 [j*d, (j+1)*d): its centre in thumbnail px
    d = mask.downsample * s
    if m.any() and not m.all():
        ax.contour(
            np.arange(mw) * d + d / 2,
            np.arange(mh) * d + d / 2,
            m,
            levels=[0.5],
            colors="lime",
            linewidths=1.2,
        )
    if len(boxes):
        rects = [Rectangle((x * s, y * s), w * s, h * s) for x, y, w, h in boxes]
        ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor="dodgerblue", linewidth=0.5))
    ax.set_xlim(0, tw)
    ax.set_ylim(th, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
