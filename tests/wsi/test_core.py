"""The Slide layer's own logic (bounds, padding, mpp, thumbnails, errors) over the OpenSlide
backend on the real demo slide; the backend conformance suites cover pixels per backend."""

from __future__ import annotations

import threading

import numpy as np
import openslide
import pytest

import wsi
from wsi.slide import box_reduce, resize_rgb


@pytest.fixture
def slide(demo_slide):
    with wsi.open_slide(demo_slide, backend="openslide") as s:
        yield s


def test_openslide_names_match_openslide(slide, demo_slide):
    ref = openslide.OpenSlide(str(demo_slide))
    assert slide.dimensions == ref.dimensions
    assert slide.level_count == ref.level_count
    assert slide.level_dimensions == ref.level_dimensions
    assert slide.level_downsamples == pytest.approx(ref.level_downsamples)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert sorted(slide.associated_images) == sorted(ref.associated_images)
    label = slide.associated_images["label"]
    assert label.dtype == np.uint8 and label.shape[2] == 3
    assert slide.mpp == pytest.approx(0.499)
    assert slide.vendor == "aperio" and slide.backend == "openslide"


def test_read_region_pixels_equal_openslide(slide, demo_slide):
    ref = openslide.OpenSlide(str(demo_slide))
    for loc in [(0, 0), (1000, 1200), (2100, 2900)]:
        got = slide.read_region(loc, 0, (150, 90))
        want = np.asarray(ref.read_region(loc, 0, (150, 90)).convert("RGB"))
        # the region at (2100, 2900) runs past the slide: OpenSlide gives transparent, we give white
        inside_w = min(150, slide.dimensions[0] - loc[0])
        inside_h = min(90, slide.dimensions[1] - loc[1])
        np.testing.assert_array_equal(got[:inside_h, :inside_w], want[:inside_h, :inside_w])
        assert (got[inside_h:] == 255).all() and (got[:, inside_w:] == 255).all()


def test_region_fully_outside_is_white(slide):
    out = slide.read_region((-500, -500), 0, (100, 100))
    assert out.shape == (100, 100, 3) and (out == 255).all()


def test_bad_level_and_size_raise(slide):
    with pytest.raises(wsi.RegionOutOfBoundsError, match="level 3"):
        slide.read_region((0, 0), 3, (10, 10))
    with pytest.raises(wsi.RegionOutOfBoundsError, match="positive"):
        slide.read_region((0, 0), 0, (0, 10))
    with pytest.raises(wsi.RegionOutOfBoundsError, match="larger than"):
        slide.read_region((0, 0), 0, (1 << 15, 1 << 15))


def test_read_region_mpp_footprint_and_antialias(slide):
    # 1.0 µm/px from a 0.499 µm/px level: the footprint is ~2x the output size
    level, box = slide.region_for_mpp((500, 600), (100, 100), 0.998)
    assert level == 0 and box[2:] == (200, 200)
    tile = slide.read_region_mpp((500, 600), (100, 100), 0.998)
    full = slide.read_region((500, 600), 0, (200, 200))
    assert tile.shape == (100, 100, 3)
    # antialiased: equals the 2x2 box mean within rounding of the bilinear filter
    assert np.abs(tile.astype(int) - box_reduce(full, 2).astype(int)).mean() < 2.0
    same = slide.read_region_mpp((500, 600), (64, 64), 0.499)
    np.testing.assert_array_equal(same, slide.read_region((500, 600), 0, (64, 64)))


def test_upsample_policy(slide):
    with pytest.raises(wsi.RegionOutOfBoundsError, match="finest level"):
        slide.read_region_mpp((0, 0), (32, 32), 0.25, allow_upsample=False)
    assert slide.read_region_mpp((0, 0), (32, 32), 0.25).shape == (32, 32, 3)


def test_mpp_override_and_missing(demo_slide):
    with wsi.open_slide(demo_slide, backend="openslide", mpp=0.25) as s:
        assert s.mpp == 0.25 and s.level_mpp(0) == 0.25
    with pytest.raises(ValueError, match="positive"):
        wsi.open_slide(demo_slide, backend="openslide", mpp=-1)


def test_thumbnail_keeps_aspect_and_content(slide):
    th = slide.get_thumbnail((256, 256))
    w, h = slide.dimensions
    assert th.shape[0] == 256 and abs(th.shape[1] - round(256 * w / h)) <= 1
    small = resize_rgb(slide.read_region((0, 0), 0, slide.dimensions), (th.shape[1], th.shape[0]))
    assert np.abs(th.astype(int) - small.astype(int)).mean() < 3.0


def test_closed_slide_raises(demo_slide):
    s = wsi.open_slide(demo_slide, backend="openslide")
    s.close()
    with pytest.raises(wsi.SlideError, match="closed"):
        s.read_region((0, 0), 0, (4, 4))


def test_concurrent_reads_equal_serial(slide):
    locs = [(x, y) for x in range(0, 2000, 400) for y in range(0, 2800, 700)]
    serial = [slide.read_region(loc, 0, (64, 64)) for loc in locs]
    results: dict[int, np.ndarray] = {}

    def work(i0):
        for i in range(i0, len(locs), 2):
            results[i] = slide.read_region(locs[i], 0, (64, 64))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i, ref in enumerate(serial):
        np.testing.assert_array_equal(results[i], ref)
    batch = slide.read_regions(locs, 0, (64, 64), threads=2)
    for got, ref in zip(batch, serial):
        np.testing.assert_array_equal(got, ref)


def test_unknown_backend_and_missing_file(tmp_path, demo_slide):
    with pytest.raises(ValueError, match="unknown backend"):
        wsi.open_slide(demo_slide, backend="nope")
    with pytest.raises(FileNotFoundError):
        wsi.open_slide(tmp_path / "missing.svs")


def test_not_a_slide_is_unsupported(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide at all " * 20)
    with pytest.raises(wsi.UnsupportedSlideError, match="notes.svs"):
        wsi.open_slide(p)
