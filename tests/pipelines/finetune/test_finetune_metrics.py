"""Fine-tuning classification metrics (pipelines.finetune.metrics): against sklearn and a
confusion-matrix count on random cases, ECE on hand-made cases, and the two figures."""

from __future__ import annotations

import json
import warnings

import matplotlib
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

from pipelines.finetune import (
    ECE_BINS,
    balanced_accuracy,
    classification_metrics,
    ece,
    macro_f1,
    per_class,
    plot_confusion_matrix,
    plot_reliability_diagram,
    top1,
    top5,
    top_k_accuracy,
)


def _case(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet probabilities loosely tied to the labels (so accuracy is neither 0 nor 1)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k)
    alpha = np.ones((n, k))
    alpha[np.arange(n), y] += 2.0
    return np.stack([rng.dirichlet(a) for a in alpha]), y


def _close(a: float, b: float, rtol: float = 1e-12) -> bool:
    return abs(a - b) <= rtol * abs(b) + 1e-15


@pytest.mark.parametrize("k, seed", [(2, 0), (3, 1), (7, 2), (12, 3)])
def test_metrics_match_sklearn(k, seed):
    probs, y = _case(k, 240, seed)
    pred = probs.argmax(1)
    assert _close(top1(probs, y), float((pred == y).mean()))
    assert _close(balanced_accuracy(y, pred, k), balanced_accuracy_score(y, pred))
    assert _close(
        macro_f1(y, pred, k), f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0)
    )
    if k > 2:
        for kk in (2, 5):
            if kk < k:
                want = top_k_accuracy_score(y, probs, k=kk, labels=list(range(k)))
                assert _close(top_k_accuracy(probs, y, kk), want)
    # per class, from the confusion counts
    cm = np.zeros((k, k), int)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(float)
    pc = per_class(y, pred, k)
    prec = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    rec = tp / cm.sum(1)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(k), where=(prec + rec) > 0)
    np.testing.assert_allclose(pc["precision"], prec, rtol=1e-12)
    np.testing.assert_allclose(pc["recall"], rec, rtol=1e-12)
    np.testing.assert_allclose(pc["f1"], f1, rtol=1e-12)
    np.testing.assert_array_equal(pc["support"], cm.sum(1))


def test_top5_caps_k_at_the_class_count():
    probs, y = _case(3, 30, 4)
    assert top5(probs, y) == 1.0
    assert top_k_accuracy(probs, y, 3) == 1.0
    assert top1(probs, y) < 1.0


def test_balanced_accuracy_over_present_classes():
    y = np.array([0, 0, 1, 1, 1, 1])
    pred = np.array([0, 2, 1, 1, 2, 1])  # class 2 predicted, never true
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred has a class y_true lacks
        want = balanced_accuracy_score(y, pred)
    assert _close(balanced_accuracy(y, pred, 3), want)
    assert _close(want, (1 / 2 + 3 / 4) / 2)


def _binary(conf: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Two classes, predicted class 0 with confidence c; label 0 when correct, else 1."""
    probs = np.array([[c, 1 - c] for c in conf])
    return probs, np.array([0 if ok else 1 for ok in correct])


def test_ece_hand_cases():
    # calibrated: of 10 samples at 0.8, 8 are right; of 5 at 0.6, 3 are right
    probs, y = _binary([0.8] * 10 + [0.6] * 5, [True] * 8 + [False] * 2 + [True] * 3 + [False] * 2)
    assert abs(ece(probs, y)) <= 1e-12
    # over-confident: all at 0.9, half right -> 0.4
    probs, y = _binary([0.9] * 10, [True, False] * 5)
    assert _close(ece(probs, y), 0.4)
    # two bins: 4 at 0.95 with 2 right (gap 0.45), 6 at 0.6 all right (gap 0.4)
    probs, y = _binary([0.95] * 4 + [0.6] * 6, [True, True, False, False] + [True] * 6)
    assert _close(ece(probs, y), 0.4 * 0.45 + 0.6 * 0.4)
    # one bin pools them: |0.8 accuracy - 0.74 mean confidence|
    assert _close(ece(probs, y, n_bins=1), 0.06, rtol=1e-9)
    assert ECE_BINS == 15


def test_ece_refuses_logits():
    with pytest.raises(ValueError, match="probabilities"):
        ece(np.array([[2.0, -1.0], [0.5, 0.1]]), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        top1(np.array([[0.5, 0.5]]), np.array([2]))


def test_classification_metrics_object():
    probs, y = _case(4, 80, 5)
    m = classification_metrics(probs, y, ["tumour", "stroma", "fat", "debris"])
    assert set(m) == {"n", "top1", "top5", "balanced_accuracy", "macro_f1", "ece", "ece_bins", "per_class"}
    assert m["n"] == 80 and m["top5"] == 1.0 and m["ece_bins"] == ECE_BINS
    assert _close(m["ece"], ece(probs, y))
    assert list(m["per_class"]) == ["tumour", "stroma", "fat", "debris"]
    assert sum(c["support"] for c in m["per_class"].values()) == 80
    json.dumps(m, allow_nan=False)


def test_plots_are_written_and_readable(tmp_path):
    backend = matplotlib.get_backend()
    probs, y = _case(5, 120, 6)
    names = [f"class {i}" for i in range(5)]
    cm = plot_confusion_matrix(tmp_path / "confusion.png", y, probs.argmax(1), names)
    rd = plot_reliability_diagram(tmp_path / "reliability.png", probs, y)
    for path in (cm, rd):
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
        assert arr.shape[0] >= 300 and arr.shape[1] >= 300
        assert arr.std() > 10  # drawn, not blank
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert matplotlib.get_backend() == backend
