"""Probes and patch tasks of ``slidestream eval``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.eval_probes import few_shot, knn, linear_probe, metrics_from_scores, summarise
from pipelines.patch_tasks import PatchTask, load_patch_task, save_patch_task_h5


def _clusters(n_per=60, n_classes=7, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per)
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def test_metrics_from_scores_by_hand():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    r = metrics_from_scores(scores, y, 2)
    assert r.top1 == 0.75
    assert r.balanced_accuracy == pytest.approx((1.0 + 2 / 3) / 2)
    assert math.isnan(r.top5)


@pytest.mark.parametrize("probe", ["linear", "knn", "few"])
def test_probes_separate_clusters_and_stay_at_chance_on_noise(probe):
    x, y = _clusters()
    # test points around the same centres (seed 0), drawn with a different noise seed
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(7, 16)) * 3
    rng2 = np.random.default_rng(5)
    tx = np.concatenate([c + 0.3 * rng2.normal(size=(30, 16)) for c in centres])
    ty = np.repeat(np.arange(7), 30)
    run = {
        "linear": lambda a, b, c, d: linear_probe(a, b, c, d, 7, seed=0),
        "knn": lambda a, b, c, d: knn(a, b, c, d, 7),
        "few": lambda a, b, c, d: few_shot(a, b, c, d, 7, shots=5, seed=0),
    }[probe]
    good = run(x, y, tx, ty)
    assert good.top1 > 0.95 and good.top5 > 0.99 and good.macro_f1 > 0.95
    noise_rng = np.random.default_rng(3)
    bad = run(noise_rng.normal(size=x.shape), y, noise_rng.normal(size=tx.shape), ty)
    assert bad.top1 < 0.4  # chance is 1/7


def test_knn_matches_brute_force_vote():
    x, y = _clusters(n_per=10, n_classes=3, spread=2.0)
    q, qy = _clusters(n_per=5, n_classes=3, spread=2.0, seed=2)
    res = knn(x, y, q, qy, 3, k=5, temperature=0.07)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    preds = []
    for v in q / np.linalg.norm(q, axis=1, keepdims=True):
        sims = xn @ v
        nn = np.argsort(-sims)[:5]
        votes = np.zeros(3)
        for i in nn:
            votes[y[i]] += np.exp(sims[i] / 0.07)
        preds.append(votes.argmax())
    assert res.top1 == pytest.approx(float((np.array(preds) == qy).mean()))


def test_summarise_mean_sd():
    s = summarise([{"a": 1.0, "b": math.nan}, {"a": 3.0, "b": math.nan}])
    assert s["a"] == (2.0, 1.0) and all(math.isnan(v) for v in s["b"])


def test_patch_task_folder_and_h5_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, value in (("tumour", 50), ("stroma", 200)):
        (tmp_path / "task" / cls).mkdir(parents=True)
        for i in range(10):
            arr = np.clip(value + rng.normal(0, 5, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "task" / cls / f"{i}.png")
    task = load_patch_task(tmp_path / "task", test_fraction=0.3, seed=0)
    assert task.classes == ["stroma", "tumour"]
    assert len(task.train_labels) == 14 and len(task.test_labels) == 6
    assert sorted(np.bincount(task.test_labels)) == [3, 3]
    h5 = save_patch_task_h5(task, tmp_path / "task.h5")
    back = load_patch_task(h5)
    np.testing.assert_array_equal(back.test_images, task.test_images)
    assert back.classes == task.classes


def test_patch_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_patch_task(tmp_path / "nope")
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least two class folders"):
        load_patch_task(tmp_path / "one")


def test_patch_task_dataclass():
    t = PatchTask(
        "x",
        ["a", "b"],
        np.zeros((2, 4, 4, 3), np.uint8),
        np.array([0, 1]),
        np.zeros((1, 4, 4, 3), np.uint8),
        np.array([1]),
    )
    assert t.n_classes == 2
