"""Known-answer tasks from the demo slide's tissue types: the map, colour matching that leaves only
morphology, spatially separated splits, the segmentation composites and the tissue-type probe —
each shown to defeat its colour shortcut."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.tasks import (
    DEMO_SLIDE,
    TISSUE_TYPES,
    build_tissue_type_task,
    colour_reference,
    colour_statistics,
    match_colours,
    tissue_type_map,
)


def test_match_colours_keeps_luminance_order_and_takes_the_reference_colours():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ref = colour_reference([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)], 24 * 32, seed=1)
    out = match_colours(img, ref)
    assert out.shape == img.shape and out.dtype == np.uint8
    # the same multiset of colours as the reference
    key = lambda a: np.sort(a.reshape(-1, 3).astype(np.int64) @ [65536, 256, 1])  # noqa: E731
    np.testing.assert_array_equal(key(out), key(ref))
    # brighter input pixels get reference colours at least as bright
    luma = np.array([0.299, 0.587, 0.114])
    order = np.argsort(img.reshape(-1, 3) @ luma, kind="stable")
    assert np.all(np.diff(out.reshape(-1, 3)[order] @ luma) >= -1e-9)
    # a reference of another size is resampled by rank
    assert match_colours(img, ref[::3]).shape == img.shape


def test_tissue_type_map_of_the_demo_slide():
    from skimage.color import rgb2hed

    from wsi import open_slide

    tmap = tissue_type_map()
    assert tmap is tissue_type_map(DEMO_SLIDE)  # kept for the process
    assert tmap.classes == TISSUE_TYPES and tmap.mpp == 1.0
    frac = [(tmap.labels == c).mean() for c in range(3)]
    # stroma, epithelium, dense-nuclear: each a real share of the slide (checked by eye: see module)
    assert all(0.02 < f < 0.25 for f in frac), frac
    with open_slide(DEMO_SLIDE) as s:
        rgb = s.read_region_mpp((0, 0), tmap.labels.shape[::-1], 1.0)
    h = rgb2hed(rgb)[..., 0]
    dens = [h[tmap.labels == c].mean() for c in range(3)]
    assert dens[0] < dens[1] < dens[2], dens  # ordered by haematoxylin density
    # fractions() of a box agrees with counting the map's pixels
    d = tmap.downsample
    box = tmap.labels[400:464, 500:564]
    np.testing.assert_allclose(
        tmap.fractions(500 * d, 400 * d, 64 * d), [(box == c).mean() for c in range(3)]
    )


def test_training_and_test_tiles_never_touch():
    from pipelines.tasks.tissue_types import sample_tissue_tiles

    tmap = tissue_type_map()
    rng = np.random.default_rng(0)
    size0, block0 = 64.0, 320.0
    tr = sample_tissue_tiles(tmap, per_class=80, size0=size0, test=False, block0=block0, rng=rng)
    te = sample_tissue_tiles(tmap, per_class=80, size0=size0, test=True, block0=block0, rng=rng)
    assert {c for *_, c in tr} == {c for *_, c in te} == {0, 1, 2}
    a, b = np.array([t[:2] for t in tr], float), np.array([t[:2] for t in te], float)
    gap = np.maximum(np.abs(a[:, None, 0] - b[None, :, 0]), np.abs(a[:, None, 1] - b[None, :, 1])) - size0
    assert gap.min() >= 2 * size0 / 4 - 1  # the block margins on both sides
    for x, y, c in tr[:20]:
        assert tmap.fractions(x, y, size0)[c] >= 0.8


def test_tissue_type_task_defeats_colour_statistics():
    """With natural colours the three types are told apart by colour statistics alone; matched,
    every tile has the same colour histogram and the same classifier is at chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = {}
    for colour in ("natural", "matched"):
        task = build_tissue_type_task(colour=colour, per_class=90)
        assert task.classes == TISSUE_TYPES
        assert np.bincount(task.test_labels).min() >= 20 and np.bincount(task.train_labels).min() >= 40
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        clf.fit(colour_statistics(task.train_images), task.train_labels)
        pred = clf.predict(colour_statistics(task.test_images))
        scores[colour] = balanced_accuracy_score(task.test_labels, pred)
        if colour == "matched":
            sorted_px = np.sort(task.test_images.reshape(len(task.test_images), -1, 3).sum(-1), axis=1)
            assert np.all(sorted_px == sorted_px[0])  # one colour multiset for every tile
    assert scores["natural"] > 0.8, scores
    assert scores["matched"] < 0.45, scores  # chance is 1/3


def test_exact_label_composites_defeat_a_pixel_colour_classifier(tmp_path):
    from PIL import Image

    from pipelines.tasks import TASK_CLASSES, make_exact_label_task, pixel_colour_baseline

    train = make_exact_label_task(tmp_path / "train", seed=0, size=(384, 384))
    val = make_exact_label_task(tmp_path / "val", seed=1000, size=(384, 384), heldout=True)
    assert TASK_CLASSES == ["background", "stroma", "epithelium"] and val["heldout"]
    with Image.open(train["labels"]) as im:
        assert set(np.unique(np.asarray(im))) == {0, 1, 2}
    # the best per-pixel colour lookup of the training composite: glass yes, stroma vs epithelium no
    dice = pixel_colour_baseline(train, val)
    assert dice[0] > 0.95 and max(dice[1:]) < 0.65, dice


@pytest.mark.slow
def test_random_encoder_reads_morphology_where_colour_statistics_fail():
    """The probe task is learnable from morphology: even a random-init ViT beats colour statistics."""
    from models.encoders import load_encoder
    from pipelines.evaluate import extract_features
    from pipelines.evaluate.probes import linear_probe

    task = build_tissue_type_task()
    enc = load_encoder("vit_tiny_patch16_224", "cpu")
    tr, te = extract_features(enc, task.train_images), extract_features(enc, task.test_images)
    vit = linear_probe(tr, task.train_labels, te, task.test_labels, 3, seed=0).as_dict()["balanced_accuracy"]
    col = linear_probe(colour_statistics(task.train_images), task.train_labels,
                       colour_statistics(task.test_images), task.test_labels, 3, seed=0)  # fmt: skip
    assert vit > col.as_dict()["balanced_accuracy"] + 0.15, (vit, col)
