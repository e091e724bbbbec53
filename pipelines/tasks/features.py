"""Synthetic MIL feature bags that mean pooling cannot solve, and the mean-pooling shortcut.

:func:`signed_features` draws instance features in which a *target* instance carries ``±scale``
on its first ``bits`` dimensions, each sign drawn at random, where other instances carry standard
normal noise. A target moves its bag's mean by nothing on average (the signs cancel), so a bag's
mean feature vector — what mean pooling keeps — holds no trace of how many targets the bag has;
a head that scores each instance non-linearly before pooling (ABMIL's projection and attention,
noisy-AND's instance classifier) sees them at once (``|x|`` is large). The bag's *spread* does
change: this is a construction against mean pooling, not against every bag statistic.
:func:`mean_pool_baseline` measures the shortcut (logistic regression on each bag's mean);
:func:`mean_pool_oof_auroc` does it on the folds of a cross-validated MIL run.
"""

from __future__ import annotations

import numpy as np


def signed_features(
    is_target: np.ndarray,
    dim: int,
    rng: np.random.Generator,
    *,
    bits: int = 4,
    scale: float = 4.0,
    noise: float = 0.3,
) -> np.ndarray:
    """``(n, dim)`` float32 features for instances with ``is_target (n,)``: standard normal, except
    that targets carry ``±scale`` (random signs, plus ``noise``) on dimensions ``0..bits-1``."""
    is_target = np.asarray(is_target, bool)
    n = len(is_target)
    if dim < bits:
        raise ValueError(f"feature width {dim} < {bits} signed dimensions")
    f = rng.normal(0.0, 1.0, (n, dim))
    signs = rng.choice([-1.0, 1.0], size=(n, bits))
    code = signs * scale + rng.normal(0.0, noise, (n, bits))
    f[:, :bits] = np.where(is_target[:, None], code, f[:, :bits])
    return f.astype(np.float32)


def mean_pool_scores(
    train_bags: list[np.ndarray], train_labels: np.ndarray, test_bags: list[np.ndarray]
) -> np.ndarray:
    """Positive-class scores of the test bags from the shortcut: logistic regression (L2, C = 1,
    standardised inputs) on each bag's mean feature vector."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(np.stack([b.mean(0) for b in train_bags]), np.asarray(train_labels))
    return clf.predict_proba(np.stack([b.mean(0) for b in test_bags]))[:, 1]


def mean_pool_baseline(
    train_bags: list[np.ndarray],
    train_labels: np.ndarray,
    test_bags: list[np.ndarray],
    test_labels: np.ndarray,
) -> float:
    """Test AUROC of the shortcut (:func:`mean_pool_scores`)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(test_labels, mean_pool_scores(train_bags, train_labels, test_bags)))


def mean_pool_oof_auroc(bags: list[np.ndarray], labels: np.ndarray, folds: np.ndarray) -> float:
    """Pooled out-of-fold AUROC of the shortcut (:func:`mean_pool_scores`) on given folds
    (``folds[i]`` = the fold in which bag ``i`` is a test bag), e.g. a MIL run's folds."""
    from sklearn.metrics import roc_auc_score

    labels, folds = np.asarray(labels), np.asarray(folds)
    scores = np.zeros(len(bags))
    for f in np.unique(folds):
        te = folds == f
        train = [b for b, t in zip(bags, te) if not t]
        scores[te] = mean_pool_scores(train, labels[~te], [b for b, t in zip(bags, te) if t])
    return float(roc_auc_score(labels, scores))
