"""Digit bags: the MNIST-bag known-answer task of MIL (Ilse et al., Kraus et al.) on
scikit-learn's bundled 8×8 digits. A bag of 12–30 digit images is positive when it holds at least
``k`` images of the target digit; negatives hold fewer. Instance labels are known, so a head's
attention (or instance scores) can be checked against them (:func:`top_instance_precision`)."""

from __future__ import annotations

import numpy as np


def digit_bags(
    n_bags: int,
    *,
    target: int = 0,
    k: int = 1,
    size: tuple[int, int] = (12, 30),
    half: int = 0,
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """``(bags, bag_labels, instance_is_target)`` from one half (``half`` 0 or 1) of the digits.

    Half the bags are positive: they hold ``k``…``k+2`` target digits (at most half the bag);
    negatives hold ``0``…``k-1``. Bag sizes are uniform in ``size`` (inclusive), at least ``2k+2``.
    Features are the 64 pixel intensities scaled to [0, 1].
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target
    order = np.random.default_rng(1234).permutation(len(y))  # fixed split of the images
    idx = order[half::2]
    tgt, other = idx[y[idx] == target], idx[y[idx] != target]
    rng = np.random.default_rng(seed)
    bags, labels, inst = [], [], []
    for i in range(n_bags):
        n = max(2 * k + 2, int(rng.integers(size[0], size[1] + 1)))
        pos = i % 2 == 0
        m = int(rng.integers(k, min(k + 2, n // 2) + 1)) if pos else int(rng.integers(0, k))
        chosen = np.concatenate([rng.choice(tgt, m, replace=False), rng.choice(other, n - m, replace=False)])
        chosen = rng.permutation(chosen)
        bags.append(x[chosen])
        labels.append(int(pos))
        inst.append(y[chosen] == target)
    perm = rng.permutation(n_bags)
    return [bags[i] for i in perm], np.array(labels)[perm], [inst[i] for i in perm]


def top_instance_precision(scores: list[np.ndarray], labels: np.ndarray, inst: list[np.ndarray]) -> float:
    """Over positive bags: fraction of the top-m scored instances that are targets (m = number of
    targets in the bag)."""
    hit = tot = 0
    for s, yb, t in zip(scores, labels, inst):
        if yb != 1:
            continue
        m = int(t.sum())
        top = np.argsort(-s, kind="stable")[:m]
        hit += int(t[top].sum())
        tot += m
    return hit / max(tot, 1)
