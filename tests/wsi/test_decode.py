"""wsi.decode and the TIFF backend's decode paths: decode counters, the decoded-tile cache (hits,
misses, bound, read-only entries) and the DCT-domain scaled JPEG decode against decode-then-box-
reduce within the tolerances wsi.decode states, on real-tissue pixels (the demo slide's) written as
Aperio RGB-coded and as ordinary YCbCr JPEG pyramids."""

from __future__ import annotations

import numpy as np
import pytest

from wsi.decode import DecodeStats, TileCache, decode_jpeg_scaled
from wsi.errors import UnreadableTileError
from wsi.limits import HeaderError
from wsi.slide import box_reduce, open_slide
from wsi.synth import mirror_tile, write_tiff_pyramid

#: stated difference of the scaled decode from decode-then-box-average (wsi.decode's docstring):
#: (mean, 99.9th percentile) of |Δ| per channel. A wrong colour transform, offset or scale gives a
#: mean of tens of levels.
TOLERANCE = {"rgb": (0.5, 8), "ycbcr": (2.0, 24)}


@pytest.fixture(scope="module")
def slides(tmp_path_factory, demo_pixels) -> dict[str, str]:
    d = tmp_path_factory.mktemp("decode")
    img = mirror_tile(demo_pixels, (2048, 2048))
    out = {}
    for name, rgb in (("rgb", True), ("ycbcr", False)):
        p = d / f"{name}.svs"
        write_tiff_pyramid(p, img, tile=256, downsamples=(1, 4), mpp=0.25, jpeg_rgb=rgb)
        out[name] = str(p)
    return out


def test_decode_stats_and_pickling():
    import pickle

    s = DecodeStats()
    s.add(2, 100)
    s.count_cache(True)
    s.count_cache(False)
    s.count_cache(False)
    t = pickle.loads(pickle.dumps(s))
    assert t.as_dict() == {"decoded_tiles": 2, "decoded_px": 100, "cache_hits": 1, "cache_misses": 2}
    t.add(1, 5)  # the lock came back too
    assert t.pixels == 105


def test_tile_cache_bound_lru_and_read_only():
    a = [np.full((16, 16, 3), i, np.uint8) for i in range(5)]  # 768 bytes each
    c = TileCache(3 * 768)
    for i in range(3):
        c.put(i, a[i])
    assert c.get(0) is a[0]  # 0 becomes most recent: 1 is evicted next
    c.put(3, a[3])
    assert c.get(1) is None and c.get(2) is a[2] and c.get(3) is a[3]
    assert len(c) == 3 and c.nbytes == 3 * 768 <= c.max_bytes
    assert (c.hits, c.misses) == (3, 1) and c.hit_rate == 0.75
    with pytest.raises(ValueError):
        c.get(0)[0, 0, 0] = 9  # entries are read-only
    c.put("big", np.zeros((64, 64, 3), np.uint8))  # larger than the bound: never kept
    assert c.get("big") is None and c.nbytes <= c.max_bytes
    stats = DecodeStats()
    c.get(2, stats)
    c.get("nope", stats)
    assert (stats.cache_hits, stats.cache_misses) == (1, 1)


@pytest.mark.parametrize("coding", ["rgb", "ycbcr"])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_scaled_tile_decode_within_stated_tolerance(slides, coding, factor):
    with open_slide(slides[coding]) as s:
        raw = s.raw_tiles
        diffs = []
        for tx, ty in [(1, 1), (3, 2), (5, 6), (7, 0)]:
            exact = s.read_region((tx * 256, ty * 256), 0, (256, 256))
            scaled = decode_jpeg_scaled(raw.raw_jpeg_tile(0, tx, ty), factor, (256, 256))
            assert scaled.shape == (256 // factor, 256 // factor, 3)
            diffs.append(np.abs(scaled.astype(int) - box_reduce(exact, factor)).ravel())
    d = np.concatenate(diffs)
    mean, p999 = TOLERANCE[coding]
    assert d.mean() <= mean and np.percentile(d, 99.9) <= p999, (d.mean(), np.percentile(d, 99.9), d.max())


def test_scaled_decode_rejects_bad_factor_and_shape(slides):
    with open_slide(slides["rgb"]) as s:
        stream = s.raw_tiles.raw_jpeg_tile(0, 0, 0)
    with pytest.raises(ValueError, match="factors"):
        decode_jpeg_scaled(stream, 3, (256, 256))
    with pytest.raises(ValueError, match="multiple"):
        decode_jpeg_scaled(stream, 8, (252, 256))
    with pytest.raises(HeaderError, match="256x256"):  # checked before anything is decoded
        decode_jpeg_scaled(stream, 2, (512, 512))


def test_read_regions_mpp_scaled(slides):
    locs = [(512, 768), (1024, 256), (513, 771), (0, 0), (2048 - 448, 2048 - 448)]
    with open_slide(slides["rgb"]) as s:
        exact = s.read_regions_mpp(locs, (224, 224), 0.5)
        before = s.decode_stats.as_dict()["decoded_px"]
        scaled = s.read_regions_mpp(locs, (224, 224), 0.5, scaled=True)
        decoded = s.decode_stats.as_dict()["decoded_px"] - before
        single = s.read_region_mpp(locs[0], (224, 224), 0.5, scaled=True)
    assert (single == scaled[0]).all()
    for i, (a, b) in enumerate(zip(exact, scaled)):
        assert b.shape == (224, 224, 3)
        d = np.abs(a.astype(int) - b)
        if i == 2:  # level corner (513, 771): not on the 2x grid, read exactly
            assert d.max() == 0
        else:
            assert 0 < d.mean() <= TOLERANCE["rgb"][0]
    # 4 on-grid boxes of 448 px at half size (each spans 2x2 or 3x3 tiles of 128 px) + one exact box
    assert decoded < sum(256 * 256 for _ in range(9 * 5)) / 2


def test_tile_cache_on_a_slide(slides):
    locs = [(x, 96) for x in range(0, 1400, 112)]  # overlapping windows: shared encoded tiles
    with open_slide(slides["rgb"]) as s:
        plain = s.read_regions_mpp(locs, (224, 224), 0.25)
        tiles_plain = s.decode_stats.tiles
        s.tile_cache = cache = TileCache(32 << 20)
        cached = s.read_regions_mpp(locs, (224, 224), 0.25, threads=1)  # 2 threads may both miss a tile
        st = s.decode_stats.as_dict()
        one = s.read_region((0, 96), 0, (256, 160))
        one[:] = 0  # a caller writing into what it got must not touch the cache
        again = s.read_region((0, 96), 0, (256, 160))
    assert all((a == b).all() for a, b in zip(plain, cached))
    misses, hits = st["cache_misses"], st["cache_hits"]
    lookups = sum(((x + 223) // 256 - x // 256 + 1) * 2 for x, _ in locs)  # rows 0 and 1 of tiles
    assert hits + misses == lookups
    assert misses == st["decoded_tiles"] - tiles_plain == len(cache)  # each tile decoded once
    assert hits > misses and cache.nbytes <= cache.max_bytes
    assert again.max() > 0


def test_scaled_decode_of_a_damaged_tile_names_the_file(slides, tmp_path):
    import shutil

    import tifffile

    p = tmp_path / "damaged.svs"
    shutil.copy(slides["rgb"], p)
    with tifffile.TiffFile(p) as tf:
        off = tf.pages[0].dataoffsets[9]
    with open(p, "r+b") as f:
        f.seek(off + 2)
        f.write(b"\x00" * 64)  # the header's segments become garbage
    with open_slide(p) as s, pytest.raises(UnreadableTileError, match="damaged.svs"):
        s.read_regions_mpp([(256, 256)], (224, 224), 0.5, scaled=True)
