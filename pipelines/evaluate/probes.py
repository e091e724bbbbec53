"""Frozen-feature probes for patch tasks (eva-style): linear probe with early stopping, kNN
(k = 20, cosine, similarity-weighted votes) and few-shot nearest-centroid (SimpleShot), with the
usual metrics: top-1, top-5, balanced accuracy, macro-F1.

Everything takes plain arrays: ``(train_x, train_y, test_x, test_y)`` with features (N, D) float
and integer labels 0..C-1. Deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score


@dataclass(frozen=True)
class ProbeResult:
    top1: float
    top5: float  # NaN when the task has at most 5 classes (top-5 would be trivially 1)
    balanced_accuracy: float
    macro_f1: float

    def as_dict(self) -> dict[str, float]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
        }


def metrics_from_scores(scores: np.ndarray, y: np.ndarray, n_classes: int) -> ProbeResult:
    """Metrics from class scores (N, C) (higher = more likely) and true labels (N,)."""
    pred = scores.argmax(1)
    top1 = float((pred == y).mean())
    if n_classes > 5:
        top5_idx = np.argsort(-scores, axis=1)[:, :5]
        top5 = float((top5_idx == y[:, None]).any(1).mean())
    else:
        top5 = math.nan
    labels = list(range(n_classes))
    return ProbeResult(
        top1=top1,
        top5=top5,
        balanced_accuracy=float(balanced_accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
    )


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu = train.mean(0, keepdims=True)
    sd = train.std(0, keepdims=True) + 1e-6
    return [(a - mu) / sd for a in (train, *others)]


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    *,
    seed: int = 0,
    max_epochs: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    val_fraction: float = 0.2,
    patience: int = 20,
) -> ProbeResult:
    """A linear layer on standardised frozen features, AdamW, full-batch, early stopping on the
    balanced accuracy of a validation split carved (stratified) from the training set."""
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(len(train_y), bool)
    for c in np.unique(train_y):
        idx = np.flatnonzero(train_y == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 2 else 0
        val_mask[idx[:n_val]] = True
    if val_mask.sum() == 0 or (~val_mask).sum() == 0:
        val_mask[:] = False
    tr_x, va_x, te_x = _standardise(train_x[~val_mask], train_x[val_mask], test_x)
    tr_y, va_y = train_y[~val_mask], train_y[val_mask]
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(tr_x.shape[1], n_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=g)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    xt, yt = torch.as_tensor(tr_x, dtype=torch.float32), torch.as_tensor(tr_y, dtype=torch.long)
    xv = torch.as_tensor(va_x, dtype=torch.float32)
    best, best_state, since = -1.0, None, 0
    for _ in range(max_epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xt), yt)
        loss.backward()
        opt.step()
        if len(va_y):
            with torch.no_grad():
                score = balanced_accuracy_score(va_y, layer(xv).argmax(1).numpy())
            if score > best + 1e-9:
                best, since = score, 0
                best_state = {k: v.clone() for k, v in layer.state_dict().items()}
            else:
                since += 1
                if since >= patience:
                    break
    if best_state is not None:
        layer.load_state_dict(best_state)
    with torch.no_grad():
        scores = layer(torch.as_tensor(te_x, dtype=torch.float32)).numpy()
    return metrics_from_scores(scores, test_y, n_classes)


def _l2n(a: np.ndarray) -> np.ndarray:
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)


def knn(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> ProbeResult:
    """Cosine kNN with similarity-weighted votes (exp(sim / T), as in DINO's evaluation)."""
    tr, te = _l2n(train_x.astype(np.float32)), _l2n(test_x.astype(np.float32))
    k = min(k, len(tr))
    sims = te @ tr.T
    idx = np.argpartition(-sims, kth=k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(sims, idx, axis=1)
    weights = np.exp(top_sims / temperature)
    scores = np.zeros((len(te), n_classes))
    np.add.at(scores, (np.repeat(np.arange(len(te)), k), train_y[idx].ravel()), weights.ravel())
    return metrics_from_scores(scores, test_y, n_classes)


def few_shot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    *,
    shots: int = 5,
    seed: int = 0,
) -> ProbeResult:
    """SimpleShot: ``shots`` random training examples per class, centred on the training mean and
    L2-normalised; each test feature goes to the nearest class centroid."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(n_classes):
        idx = np.flatnonzero(train_y == c)
        if len(idx) == 0:
            continue
        chosen.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    sel = np.concatenate(chosen)
    mean = train_x.mean(0, keepdims=True)
    sx, tx = _l2n(train_x[sel] - mean), _l2n(test_x - mean)
    centroids = np.zeros((n_classes, train_x.shape[1]))
    for c in range(n_classes):
        m = train_y[sel] == c
        if m.any():
            centroids[c] = sx[m].mean(0)
    centroids = _l2n(centroids)
    scores = tx @ centroids.T
    return metrics_from_scores(scores, test_y, n_classes)


class Stat(NamedTuple):
    """A reported figure: the mean of ``n`` measured runs and their sample standard deviation.

    ``sd`` is None when fewer than two runs were measured (no spread is reported: a deterministic
    probe, one seed, one fold); ``over`` names what the runs differ in (``"seeds"``, ``"folds"``,
    ``"run"``)."""

    mean: float
    sd: float | None
    n: int
    over: str

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "—"
        return f"{self.mean:.3f}" if self.sd is None else f"{self.mean:.3f} ± {self.sd:.3f}"


def stat(values: list[float], over: str) -> Stat:
    """:class:`Stat` of measured values (NaN values, e.g. an undefined AUROC, are left out)."""
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return Stat(math.nan, None, 0, over)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v), over)


def summarise(runs: list[dict[str, float]], over: str = "seeds") -> dict[str, Stat]:
    """Each metric over ``runs`` (one dict per run): mean, sample sd when at least two runs
    measured it, and n (NaN-aware)."""
    return {key: stat([r[key] for r in runs], over) for key in runs[0]}
