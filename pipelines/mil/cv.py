"""Cross-validated MIL training (``slidestream mil train``): folds over patients, one model per
fold, out-of-fold predictions pooled into one set of metrics with bootstrap intervals, ROC curves,
and the run directory. Under torchrun fold ``k`` trains on rank ``k mod world_size`` and rank 0
writes the run (the same models and metrics as one process)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from wsi.atomic import atomic_path

from ..config import write_config
from ..errors import InputError
from ..training import DistInfo, all_gather_objects
from .config import MILConfig
from .data import MILDataset, report_skips
from .metrics import metrics_with_ci, plot_roc, summarize_folds, write_metrics
from .model import predict_bags, save_model_dir
from .train import fit, make_folds


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
                raise InputError(
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
    write_config(cfg, out / "config.yaml")
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
