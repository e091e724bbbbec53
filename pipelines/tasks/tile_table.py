"""The epithelium/stroma tile table: tiles of real slides labelled epithelium or stroma, in spatially
separated blocks, as a CSV of tiles (``slide, x, y, label, group``) that ``slidestream finetune``
streams through the online loader. The shipped demo slide (CC0 CMU-1-Small-Region, skin) holds
both: the epidermis (squamous epithelium, dense nuclei) and the dermis (collagen stroma).

Labels by construction, a proxy for the two tissues, not a pathologist's annotation: on a coarse
map of the slide (``cell_um`` µm cells) the haematoxylin optical density (colour deconvolution,
``skimage.color.rgb2hed``) is averaged over ``smooth_um`` µm; tissue cells (grey level below 215,
smoothed likewise) above the Otsu threshold of that density over the slide's tissue are
*epithelium*, the others *stroma*. A tile is kept when at least ``purity`` of its footprint is
one label (so boundary tiles are left out).

Blocks: the slide is cut into squares of ``block_um`` µm; tiles (``tile`` px at ``mpp``, stride
one tile) lie wholly inside one block and the block is their group, so a split by group
(:func:`pipelines.finetune.group_split`, what the finetune job does) never puts overlapping or
touching tiles in two splits. :data:`DEMO_TILES` is the table for the demo slide with the
defaults, shipped in ``wsi/data/`` (:func:`write_tissue_type_task` rebuilds it; a test checks
they agree). With ``--testdata`` the benchmark adds the TCGA frozen section of
its test-data directory (its file has no µm/px: 1.0 is assumed, and said so in the result).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from . import DEMO_SLIDE

TILE_TABLE_CLASSES = ("epithelium", "stroma")
#: the tile table of the demo slide, shipped with it (slide paths relative to wsi/data)
DEMO_TILES = DEMO_SLIDE.parent / "tissue-tiles.csv"


def epithelium_stroma_map(
    slide_path: str | Path, *, slide_mpp: float | None = None, cell_um: float = 4.0, smooth_um: float = 48.0
) -> tuple[np.ndarray, float]:
    """``(labels, cell)``: a coarse map of the slide (0: no tissue, 1: epithelium, 2: stroma; see
    the module docstring) and the level-0 px per map cell."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    from wsi import open_slide

    with open_slide(slide_path, mpp=slide_mpp) as s:
        base = s.require_mpp()
        w, h = s.dimensions
        cell = cell_um / base
        size = (max(1, int(w / cell)), max(1, int(h / cell)))
        img = s.read_region_mpp((0, 0), size, cell_um)
    k = max(1, int(round(smooth_um / cell_um)))
    hema = ndi.uniform_filter(rgb2hed(img)[..., 0], k)
    tissue = ndi.uniform_filter((img.mean(-1) < 215).astype(np.float64), k) > 0.5
    if tissue.sum() < 16:
        raise ValueError(f"{slide_path}: too little tissue for a tissue-type map")
    thr = threshold_otsu(hema[tissue])
    labels = np.zeros(hema.shape, np.uint8)
    labels[tissue & (hema > thr)] = 1
    labels[tissue & (hema <= thr)] = 2
    return labels, cell


def tissue_type_tiles(
    slide_path: str | Path,
    *,
    slide_name: str | None = None,
    slide_mpp: float | None = None,
    mpp: float = 1.0,
    tile: int = 32,
    block_um: float = 128.0,
    purity: float = 0.9,
) -> list[dict]:
    """Rows ``{slide, x, y, label, group}`` of one slide (see the module docstring); ``slide``
    is ``slide_name`` (default: the path as given)."""
    from wsi import open_slide

    labels, cell = epithelium_stroma_map(slide_path, slide_mpp=slide_mpp)
    with open_slide(slide_path, mpp=slide_mpp) as s:
        base = s.require_mpp()
        w, h = s.dimensions
    foot = tile * mpp / base  # level-0 px of a tile
    block = block_um / base
    per = int(block // foot)  # tiles per block side
    if per < 1:
        raise ValueError(f"block_um={block_um} is smaller than a tile ({tile} px at {mpp} µm/px)")
    name = slide_name or str(slide_path)
    stem = Path(str(slide_path)).stem
    rows = []
    for by in range(int(h // block)):
        for bx in range(int(w // block)):
            for j in range(per):
                for i in range(per):
                    x0, y0 = bx * block + i * foot, by * block + j * foot
                    c0, r0 = int(x0 // cell), int(y0 // cell)
                    c1, r1 = int(np.ceil((x0 + foot) / cell)), int(np.ceil((y0 + foot) / cell))
                    win = labels[r0:r1, c0:c1]
                    if win.size == 0:
                        continue
                    frac = np.bincount(win.ravel(), minlength=3)[1:] / win.size
                    best = int(frac.argmax())
                    if frac[best] >= purity:
                        rows.append(
                            {
                                "slide": name,
                                "x": int(round(x0)),
                                "y": int(round(y0)),
                                "label": TILE_TABLE_CLASSES[best],
                                "group": f"{stem}:{bx}-{by}",
                            }
                        )
    return rows


def write_tissue_type_task(
    out_csv: str | Path,
    slides: list[tuple[str | Path, float | None]] | None = None,
    *,
    mpp: float = 1.0,
    tile: int = 32,
    block_um: float = 128.0,
    purity: float = 0.9,
) -> dict:
    """Write the tile table of ``slides`` (``(path, µm/px override or None)``; default: the demo
    slide) to ``out_csv`` with slide paths relative to its folder; returns ``{"csv", "n",
    "labels": {label: count}, "groups", "slides", "mpp", "tile"}``."""
    from wsi.atomic import atomic_write_text

    out_csv = Path(out_csv)
    slides = slides or [(DEMO_SLIDE, None)]
    rows: list[dict] = []
    for path, override in slides:
        p = Path(path)
        try:
            name = str(p.resolve().relative_to(out_csv.parent.resolve()))
        except ValueError:
            name = str(p.resolve())
        rows += tissue_type_tiles(
            p, slide_name=name, slide_mpp=override, mpp=mpp, tile=tile, block_um=block_um, purity=purity
        )
    lines = ["slide,x,y,mpp,label,group"] + [
        f"{r['slide']},{r['x']},{r['y']},{mpp:g},{r['label']},{r['group']}" for r in rows
    ]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_csv, "\n".join(lines) + "\n")
    counts = {c: sum(r["label"] == c for r in rows) for c in TILE_TABLE_CLASSES}
    return {
        "csv": str(out_csv),
        "n": len(rows),
        "labels": counts,
        "groups": len({r["group"] for r in rows}),
        "slides": [str(p) for p, _ in slides],
        "mpp": mpp,
        "tile": tile,
    }


def read_task_rows(path: str | Path) -> list[dict]:
    """The rows of a tile table (to compare a rebuilt table with the shipped one)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
