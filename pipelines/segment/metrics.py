"""Segmentation metrics from a confusion matrix: per-class Dice, IoU and MCC (one-vs-rest) and
pixel accuracy. The matrix is summed over batches and over ranks (an all-reduce), so the metrics
of a distributed validation equal those of one process."""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore_index: int = -100
) -> torch.Tensor:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted."""
    valid = target != ignore_index
    idx = target[valid].long() * n_classes + pred[valid].long()
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, list[float]]:
    """Per-class Dice, IoU and MCC (one-vs-rest) from a confusion matrix; NaN for a class with no
    true and no predicted pixels."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1), 0.0)
    mcc = np.where(tp + fp + fn > 0, mcc, np.nan)
    return {
        "dice": [float(v) for v in dice],
        "iou": [float(v) for v in iou],
        "mcc": [float(v) for v in mcc],
        "pixel_accuracy": float(tp.sum() / max(1.0, cm.sum())),
    }
