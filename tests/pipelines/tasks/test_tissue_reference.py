"""The full-resolution reference tissue mask that scores the thumbnail masks on real slides."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.tasks import DEMO_SLIDE, downsample_mask, reference_tissue_mask


def _disk(h, w, cy, cx, r):
    y, x = np.ogrid[:h, :w]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def test_reference_on_a_slide_with_known_tissue(tmp_path):
    """Glass with dust, a stained piece with a large tear (kept out) and a small gap (filled),
    at 0.5 µm/px: the morphology is in µm."""
    from wsi.synth import write_tiff_pyramid

    rng = np.random.default_rng(0)
    h, w = 1200, 1600
    img = np.clip(rng.normal(236, 3, (h, w, 3)), 0, 255)
    piece = _disk(h, w, 600, 700, 450)
    tear = _disk(h, w, 600, 600, 120)  # 120 µm across: a real hole
    gap = _disk(h, w, 450, 950, 20)  # 20 µm: inside the tissue
    tissue = piece & ~tear & ~gap
    stain = np.array([200, 120, 180]) + rng.normal(0, 15, (h, w, 3))
    img[tissue] = stain[tissue]
    for _ in range(40):  # dust: 2-3 µm dark specks on the glass
        cy, cx = rng.integers(20, h - 20), rng.integers(1300, w - 20)
        img[_disk(h, w, cy, cx, 2)] = 90
    path = tmp_path / "known.tif"
    write_tiff_pyramid(
        path, img.astype(np.uint8), tile=256, downsamples=(1, 4), compression="deflate", mpp=0.5
    )
    mask, ds = reference_tissue_mask(path)
    assert ds == 1.0 and mask.shape == (h, w)
    truth = piece & ~tear
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.98, iou
    assert not mask[:, 1300:].any()  # no dust
    assert mask[gap].all() and not mask[_disk(h, w, 600, 600, 100)].any()
    write_tiff_pyramid(
        tmp_path / "nompp.tif", img[:256, :256].astype(np.uint8), tile=256, downsamples=(1,), mpp=None
    )
    with pytest.raises(ValueError, match="no µm/px"):
        reference_tissue_mask(tmp_path / "nompp.tif")
    assert reference_tissue_mask(tmp_path / "nompp.tif", mpp=0.5)[0].shape == (256, 256)


@pytest.mark.parametrize(
    "rel",
    [None, "histolab/tcga-cr-7395-01a-01-ts1.svs", "histolab/kidney-48-5.tif"],
    ids=["demo", "tcga", "kidney"],
)
def test_unet_and_otsu_against_the_reference_on_real_slides(rel):
    """The thumbnail masks against the full-resolution reference (the test-data slides record no
    µm/px: 1 µm/px is assumed for their reference, as in `slidestream bench tissue`). The kidney
    IHC piece is ~60 x 120 px on the thumbnail: a 1-px edge costs ~0.05 IoU there."""
    from conftest import testdata

    from pipelines.tissue import iou
    from wsi import open_slide
    from wsi.tissue import otsu_mask, unet_mask

    path = DEMO_SLIDE if rel is None else testdata(rel)
    ref, _ = reference_tissue_mask(path, mpp=None if rel is None else 1.0)
    if rel is None:
        assert 0.25 < ref.mean() < 0.5  # the demo slide is about a third tissue
    with open_slide(path) as s:
        thumb = s.get_thumbnail((1024, 1024))
    u = unet_mask(thumb)
    small = downsample_mask(ref, u.shape)
    assert small.shape == u.shape and abs(small.mean() - ref.mean()) < 0.01
    assert u.any() and iou(u, small) >= 0.9
    assert iou(otsu_mask(thumb), small) >= 0.9  # clean slides without pen marks: the baseline does well too
