"""Classification metrics for fine-tuning, as pure functions of class probabilities ``probs``
(N, K) (rows sum to 1; scores that are not probabilities are fine for the top-k metrics) and integer
labels ``y`` (N,) in ``0..K-1``; plus the two figures people look at.

- ``top1`` / ``top5``: :func:`top_k_accuracy`, the true class among the k highest scores, with k
  capped at K (so top-5 of a 3-class task is 1.0; :mod:`pipelines.eval_probes` reports NaN there);
- ``balanced_accuracy``: mean recall over the classes present in ``y`` (sklearn's definition);
- ``macro_f1``: mean F1 over all K classes, a class never predicted nor present counting 0 (as
  ``f1_score(labels=range(K), average="macro", zero_division=0)``, the probes' convention);
- ``ece``: expected calibration error (Guo et al. ICML 2017) with :data:`ECE_BINS` = 15
  equal-width confidence bins ``((b−1)/M, b/M]``, confidence = max probability::

      ECE = Σ_b (|B_b| / N)·|acc(B_b) − conf(B_b)|

- per class: precision, recall, F1, support (sklearn's ``precision_recall_fscore_support``);
- :func:`plot_confusion_matrix` and :func:`plot_reliability_diagram` write PNGs through
  ``matplotlib.figure.Figure`` (no pyplot, so the process-wide backend is never switched).

:func:`classification_metrics` gathers one split's numbers as the JSON object of ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi.atomic import atomic_path

ECE_BINS = 15


def _check(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y)
    if scores.ndim != 2 or y.ndim != 1 or len(y) != len(scores):
        raise ValueError(f"need scores (N, K) and labels (N,); got {scores.shape} and {y.shape}")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= scores.shape[1]:
        raise ValueError(f"labels must be integers in 0..{scores.shape[1] - 1}")
    return scores, y


def top_k_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the ``min(k, K)`` highest scores."""
    scores, y = _check(scores, y)
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == y[:, None]).any(1).mean())


def top1(scores: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of ``argmax``."""
    return top_k_accuracy(scores, y, 1)


def top5(scores: np.ndarray, y: np.ndarray) -> float:
    """Top-5 accuracy (k capped at the class count)."""
    return top_k_accuracy(scores, y, 5)


def per_class(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """``precision``, ``recall``, ``f1`` (0 where undefined) and ``support`` per class, (K,) each."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        y, pred, labels=list(range(n_classes)), average=None, zero_division=0
    )
    return {"precision": p, "recall": r, "f1": f, "support": s}


def _balanced(pc: dict[str, np.ndarray]) -> float:
    return float(pc["recall"][pc["support"] > 0].mean())


def _macro_f1(pc: dict[str, np.ndarray]) -> float:
    return float(pc["f1"].mean())


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y``."""
    return _balanced(per_class(y, pred, n_classes))


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean F1 over all ``n_classes`` classes (0 for a class neither present nor predicted)."""
    return _macro_f1(per_class(y, pred, n_classes))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin sample ``count``, ``accuracy`` and mean ``confidence`` (NaN where empty) of
    ``n_bins`` equal-width bins with ``edges`` (n_bins + 1,)."""

    edges: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> ReliabilityBins:
    """Confidence (max probability) and correctness (argmax = label) binned into ``n_bins``
    right-closed equal-width bins ``((b−1)/M, b/M]``."""
    probs, y = _check(probs, y)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    rows = probs.sum(1)
    if probs.min() < 0 or np.abs(rows - 1).max() > 1e-3:
        raise ValueError("calibration needs probabilities (rows of softmax outputs summing to 1), not logits")
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return ReliabilityBins(edges, count, acc, mean_conf)


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``n_bins`` equal-width bins (default 15)."""
    b = reliability_bins(probs, y, n_bins)
    full = b.count > 0
    return float((b.count[full] / b.count.sum() * np.abs(b.accuracy[full] - b.confidence[full])).sum())


def classification_metrics(
    probs: np.ndarray, y: np.ndarray, class_names: list[str] | None = None, n_bins: int = ECE_BINS
) -> dict:
    """One split's ``metrics.json`` object: ``n``, ``top1``, ``top5``, ``balanced_accuracy``,
    ``macro_f1``, ``ece``, ``ece_bins`` and ``per_class`` (``{name: {precision, recall, f1,
    support}}``)."""
    probs, y = _check(probs, y)
    k = probs.shape[1]
    names = [str(i) for i in range(k)] if class_names is None else list(class_names)
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    pred = probs.argmax(1)
    pc = per_class(y, pred, k)
    return {
        "n": int(len(y)),
        "top1": top1(probs, y),
        "top5": top5(probs, y),
        "balanced_accuracy": _balanced(pc),
        "macro_f1": _macro_f1(pc),
        "ece": ece(probs, y, n_bins),
        "ece_bins": int(n_bins),
        "per_class": {
            name: {
                "precision": float(pc["precision"][i]),
                "recall": float(pc["recall"][i]),
                "f1": float(pc["f1"][i]),
                "support": int(pc["support"][i]),
            }
            for i, name in enumerate(names)
        },
    }


def plot_confusion_matrix(
    path: str | Path, y: np.ndarray, pred: np.ndarray, class_names: list[str], title: str = ""
) -> Path:
    """Confusion matrix PNG: rows true class, columns predicted, colour the row fraction (recall),
    each cell annotated with its count (up to 30 classes)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import confusion_matrix

    k = len(class_names)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    side = min(3.0 + 0.45 * k, 16.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                colour = "white" if frac[i, j] > 0.5 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix (n = {int(cm.sum())})")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_reliability_diagram(
    path: str | Path, probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS, title: str = ""
) -> Path:
    """Reliability diagram PNG: accuracy per confidence bin against the diagonal, the gap to it
    shaded, ECE in the title; below, how many samples fall in each bin."""
    from matplotlib.figure import Figure

    b = reliability_bins(probs, y, n_bins)
    centres = (b.edges[:-1] + b.edges[1:]) / 2
    width = 1.0 / n_bins
    full = b.count > 0
    fig = Figure(figsize=(5, 6), dpi=100)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[full], b.accuracy[full], width=width, edgecolor="black", label="accuracy")
    gap = b.confidence[full] - b.accuracy[full]
    ax.bar(
        centres[full],
        gap,
        bottom=b.accuracy[full],
        width=width,
        color="red",
        alpha=0.3,
        edgecolor="red",
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"reliability (ECE {ece(probs, y, n_bins):.3f}, {n_bins} bins)")
    hist.bar(centres, b.count, width=width, color="grey", edgecolor="black")
    hist.set_xlabel("confidence (max probability)")
    hist.set_ylabel("samples")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
