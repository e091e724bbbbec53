"""``slidestream mil predict`` and ``mil heatmap``: a trained model directory applied to feature
files — slide predictions (CSV, and metrics when labels are given) and instance scores drawn on
a slide's thumbnail (:mod:`pipelines.mil.draw`), for one slide or a directory of feature files.
The slides themselves are read in a worker process with memory and time limits
(:mod:`pipelines.runtime`): over many slides, one whose reading crashes, hangs or exhausts memory
is recorded with its error class and the job goes on."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from wsi.atomic import atomic_path, atomic_write_text
from wsi.io import read_features, safe_slide_id

from ..errors import ConfigError, InputError
from .config import MILHeatmapConfig, MILPredictConfig
from .data import Skip, collect_feature_files, read_labels, report_skips
from .metrics import metrics_with_ci
from .model import ensemble_predict, load_model_dir


def _load_bags(files: list[Path], in_dim: int) -> tuple[list[str], list[np.ndarray], list[Skip]]:
    ids, bags, skipped = [], [], []
    for p in files:
        f = read_features(p)
        sid = p.name[:-3] if p.name.endswith(".h5") else safe_slide_id(str(p))
        if len(f) == 0:
            skipped.append(Skip(sid, f"feature file {p} has no tiles"))
            continue
        if f.features.shape[1] != in_dim:
            raise InputError(
                f"{p}: feature dimension {f.features.shape[1]} but the model expects {in_dim}; "
                f"embed with the encoder the model was trained on"
            )
        ids.append(sid)
        bags.append(f.features.astype(np.float32, copy=False))
    return ids, bags, skipped


def predict_files(
    model_dir: str | Path, files: list[Path], fold: int | None = None
) -> tuple[dict, list[str], dict, list[Skip]]:
    meta, models = load_model_dir(model_dir, None if fold is None else [fold])
    ids, bags, skipped = _load_bags(files, meta["in_dim"])
    if not bags:
        raise InputError("none of the feature files holds tiles; nothing to predict")
    probs, _ = ensemble_predict(models, bags)
    return meta, ids, probs, skipped


def predict(cfg: MILPredictConfig) -> Path:
    """Write the predictions CSV ``cfg.out`` (and ``<out>.metrics.json`` when labels are given);
    slides left out are recorded in ``skipped.csv`` beside it."""
    files = collect_feature_files(cfg.features)
    meta, ids, probs, skipped = predict_files(cfg.model, files, cfg.fold)
    out = Path(cfg.out)
    truth: dict[str, dict[str, str]] = {}
    if cfg.labels:
        for r in read_labels(cfg.labels, []):
            truth[r["slide_id"]] = r
    keep_eval: dict[str, list[tuple[int, int]]] = {t: [] for t in meta["tasks"]}
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["slide_id"]
        for t in meta["tasks"]:
            cols += (
                [f"{t}_prob_{c}" for c in meta["classes"][t]]
                + [f"{t}_pred"]
                + ([f"{t}_true"] if truth else [])
            )
        w.writerow(cols)
        for i, sid in enumerate(ids):
            row = [sid]
            for t in meta["tasks"]:
                cl = meta["classes"][t]
                row += [f"{v:.6f}" for v in probs[t][i]] + [cl[int(np.argmax(probs[t][i]))]]
                if truth:
                    v = truth.get(sid, {}).get(t, "")
                    row.append(v)
                    if v and v in cl:
                        keep_eval[t].append((i, cl.index(v)))
                    elif v:
                        skipped.append(
                            Skip(
                                sid,
                                f"{t} label {v!r} is not among the model's classes {cl}; "
                                f"left out of the metrics",
                            )
                        )
                    else:
                        skipped.append(Skip(sid, f"no {t} label in {cfg.labels}; left out of the metrics"))
            w.writerow(row)
    if truth:
        res = {}
        for t, pairs in keep_eval.items():
            if pairs:
                idx = np.array([i for i, _ in pairs])
                res[t] = metrics_with_ci(np.array([c for _, c in pairs]), probs[t][idx], 1000, 0)
        atomic_write_text(out.with_suffix(".metrics.json"), json.dumps(res, indent=2, default=str))
    report_skips(skipped, out.parent)
    print(f"wrote {out} ({len(ids)} slides)")
    return out


def heatmap(
    model_dir: str | Path,
    features: str | Path,
    out_dir: str | Path,
    *,
    slide: str | None = None,
    fold: int | None = None,
    task: str | None = None,
    size: int = 1024,
    normalize: str = "auto",
    tile_size: float | None = None,
    cmap: str = "jet",
    geojson: bool = False,
    mask: bool = False,
    mask_threshold: float = 0.5,
    worker: Any = None,
    limits: Any = None,
) -> dict:
    """Instance scores of one slide drawn on its thumbnail; see :mod:`pipelines.mil.draw`. With a
    ``worker`` (:mod:`pipelines.runtime`) the slide is read there, under ``limits``."""
    from ..runtime import IsolationConfig, run_call
    from .draw import tile_size_from_attrs, write_heatmap

    features = Path(features)
    if not features.is_file():
        raise InputError(f"feature file not found: {features}")
    meta, models = load_model_dir(model_dir, None if fold is None else [fold])
    task = task or meta["tasks"][0]
    if task not in meta["tasks"]:
        raise ConfigError(
            f"task {task!r} not in the model's tasks {meta['tasks']}; pass one of them as --task"
        )
    f = read_features(features)
    if len(f) == 0:
        raise InputError(f"{features} holds no tiles; nothing to draw")
    if f.features.shape[1] != meta["in_dim"]:
        raise InputError(
            f"{features}: feature dimension {f.features.shape[1]}, model expects {meta['in_dim']}"
        )
    probs, inst = ensemble_predict(models, [f.features.astype(np.float32, copy=False)])
    slide_url = slide or f.attrs.get("slide_url")
    if not slide_url:
        raise ConfigError(f"{features} does not record its slide (slide_url); pass --slide")
    ts = tile_size if tile_size else tile_size_from_attrs(f.attrs, f.coords, features)
    if normalize == "auto":
        normalize = "log-minmax" if meta["head"] == "abmil" else "none"
    thumb, dims, mpp = run_call(
        worker, slide_view, str(slide_url), size, what=f"slide {slide_url}", url=str(slide_url),
        limits=limits or IsolationConfig(),
    )  # fmt: skip
    classes = meta["classes"][task]
    p = probs[task][0]
    title = f"{safe_slide_id(str(slide_url))}: {meta['head']} " + ", ".join(
        f"P({c})={v:.2f}" for c, v in zip(classes, p)
    )
    return write_heatmap(
        Path(out_dir),
        thumb=thumb,
        coords=f.coords,
        scores=inst[task][0],
        tile_size_level0=ts,
        slide_dimensions=dims,
        normalize=normalize,
        cmap=cmap,
        title=title,
        geojson_out=geojson,
        mask_out=mask,
        mask_threshold=mask_threshold,
        mpp=mpp,
        meta={
            "slide": str(slide_url),
            "task": task,
            "head": meta["head"],
            "probs": {c: float(v) for c, v in zip(classes, p)},
        },
    )


def slide_view(url: str, size: int) -> tuple[np.ndarray, tuple[int, int], float | None]:
    """(thumbnail fitting ``size`` × ``size``, level-0 dimensions, µm/px) of a slide: what a
    heatmap reads of it (in the job's slide worker)."""
    from wsi.slide import open_slide

    with open_slide(url) as s:
        return s.get_thumbnail((size, size)), tuple(s.dimensions), s.mpp


def _heatmap_kwargs(cfg: MILHeatmapConfig) -> dict:
    return dict(
        fold=cfg.fold,
        task=cfg.task,
        size=cfg.size,
        normalize=cfg.normalize,
        tile_size=cfg.tile_size,
        cmap=cfg.cmap,
        geojson=cfg.geojson,
        mask=cfg.mask,
        mask_threshold=cfg.mask_threshold,
    )


def heatmap_from_config(cfg: MILHeatmapConfig) -> dict:
    """:func:`heatmap` with the settings of ``cfg`` (one feature file; the slide read in a worker
    process with ``cfg.isolation``'s limits)."""
    from ..runtime import maybe_isolated

    with maybe_isolated(cfg.isolation, preload=("pipelines.mil.predict",)) as worker:
        return heatmap(
            cfg.model, cfg.features, cfg.out, slide=cfg.slide, worker=worker, limits=cfg.isolation,
            **_heatmap_kwargs(cfg),
        )  # fmt: skip


def heatmaps_from_config(cfg: MILHeatmapConfig) -> dict:
    """Heatmaps of every feature file in the directory ``cfg.features``, each into
    ``cfg.out/<slide_id>/``: each slide read in the job's slide worker (``cfg.isolation``); a
    slide that fails — its feature file or slide refused, its reader crashing, hanging or
    exhausting memory — is recorded with its error class in ``cfg.out/heatmap_summary.json`` and
    the job goes on. Returns that summary."""
    from tqdm import tqdm

    from ..runtime import each_slide

    if cfg.slide:
        raise ConfigError(
            "--slide names the slide of one feature file; with a directory of them leave it out"
        )
    files = collect_feature_files([cfg.features])
    out = Path(cfg.out)

    def work(worker, sid: str, path: str) -> dict:
        info = heatmap(
            cfg.model, path, out / sid, worker=worker, limits=cfg.isolation, **_heatmap_kwargs(cfg)
        )
        return {"features": path, "id": sid, "out": str(out / sid), "probs": info["probs"]}

    done, failed = [], []
    outcomes = each_slide(
        [(p.name[:-3], str(p)) for p in files], work, out_dir=out, job="mil-heatmap", isolation=cfg.isolation,
        preload=("pipelines.mil.predict",), catch=(OSError, ValueError, RuntimeError, MemoryError),
    )  # fmt: skip
    for o in tqdm(outcomes, total=len(files), desc="heatmaps", unit="slide", disable=not cfg.progress):
        if o.ok:
            done.append(o.result)
        else:
            failed.append(
                {"features": o.url, "id": o.slide_id, "error_class": o.error_class, "error": o.error}
            )
            tqdm.write(f"FAILED {o.url}: {o.error_class}: {o.error}")
    summary = {"done": done, "failed": failed}
    atomic_write_text(out / "heatmap_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary
