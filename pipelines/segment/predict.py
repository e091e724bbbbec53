"""``slidestream segment predict``: whole-slide segmentation by sliding window.

Windows of ``tile`` px at the model's mpp step by ``tile - overlap`` over the slide; windows
without tissue (``wsi.tissue.tissue_mask``) are skipped and their pixels are background. Softmax
probabilities are blended with a separable window weight: on each side that borders another
window the weight is 0 for the first ``margin`` px, then rises as sin² over ``overlap − 2·margin``
px to 1 (adjacent ramps sum to exactly 1); sides on the slide border keep weight 1. With
``margin`` at least the model's receptive-field radius and window offsets that are multiples of
its total stride, every pixel is predicted only from windows that see its whole receptive field,
so the stitched result equals one whole-image forward pass (:func:`stitching_check`).

The slide is read in the job's slide worker (:mod:`pipelines.segment.windows`, :mod:`pipelines.runtime`):
a native crash, a hang or runaway memory while reading it fails the slide, not the job; over many
slides (:func:`predict_slides`) the failure is recorded and the job goes on. The model stays in
the job's process.

Memory is bounded: probabilities are accumulated for one band of ``tile`` rows × the slide width
at a time; finished rows are turned into labels and written to the Zarr array. Outputs (each
written to a temporary name and renamed) in ``out_dir``:

- ``<slide>.labels.ome.zarr``: zarr v3 OME-NGFF 0.5 multiscale label image (uint8 class
  indices, zstd), levels by 2× mode down-sampling, ``scale`` in µm/px, ``image-label`` colours
  and class names;
- ``<slide>.geojson``: QuPath-importable polygons per class in level-0 coordinates;
- ``<slide>.overlay.png``: the labels over a thumbnail.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi.tissue import DEFAULT_METHOD

from ..errors import ConfigError
from ..runtime import IsolationConfig, SlideWorker, run_call, run_stream
from .outputs import LabelZarrWriter, class_color, label_polygons
from .windows import (
    WindowBatch,
    WindowGrid,
    read_thumbnail,
    read_windows,
    window_batches,
    window_grid,
)


@dataclass
class PredictResult:
    zarr: Path | None
    geojson: Path | None
    overlay: Path | None
    shape: tuple[int, int]  # (H, W) of level 0 of the label image
    mpp: float
    windows: int
    windows_skipped: int
    seconds: float


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a ``segment train`` checkpoint (``weights_only`` load; the model config
    may hold architecture keys only: :func:`models.seg.decoders.segmenter_from_config`)."""
    from models.seg.decoders import segmenter_from_config

    from ..errors import InputError
    from ..training import load_checkpoint

    state = load_checkpoint(checkpoint, map_location="cpu")
    if not isinstance(state, dict) or "model_config" not in state or "model" not in state:
        raise InputError(f"{checkpoint} is not a `slidestream segment train` checkpoint (no model_config)")
    model = segmenter_from_config(state["model_config"], str(checkpoint))
    model.load_state_dict(state["model"])
    tile = state["tile_size"] if "tile_size" in state else state["tile"]  # "tile": checkpoints before 0.2
    meta = {"classes": list(state.get("classes", [])), "mpp": float(state["mpp"]), "tile": int(tile)}
    return model.to(device).eval(), meta


def ramp_profile(n: int, overlap: int, margin: int, first: bool, last: bool) -> np.ndarray:
    """1-D blending weights of one window (see the module docstring)."""
    w = np.ones(n, np.float64)
    if overlap <= 0:
        return w.astype(np.float32)
    r = overlap - 2 * margin
    d = np.arange(n) + 0.5

    def ramp(dist: np.ndarray) -> np.ndarray:
        if r <= 0:
            return (dist >= overlap / 2).astype(np.float64)
        return np.sin(np.pi / 2 * np.clip((dist - margin) / r, 0, 1)) ** 2

    if not first:
        w *= ramp(d)
    if not last:
        w *= ramp(n - d)
    return w.astype(np.float32)


def sliding_window(
    slide: Any,
    model: torch.nn.Module,
    *,
    n_classes: int,
    mpp: float,
    tile: int,
    overlap: int,
    margin: int | None = None,
    tissue: Any = None,
    batch_size: int = 8,
    device: torch.device | None = None,
    progress: bool = True,
    stats: dict | None = None,
    read_threads: int = 2,
):
    """Yield ``(y0, probabilities (C, h, W) float32, weight sum (h, W))`` bands of finished rows of
    the output grid at ``mpp``, top to bottom (rows with weight 0 were not predicted). Window
    counts go to ``stats`` (``windows``, ``skipped``, and the decoded-tile cache's ``cache_hits`` /
    ``cache_misses``: :func:`pipelines.segment.windows.window_batches`) when a dict is given. Each batch of windows
    is one :meth:`wsi.Slide.read_regions_mpp` call (tiles decoded in ``read_threads`` threads),
    read in this process (:func:`predict_slide` reads in the job's slide worker)."""
    grid = window_grid(slide.dimensions, slide.require_mpp(), mpp=mpp, tile=tile, overlap=overlap)
    batches = window_batches(
        slide, grid, mpp=mpp, tile=tile, tissue=tissue, batch_size=batch_size, read_threads=read_threads
    )
    yield from accumulate(
        batches, model, grid, n_classes=n_classes, tile=tile, overlap=overlap, margin=margin,
        device=device, progress=progress, stats=stats,
    )  # fmt: skip


def _check_windows(tile: int, overlap: int, margin: int | None) -> int:
    margin = overlap // 4 if margin is None else margin
    if not 0 <= overlap < tile or 2 * margin > overlap:
        raise ValueError(
            f"need 0 <= overlap < tile and 2*margin <= overlap (tile {tile}, overlap {overlap}, margin {margin})"
        )
    return margin


def accumulate(
    batches: Iterable[WindowBatch],
    model: torch.nn.Module,
    grid: WindowGrid,
    *,
    n_classes: int,
    tile: int,
    overlap: int,
    margin: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    stats: dict | None = None,
):
    """The bands of :func:`sliding_window` from window ``batches`` (row by row, as
    :func:`pipelines.segment.windows.window_batches` yields them) predicted by ``model``."""
    from tqdm import tqdm

    device = device or next(model.parameters()).device
    margin = _check_windows(tile, overlap, margin)
    W, H, ys = grid.width, grid.height, grid.ys
    acc = np.zeros((n_classes, tile, W), np.float32)
    wsum = np.zeros((tile, W), np.float32)
    buf_y = 0
    stats = {} if stats is None else stats
    stats.update(windows=0, skipped=0, cache_hits=0, cache_misses=0)
    bar = tqdm(
        total=grid.n_windows, desc="segment predict", unit="win", file=sys.stderr, disable=not progress
    )
    from ..training import Precision

    autocast = Precision("auto", device).autocast()
    row = -1

    def to_row(r: int):
        nonlocal row, buf_y, acc, wsum
        while row < r:
            row += 1
            y = ys[row]
            if y > buf_y:  # rows above y are final: no later window touches them
                d = y - buf_y
                yield buf_y, acc[:, :d].copy(), wsum[:d].copy()
                acc[:, :-d], wsum[:-d] = acc[:, d:].copy(), wsum[d:].copy()
                acc[:, -d:], wsum[-d:] = 0, 0
                buf_y = y

    for b in batches:
        yield from to_row(b.row)
        stats["skipped"] += b.skipped
        stats.update(cache_hits=b.cache_hits, cache_misses=b.cache_misses)
        bar.update(b.skipped)
        if not b.cols:
            continue
        wy = ramp_profile(tile, overlap, margin, b.row == 0, b.row == len(ys) - 1)
        batch = torch.from_numpy(b.images).to(device).permute(0, 3, 1, 2).float().div_(255)
        with torch.no_grad(), autocast:
            logits = model(batch)
        probs = (
            (torch.softmax(logits.float(), 1) if n_classes > 1 else torch.sigmoid(logits.float()))
            .cpu()
            .numpy()
        )
        for c, p in zip(b.cols, probs):
            x = grid.xs[c]
            wx = ramp_profile(tile, overlap, margin, c == 0, c == len(grid.xs) - 1)
            w2 = wy[:, None] * wx[None, :]
            x1 = min(W, x + tile)
            acc[:, :, x:x1] += p[:, :, : x1 - x] * w2[None, :, : x1 - x]
            wsum[:, x:x1] += w2[:, : x1 - x]
        stats["windows"] += len(b.cols)
        bar.update(len(b.cols))
    yield from to_row(len(ys) - 1)
    bar.close()
    h = min(tile, H - buf_y)
    yield buf_y, acc[:, :h].copy(), wsum[:h].copy()


def labels_from_band(probs: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    if probs.shape[0] == 1:
        lab = (probs[0] > 0.5 * np.maximum(wsum, 1e-12)).astype(np.uint8)
    else:
        lab = probs.argmax(0).astype(np.uint8)
    lab[wsum <= 0] = 0
    return lab


def _small_level(root: Any, max_side: int) -> tuple[np.ndarray, int]:
    i = 0
    while str(i + 1) in root and max(root[str(i)].shape) > max_side:
        i += 1
    return np.asarray(root[str(i)][:]), 2**i


def _device(device: str) -> torch.device:
    return torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )


def predict_slide(
    slide_path: str | Path,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    model: torch.nn.Module | None = None,
    classes: list[str] | None = None,
    mpp: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    margin: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    tissue_method: str = DEFAULT_METHOD,
    slide_mpp: float | None = None,
    progress: bool = True,
    slide_id: str | None = None,
    worker: SlideWorker | None = None,
    limits: IsolationConfig | None = None,
) -> PredictResult:
    """Predict a whole slide and write the Zarr labels, GeoJSON and overlay (module docstring).

    Either ``checkpoint`` (from ``segment train``) or ``model`` + ``classes`` + ``mpp`` + ``tile``.
    ``overlap`` defaults to tile/4, ``margin`` to overlap/4. ``tissue_method="none"`` predicts
    everywhere. Outputs are named ``slide_id`` (default: from the slide's name). With a ``worker``
    (:mod:`pipelines.runtime`) the slide is read there under ``limits``; the model stays here."""
    from PIL import Image

    from wsi.annotations import to_geojson_feature
    from wsi.atomic import atomic_path, atomic_write_text
    from wsi.io import safe_slide_id

    t0 = time.perf_counter()
    dev = _device(device)
    if model is None:
        if checkpoint is None:
            raise ConfigError("pass --checkpoint (a `slidestream segment train` checkpoint)")
        model, meta = load_model(checkpoint, dev)
        classes = classes or meta["classes"]
        mpp, tile = mpp or meta["mpp"], tile or meta["tile"]
    if classes is None or mpp is None or tile is None:
        raise ConfigError("without a checkpoint pass classes=, mpp= and tile=")
    model = model.to(dev).eval()
    overlap = tile // 4 if overlap is None else overlap
    _check_windows(tile, overlap, margin)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = str(slide_path)
    sid = slide_id or safe_slide_id(url)
    limits = limits or IsolationConfig()
    stream = run_stream(
        worker, read_windows, url, slide_mpp=slide_mpp, tissue_method=tissue_method, mpp=mpp, tile=tile,
        overlap=overlap, batch_size=batch_size, what=f"slide {url}", url=url, limits=limits,
    )  # fmt: skip
    with contextlib.closing(stream):
        head = next(stream)
        base = head["mpp"]
        W0, H0 = head["dimensions"]
        grid = window_grid((W0, H0), base, mpp=mpp, tile=tile, overlap=overlap)
        shape = (max(1, math.ceil(H0 * base / mpp)), max(1, math.ceil(W0 * base / mpp)))
        zpath = out / f"{sid}.labels.ome.zarr"
        with atomic_path(zpath) as tmp:
            writer = LabelZarrWriter(tmp, shape, mpp, list(classes))
            stats: dict[str, int] = {}
            bands = accumulate(
                stream, model, grid, n_classes=len(classes), tile=tile, overlap=overlap, margin=margin,
                device=dev, progress=progress, stats=stats,
            )  # fmt: skip
            for _, probs, wsum in bands:
                writer.write_rows(labels_from_band(probs, wsum))
            writer.close(
                sid,
                {
                    "slide": url,
                    "tile": tile,
                    "overlap": overlap,
                    "margin": overlap // 4 if margin is None else margin,
                },
            )
    import zarr

    root = zarr.open_group(str(zpath), mode="r")
    small, f = _small_level(root, 2048)
    ds0 = (mpp / base) * f  # level-0 px per pixel of `small`
    # the label grid may overhang the slide by < 1 px of the grid: clip to level-0 bounds
    feats = [
        to_geojson_feature([np.clip(r, 0, (W0, H0)) for r in rings], classes[c], class_color(c))
        for c, rings in label_polygons(small, ds0, len(classes))
    ]
    gpath = out / f"{sid}.geojson"
    atomic_write_text(gpath, json.dumps({"type": "FeatureCollection", "features": feats}))
    size = (small.shape[1], small.shape[0])
    thumb = run_call(
        worker, read_thumbnail, url, size, slide_mpp, what=f"slide {url}", url=url, limits=limits
    )
    thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BILINEAR))
    lut = np.array([class_color(c) for c in range(max(len(classes), 1))], np.float32)
    colour = lut[np.minimum(small, len(lut) - 1)]
    alpha = np.where(small[..., None] > 0, 0.45, 0.0)
    overlay = (thumb * (1 - alpha) + colour * alpha).round().astype(np.uint8)
    opath = out / f"{sid}.overlay.png"
    with atomic_path(opath) as tmp:
        Image.fromarray(overlay).save(tmp, format="PNG")
    return PredictResult(
        zpath, gpath, opath, shape, float(mpp), stats["windows"], stats["skipped"], time.perf_counter() - t0
    )


def predict_slides(cfg: Any) -> dict[str, Any]:
    """``segment predict`` over ``cfg.slides`` (and ``cfg.slide``) with one model: each slide's
    outputs in ``cfg.out`` named by its slide id (ids that collide are made distinct), each slide
    read in the job's slide worker (``cfg.isolation``). A slide that fails — refused, crashing
    its reader, hanging, exhausting memory — is recorded with its error class in
    ``cfg.out/predict_summary.json`` and the job goes on. Returns that summary."""
    from tqdm import tqdm

    from wsi.atomic import atomic_write_text
    from wsi.io import unique_slide_ids

    from ..runtime import each_slide

    urls = list(dict.fromkeys([*cfg.slides, *([cfg.slide] if cfg.slide else [])]))
    ids, renamed = unique_slide_ids(urls)
    for url, sid in renamed.items():
        print(f"note: {url} shares its name with another slide; its outputs are named {sid}", file=sys.stderr)
    dev = _device(cfg.device)
    model, meta = load_model(cfg.checkpoint, dev)
    mpp, tile = cfg.mpp or meta["mpp"], cfg.tile_size or meta["tile"]
    _check_windows(tile, tile // 4 if cfg.overlap is None else cfg.overlap, cfg.margin)
    out = Path(cfg.out)

    def work(worker: SlideWorker | None, sid: str, url: str) -> dict[str, Any]:
        r = predict_slide(
            url, None, out, model=model, classes=meta["classes"], mpp=mpp, tile=tile, overlap=cfg.overlap,
            margin=cfg.margin, batch_size=cfg.batch_size, device=cfg.device, tissue_method=cfg.tissue_method,
            slide_mpp=cfg.slide_mpp, progress=False, slide_id=sid, worker=worker, limits=cfg.isolation,
        )  # fmt: skip
        return {"slide": url, "id": sid, **_result_dict(r)}

    done, failed = [], []
    outcomes = each_slide(
        zip(ids, urls), work, out_dir=out, job="segment-predict", isolation=cfg.isolation,
        preload=("pipelines.segment.windows",), catch=(OSError, ValueError, RuntimeError, MemoryError),
    )  # fmt: skip
    for o in tqdm(outcomes, total=len(urls), desc="segment predict", unit="slide", disable=not cfg.progress):
        if o.ok:
            done.append(o.result)
        else:
            failed.append({"slide": o.url, "id": o.slide_id, "error_class": o.error_class, "error": o.error})
            tqdm.write(f"FAILED {o.url}: {o.error_class}: {o.error}", file=sys.stderr)
    summary = {"done": done, "failed": failed}
    atomic_write_text(out / "predict_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _result_dict(r: PredictResult) -> dict[str, Any]:
    return {
        "zarr": str(r.zarr),
        "geojson": str(r.geojson),
        "overlay": str(r.overlay),
        "shape": list(r.shape),
        "mpp": r.mpp,
        "windows": r.windows,
        "windows_skipped": r.windows_skipped,
        "seconds": round(r.seconds, 2),
    }


def receptive_radius(model: torch.nn.Module, size: int = 128, channels: int = 3) -> int:
    """Empirical receptive-field radius (px) of the centre output pixel: the largest distance from
    the centre of an input pixel whose gradient is non-zero."""
    model = model.eval()
    x = torch.rand(1, channels, size, size, requires_grad=True)
    model(x)[0, :, size // 2, size // 2].sum().backward()
    g = x.grad.abs().sum((0, 1))
    ys, xs = torch.nonzero(g > 0, as_tuple=True)
    return int(max((ys - size // 2).abs().max(), (xs - size // 2).abs().max()))


def stitching_check(
    slide_path: str | Path,
    work_dir: str | Path | None = None,
    *,
    tile: int = 256,
    overlap: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """Sliding-window probabilities vs one whole-image forward pass on a small slide at its native
    mpp, with a depth-3 U-Net (total stride 8, receptive-field radius measured) and ``margin`` =
    that radius rounded up. Windows start at multiples of ``tile - overlap`` (a multiple of 8).
    Returns max |Δp| (tolerance 1e-4: float32 summation order), label agreement, and the same
    for naive non-overlapping tiles (the seams blending removes)."""
    from models.seg.decoders import create_segmenter
    from wsi.slide import open_slide

    torch.manual_seed(seed)
    model = create_segmenter("unet", n_classes=3, unet_depth=3, unet_width=8).eval()
    with torch.no_grad():  # non-trivial BN statistics so every layer matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    radius = receptive_radius(model)
    margin = radius + 1
    if 2 * margin > overlap:
        raise ValueError(f"overlap {overlap} is too small for receptive-field radius {radius}")
    with open_slide(slide_path) as slide:
        mpp = slide.require_mpp()
        full = slide.read_region((0, 0), 0, slide.dimensions)
        with torch.no_grad():
            ref = torch.softmax(model(torch.from_numpy(full).permute(2, 0, 1)[None].float() / 255), 1)[
                0
            ].numpy()

        def stitched(ov: int, mg: int) -> np.ndarray:
            bands = [
                p / np.maximum(w, 1e-12)[None]
                for _, p, w in sliding_window(
                    slide, model, n_classes=3, mpp=mpp, tile=tile, overlap=ov, margin=mg, progress=False
                )
            ]
            return np.concatenate(bands, axis=1)

        blended = stitched(overlap, margin)
        naive = stitched(0, 0)
    diff = float(np.abs(blended - ref).max())
    return {
        "slide_px": list(full.shape[1::-1]),
        "tile": tile,
        "overlap": overlap,
        "margin": margin,
        "receptive_radius": radius,
        "max_abs_diff": diff,
        "tolerance": 1e-4,
        "label_agreement": float((blended.argmax(0) == ref.argmax(0)).mean()),
        "no_overlap_max_abs_diff": float(np.abs(naive - ref).max()),
        "no_overlap_label_agreement": float((naive.argmax(0) == ref.argmax(0)).mean()),
    }
