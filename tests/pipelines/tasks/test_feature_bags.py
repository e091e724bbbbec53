"""Synthetic MIL feature bags (:func:`pipelines.tasks.signed_features`): the construction leaves
the bag mean unchanged, so the mean-pooling shortcut fails while the MIL heads pass, and the
same shortcut solves the old construction (a constant shift), so its failure is the task's doing."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

from pipelines.tasks import mean_pool_baseline, signed_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bags(n_bags: int, rng: np.random.Generator, shift: bool = False):
    bags, labels = [], []
    for i in range(n_bags):
        n = int(rng.integers(20, 40))
        targets = np.zeros(n, bool)
        if i % 2 == 0:
            targets[: max(2, n // 5)] = True
        f = signed_features(targets, 16, rng)
        if shift:  # the old construction: targets shifted by a constant on four dimensions
            f[targets, :4] = np.abs(f[targets, :4])
        bags.append(f)
        labels.append(int(i % 2 == 0))
    return bags, np.array(labels)


def test_signed_features_keep_the_mean_and_mark_targets():
    rng = np.random.default_rng(0)
    t = np.arange(20000) % 5 == 0
    f = signed_features(t, 8, rng)
    assert f.shape == (20000, 8) and f.dtype == np.float32
    # targets: |x| near 4 on the first four dimensions, signs balanced; others standard normal
    assert np.all(np.abs(np.abs(f[t, :4]) - 4.0) < 2.0)
    assert abs(f[t, :4].mean()) < 0.1 and abs(f[~t, :4].mean()) < 0.05
    assert np.mean(f[t, :4] > 0) == pytest.approx(0.5, abs=0.02)
    assert f[~t].std() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="signed dimensions"):
        signed_features(t[:3], 2, rng)


def test_mean_pooling_fails_where_mil_heads_pass():
    from sklearn.metrics import roc_auc_score

    from pipelines.config import load_config
    from pipelines.mil import MILConfig, fit, predict_bags

    rng = np.random.default_rng(1)
    train, ytr = _bags(240, rng)
    test, yte = _bags(200, rng)
    # the shortcut is at chance here, and solves the constant-shift construction
    assert mean_pool_baseline(train, ytr, test, yte) < 0.65
    shifted = (
        _bags(240, np.random.default_rng(1), shift=True),
        _bags(200, np.random.default_rng(2), shift=True),
    )
    assert mean_pool_baseline(*shifted[0], *shifted[1]) > 0.95
    for config in ("abmil.yaml", "noisy-and.yaml"):
        cfg = load_config(MILConfig, REPO / "pipelines" / "configs" / "mil" / config)
        res = fit(cfg, train[:200], {"label": ytr[:200]}, {"label": 2}, train[200:], {"label": ytr[200:]})
        probs, _ = predict_bags(res.model, test)
        auroc = roc_auc_score(yte, probs["label"][:, 1])
        assert auroc > 0.9, config
