"""``slidestream mil``: slide-level multiple-instance learning on feature files.

    slidestream mil train   --features DIR --labels labels.csv --head abmil --folds 5 --out RUN
    slidestream mil predict --model RUN --features DIR_OR_FILES... --out preds.csv [--fold K]
    slidestream mil heatmap --model RUN --features SLIDE.h5 [--slide SLIDE] --out DIR [--geojson] [--mask]

``train`` writes to RUN: ``fold<k>.safetensors`` + ``model.json`` (a model directory for
``predict``/``heatmap``), ``metrics.json``/``metrics.csv`` (per fold, mean ± sd, pooled out-of-fold
with bootstrap 95% intervals), ``roc.png``, ``predictions.csv`` (out-of-fold), ``config.yaml`` and
``skipped.csv`` when slides were skipped. Flags override the YAML config (``--config``) and
``--set key.sub=value`` overrides anything in it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from pipelines.config import dump_config, load_config
from pipelines.distributed import DistInfo, all_gather_objects, cleanup, init_distributed
from pipelines.mil_data import (
    MILDataError,
    MILDataset,
    Skip,
    collect_feature_files,
    load_dataset,
    report_skips,
)
from pipelines.mil_metrics import metrics_with_ci, plot_roc, summarize_folds, write_metrics
from pipelines.mil_train import (
    MILConfig,
    ensemble_predict,
    fit,
    load_model_dir,
    make_folds,
    predict_bags,
    save_model_dir,
)
from wsi.atomic import atomic_path, atomic_write_text
from wsi.io import read_features, safe_slide_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mil_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="cross-validated training with metrics and ROC curves")
    t.add_argument("--features", required=True, help="directory of <slide_id>.h5 feature files")
    t.add_argument("--labels", required=True, help="CSV: slide_id, label[, patient_id][, split]")
    t.add_argument("--out", required=True, help="output directory (model, metrics, plots)")
    t.add_argument("--config", help="YAML config (configs/mil/abmil.yaml, configs/mil/noisy-and.yaml)")
    t.add_argument("--head", choices=["abmil", "noisy_and", "mean", "max"])
    t.add_argument("--folds", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--balance", choices=["weights", "sampler", "none"])
    t.add_argument("--label-columns", help="comma-separated label columns (several = multi-task)")
    t.add_argument("--on-missing", choices=["skip", "error"], help="slides without features: record or fail")
    t.add_argument("--seed", type=int)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    t.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("predict", help="predict slides with a trained model directory")
    p.add_argument("--model", required=True)
    p.add_argument("--features", required=True, nargs="+", help="feature files or directories")
    p.add_argument("--out", required=True, help="CSV of predictions")
    p.add_argument("--fold", type=int, help="use one fold's model (default: mean of all folds)")
    p.add_argument("--labels", help="optional labels CSV: adds the true label and writes metrics JSON")
    h = sub.add_parser("heatmap", help="instance scores drawn on the slide thumbnail")
    h.add_argument("--model", required=True)
    h.add_argument("--features", required=True, help="one feature file (.h5)")
    h.add_argument("--slide", help="the slide (default: the slide_url stored in the feature file)")
    h.add_argument("--out", required=True, help="output directory")
    h.add_argument("--fold", type=int)
    h.add_argument("--task", help="task (label column) to map; default the first")
    h.add_argument("--size", type=int, default=1024, help="thumbnail longest side in pixels")
    h.add_argument(
        "--normalize",
        choices=["auto", "minmax", "log-minmax", "none"],
        default="auto",
        help="auto: log-minmax for ABMIL attention weights, none for instance probabilities",
    )
    h.add_argument("--tile-size", type=float, help="level-0 tile size when the file lacks tile_size_level0")
    h.add_argument("--cmap", default="jet")
    h.add_argument("--geojson", action="store_true", help="also write tiles.geojson (QuPath)")
    h.add_argument("--mask", action="store_true", help="also write mask.png (+ .json sidecar)")
    h.add_argument(
        "--mask-threshold",
        type=float,
        default=0.5,
        help="mask = pixels at or above this position (0..1) on the colour bar",
    )


def config_from_args(args: argparse.Namespace) -> MILConfig:
    ov = list(args.set)
    for flag, key in (
        ("head", "head.name"),
        ("folds", "folds"),
        ("epochs", "optim.epochs"),
        ("lr", "optim.lr"),
        ("batch_size", "optim.batch_size"),
        ("balance", "balance"),
        ("on_missing", "on_missing"),
        ("seed", "seed"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            ov.insert(0, f"{key}={v}")
    if getattr(args, "label_columns", None):
        cols = [c.strip() for c in args.label_columns.split(",") if c.strip()]
        ov.insert(0, f"label_columns=[{', '.join(repr(c) for c in cols)}]")
    return load_config(MILConfig, args.config, ov)


def train_cv(
    cfg: MILConfig, ds: MILDataset, out: Path, progress: bool = True, dist_info: DistInfo | None = None
) -> dict:
    """Cross-validated training on ``ds``; writes the run directory ``out``; returns the summary
    (on rank 0; other ranks of a torchrun job return ``{}``)."""
    from tqdm import tqdm

    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        report_skips(ds.skipped, out)
    primary = ds.tasks[0]
    y = ds.targets[primary]
    folds = make_folds(y, ds.patients, ds.splits, cfg.folds, cfg.val_fraction, cfg.seed)
    n_classes = {t: len(ds.classes[t]) for t in ds.tasks}
    oof = {t: np.full((len(ds), n_classes[t]), np.nan) for t in ds.tasks}
    fold_of = np.full(len(ds), -1)
    models, fold_info = [], []
    per_fold: dict[str, list[dict]] = {t: [] for t in ds.tasks}
    curves: dict[str, list] = {t: [] for t in ds.tasks}
    for k, (tr, va, te) in enumerate(folds):
        for t in ds.tasks:
            yt = ds.targets[t]
            unseen = sorted(set(yt[np.concatenate([va, te])]) - set(yt[tr]) - {-1})
            if unseen:
                names = [ds.classes[t][c] for c in unseen]
                raise MILDataError(
                    f"fold {k}: {t} value(s) {names} occur in the validation/test slides but not "
                    f"in the training classes {sorted(ds.classes[t][c] for c in set(yt[tr]) - {-1})}; "
                    f"fix the split column or use more slides per class"
                )
    # under torchrun, fold k trains on rank k % world_size (folds are independent and seeded by k,
    # so the run gives the same models as one process); rank 0 gathers them and writes the run
    mine = [k for k in range(len(folds)) if k % world == rank]
    results: dict[int, dict] = {}
    for k in tqdm(mine, desc=f"folds (rank {rank})" if world > 1 else "folds", file=sys.stderr,
                  disable=not progress or rank != 0):  # fmt: skip
        tr, va, te = folds[k]
        sel = lambda idx: ([ds.bags[i] for i in idx], {t: ds.targets[t][idx] for t in ds.tasks})  # noqa: E731
        (trb, trt), (vab, vat) = sel(tr), sel(va)
        res = fit(
            cfg,
            trb,
            trt,
            n_classes,
            vab or None,
            vat if len(va) else None,
            seed=cfg.seed + k,
            progress=progress and rank == 0,
            desc=f"fold {k}",
        )
        probs, _ = predict_bags(res.model, [ds.bags[i] for i in te], device=cfg.device)
        info = {
            "fold": k,
            "n_train": int(len(tr)),
            "n_val": int(len(va)),
            "n_test": int(len(te)),
            "best_epoch": res.best_epoch,
            "best_val_loss": res.best_val_loss,
            "epochs_run": len(res.history),
            "test_slides": [ds.slide_ids[i] for i in te],
        }
        fold_metrics = {}
        for t in ds.tasks:
            yt = ds.targets[t][te]
            keep = yt >= 0
            fold_metrics[t] = metrics_with_ci(yt[keep], probs[t][keep], cfg.bootstrap, cfg.seed + k)
            info[f"metrics_{t}"] = fold_metrics[t]
        results[k] = {"model": res.model.cpu(), "probs": probs, "info": info, "metrics": fold_metrics}
    if world > 1:
        gathered = all_gather_objects(results)  # trusted: our own ranks, never a user file
        if rank != 0:
            return {}
        results = {k: r for part in gathered for k, r in part.items()}
    for k, (_tr, _va, te) in enumerate(folds):
        r = results[k]
        models.append(r["model"])
        fold_of[te] = k
        for t in ds.tasks:
            oof[t][te] = r["probs"][t]
            yt = ds.targets[t][te]
            keep = yt >= 0
            per_fold[t].append(r["metrics"][t])
            curves[t].append((f"fold {k}", yt[keep], r["probs"][t][keep]))
        fold_info.append(r["info"])
    save_model_dir(out, cfg, ds.in_dim, ds.tasks, ds.classes, models, fold_info)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    summary = {}
    tested = fold_of >= 0
    for t in ds.tasks:
        yt = ds.targets[t]
        keep = tested & (yt >= 0)
        pooled = metrics_with_ci(yt[keep], oof[t][keep], cfg.bootstrap, cfg.seed)
        s = summarize_folds(per_fold[t])
        write_metrics(out, t, per_fold[t], pooled, s)
        suffix = "" if t == "label" else f"_{t}"
        plot_roc(
            out / f"roc{suffix}.png",
            curves[t] + [("pooled", yt[keep], oof[t][keep])],
            f"{cfg.head.name}: {t}",
            ds.classes[t],
        )
        summary[t] = {"summary": s, "pooled": pooled}
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["slide_id", "patient_id", "fold"]
        for t in ds.tasks:
            cols += [f"{t}_true"] + [f"{t}_prob_{c}" for c in ds.classes[t]] + [f"{t}_pred"]
        w.writerow(cols)
        for i in np.flatnonzero(tested):
            row = [ds.slide_ids[i], ds.patients[i], int(fold_of[i])]
            for t in ds.tasks:
                yi = ds.targets[t][i]
                row += [ds.classes[t][yi] if yi >= 0 else ""] + [f"{v:.6f}" for v in oof[t][i]]
                row += [ds.classes[t][int(np.argmax(oof[t][i]))]]
            w.writerow(row)
    return summary


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    dist_info = init_distributed("cpu" if cfg.device == "cpu" else "auto")
    try:
        return _train_run(args, cfg, dist_info)
    finally:
        cleanup()


def _train_run(args: argparse.Namespace, cfg: MILConfig, dist_info: DistInfo) -> int:
    if dist_info.distributed and cfg.device.startswith("cuda"):
        cfg.device = str(dist_info.device)  # one GPU per rank
    ds = load_dataset(
        args.labels, args.features, cfg.label_columns, classes=cfg.classes or None, on_missing=cfg.on_missing
    )
    out = Path(args.out)
    summary = train_cv(cfg, ds, out, progress=not args.no_progress, dist_info=dist_info)
    if not dist_info.is_main:
        return 0
    for t, s in summary.items():
        line = ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in s["summary"].items())
        print(
            f"{t}: {line} (pooled AUROC {s['pooled']['auroc']:.3f}; {len(ds)} slides, {len(ds.skipped)} skipped)"
        )
    print(f"wrote {out}")
    return 0


def _load_bags(files: list[Path], in_dim: int) -> tuple[list[str], list[np.ndarray], list[Skip]]:
    ids, bags, skipped = [], [], []
    for p in files:
        f = read_features(p)
        sid = p.name[:-3] if p.name.endswith(".h5") else safe_slide_id(str(p))
        if len(f) == 0:
            skipped.append(Skip(sid, f"feature file {p} has no tiles"))
            continue
        if f.features.shape[1] != in_dim:
            raise MILDataError(
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
        raise MILDataError("none of the feature files holds tiles; nothing to predict")
    probs, _ = ensemble_predict(models, bags)
    return meta, ids, probs, skipped


def _predict(args: argparse.Namespace) -> int:
    files = collect_feature_files(args.features)
    meta, ids, probs, skipped = predict_files(args.model, files, args.fold)
    out = Path(args.out)
    truth: dict[str, dict[str, str]] = {}
    if args.labels:
        from pipelines.mil_data import read_labels

        for r in read_labels(args.labels, []):
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
                        skipped.append(Skip(sid, f"no {t} label in {args.labels}; left out of the metrics"))
            w.writerow(row)
    if truth:
        import json

        res = {}
        for t, pairs in keep_eval.items():
            if pairs:
                idx = np.array([i for i, _ in pairs])
                res[t] = metrics_with_ci(np.array([c for _, c in pairs]), probs[t][idx], 1000, 0)
        atomic_write_text(out.with_suffix(".metrics.json"), json.dumps(res, indent=2, default=str))
    report_skips(skipped, out.parent)
    print(f"wrote {out} ({len(ids)} slides)")
    return 0


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
) -> dict:
    """Instance scores of one slide drawn on its thumbnail; see :mod:`pipelines.mil_heatmap`."""
    from pipelines.mil_heatmap import tile_size_from_attrs, write_heatmap
    from wsi.slide import open_slide

    features = Path(features)
    if not features.is_file():
        raise MILDataError(f"feature file not found: {features}")
    meta, models = load_model_dir(model_dir, None if fold is None else [fold])
    task = task or meta["tasks"][0]
    if task not in meta["tasks"]:
        raise ValueError(f"task {task!r} not in the model's tasks {meta['tasks']}")
    f = read_features(features)
    if len(f) == 0:
        raise MILDataError(f"{features} holds no tiles; nothing to draw")
    if f.features.shape[1] != meta["in_dim"]:
        raise MILDataError(
            f"{features}: feature dimension {f.features.shape[1]}, model expects {meta['in_dim']}"
        )
    probs, inst = ensemble_predict(models, [f.features.astype(np.float32, copy=False)])
    slide_url = slide or f.attrs.get("slide_url")
    if not slide_url:
        raise ValueError(f"{features} does not record its slide (slide_url); pass --slide")
    ts = tile_size if tile_size else tile_size_from_attrs(f.attrs, f.coords, features)
    if normalize == "auto":
        normalize = "log-minmax" if meta["head"] == "abmil" else "none"
    with open_slide(slide_url) as s:
        thumb = s.get_thumbnail((size, size))
        dims = s.dimensions
        mpp = s.mpp
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


def _heatmap(args: argparse.Namespace) -> int:
    info = heatmap(
        args.model,
        args.features,
        args.out,
        slide=args.slide,
        fold=args.fold,
        task=args.task,
        size=args.size,
        normalize=args.normalize,
        tile_size=args.tile_size,
        cmap=args.cmap,
        geojson=args.geojson,
        mask=args.mask,
        mask_threshold=args.mask_threshold,
    )
    print(f"wrote {args.out}: peak at level-0 {info['peak_level0_xy']}, probs {info['probs']}")
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return {"train": _train, "predict": _predict, "heatmap": _heatmap}[args.mil_command](args)
    except (MILDataError, OSError, ValueError) as e:  # OSError: SlideError and missing files
        print(f"error: {e}", file=sys.stderr)
        return 2
