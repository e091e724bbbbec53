"""Slide-level metrics for MIL: AUROC (one-vs-rest for several classes), balanced accuracy and F1
(positive class for binary tasks, macro otherwise), bootstrap 95% intervals, ROC curves as PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from wsi.atomic import atomic_path, atomic_write_text

from ..training.metrics import json_safe

METRICS = ("auroc", "balanced_accuracy", "f1")


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    n_classes = p.shape[1]
    if len(np.unique(y)) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1]))
    present = np.unique(y)
    if len(present) < n_classes:  # one-vs-rest over the classes present
        aucs = [roc_auc_score(y == c, p[:, c]) for c in present]
        return float(np.mean(aucs))
    q = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
    return float(roc_auc_score(y, q, multi_class="ovr", labels=list(range(n_classes))))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (sklearn's definition, without its warning
    when ``y`` holds one class)."""
    if len(y) == 0:
        return float("nan")
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def point_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUROC, balanced accuracy and F1 of predictions ``argmax(probs)`` against labels ``y``."""
    from sklearn.metrics import f1_score

    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1)
    n_classes = probs.shape[1]
    if n_classes == 2:
        f1 = f1_score(y, pred, pos_label=1, average="binary", zero_division=0)
    else:
        f1 = f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0)
    return {"auroc": _auroc(y, probs), "balanced_accuracy": _balanced_accuracy(y, pred), "f1": float(f1)}


def bootstrap_ci(
    y: np.ndarray, probs: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (resampling slides) of each metric; resamples holding one
    class only are skipped for AUROC."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    vals: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        for k, v in point_metrics(y[idx], probs[idx]).items():
            if not math.isnan(v):
                vals[k].append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v else (float("nan"),) * 2
        for k, v in vals.items()
    }


def metrics_with_ci(y: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """``{metric: value, metric_ci95: [lo, hi], n: ...}``."""
    out: dict = dict(point_metrics(y, probs))
    if n_boot > 0:
        for k, (lo, hi) in bootstrap_ci(y, probs, n_boot, seed).items():
            out[f"{k}_ci95"] = [lo, hi]
    out["n"] = int(len(y))
    return out


def summarize_folds(fold_metrics: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and sample sd of each metric over folds (NaN folds left out); the sd is NaN (null in
    JSON) when fewer than two folds measured the metric: no spread is invented."""
    out = {}
    for k in METRICS:
        v = np.array([m[k] for m in fold_metrics if not math.isnan(m[k])], dtype=np.float64)
        out[k] = {
            "mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "n_folds": int(len(v)),
        }
    return out


def write_metrics(
    out_dir: Path, task: str, folds: list[dict], pooled: dict, summary: dict
) -> tuple[Path, Path]:
    """``metrics.json`` (per fold, pooled out-of-fold, mean ± sd) and ``metrics.csv`` (one row per
    fold plus ``mean``, ``sd`` and ``pooled`` rows) for one task."""
    suffix = "" if task == "label" else f"_{task}"
    jpath = out_dir / f"metrics{suffix}.json"
    atomic_write_text(
        jpath,
        json.dumps(json_safe({"task": task, "folds": folds, "pooled": pooled, "summary": summary}), indent=2),
    )
    cpath = out_dir / f"metrics{suffix}.csv"
    cols = ["fold", "n", *METRICS, *(f"{m}_ci95_lo" for m in METRICS), *(f"{m}_ci95_hi" for m in METRICS)]
    with atomic_path(cpath) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)

        def row(name, m):
            ci = [m.get(f"{k}_ci95", [float("nan")] * 2) for k in METRICS]
            return [
                name,
                m.get("n", ""),
                *(f"{m[k]:.4f}" for k in METRICS),
                *(f"{c[0]:.4f}" for c in ci),
                *(f"{c[1]:.4f}" for c in ci),
            ]

        for i, m in enumerate(folds):
            w.writerow(row(str(i), m))
        w.writerow(["mean", "", *(f"{summary[k]['mean']:.4f}" for k in METRICS)] + [""] * 6)
        w.writerow(["sd", "", *(f"{summary[k]['sd']:.4f}" for k in METRICS)] + [""] * 6)
        w.writerow(row("pooled", pooled))
    return jpath, cpath


def plot_roc(
    path: Path, curves: list[tuple[str, np.ndarray, np.ndarray]], title: str, classes: list[str]
) -> Path:
    """ROC curves (positive class for binary, one-vs-rest micro for several) of each
    ``(name, y, probs)`` into one PNG."""
    from matplotlib.figure import Figure
    from sklearn.metrics import auc, roc_curve

    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    for name, y, p in curves:
        if len(np.unique(y)) < 2:
            continue
        if p.shape[1] == 2:
            fpr, tpr, _ = roc_curve(y, p[:, 1])
        else:
            onehot = np.eye(p.shape[1])[y]
            fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
        ax.plot(fpr, tpr, lw=2 if name == "pooled" else 1, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(
        f"true positive rate ({classes[1]!s})" if len(classes) == 2 else "true positive rate (micro)"
    )
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
