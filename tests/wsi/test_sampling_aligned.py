"""wsi.sampling.aligned: tile-aligned random and grid placement. Boxes are checked through the real
reader's own mapping (Slide.region_for_mpp on real pyramidal TIFFs, one with a non-integer
downsample), so "on the grid" means on the grid the reader decodes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi.sampling import RandomSampler, SlideGeometry, grid_coords, level_grids
from wsi.sampling.aligned import level_box, to_level0
from wsi.slide import open_slide
from wsi.synth import mirror_tile, write_tiff_pyramid

TILE = 224
ENC = 256  # encoded tile side of the fixtures


@pytest.fixture(scope="module")
def slides(tmp_path_factory, demo_pixels) -> dict[str, str]:
    d = tmp_path_factory.mktemp("aligned")
    img = mirror_tile(demo_pixels, (2900, 2500))
    out = {}
    # integer downsamples 1, 4 at 0.25 µm/px
    write_tiff_pyramid(d / "int.svs", img, tile=ENC, downsamples=(1, 4), mpp=0.25)
    out["int"] = str(d / "int.svs")
    # level 1 of 727 x 626 px: downsample (2900/727 + 2500/626) / 2 = 3.9915...
    write_tiff_pyramid(d / "frac.svs", img, tile=ENC, level_sizes=[(2900, 2500), (727, 626)], mpp=0.25)
    out["frac"] = str(d / "frac.svs")
    return out


def _geometry(slide) -> SlideGeometry:
    return SlideGeometry("s", slide.dimensions, slide.mpp, None, None, level_grids(slide))


def test_to_level0_inverts_the_readers_floor():
    rng = np.random.default_rng(0)
    for ds in (1.0, 2.0, 3.991469, 4.0, 4.000237, 16.0, 31.99):
        lx = rng.integers(0, 200_000, 5000)
        x = to_level0(lx, ds)
        assert (np.floor(x / ds).astype(np.int64) == lx).all()
        assert (np.floor((x - 1) / ds).astype(np.int64) < lx).all()  # the smallest such x


@pytest.mark.parametrize("name", ["int", "frac"])
def test_random_aligned_boxes_lie_on_the_encoded_grid(slides, name):
    mpps = (0.25, 0.5, 1.0, 2.0, 0.35)
    with open_slide(slides[name]) as s:
        geo = _geometry(s)
        sampler = RandomSampler(["s"], lambda i: geo, mpps=mpps, tile_size=TILE, aligned=True, seed=1)
        recs = sampler.records(0, 0, 2000)
        per_mpp = {m: 0 for m in mpps}
        for r in recs:
            level, (x, y, w, h) = s.region_for_mpp((r.x, r.y), (TILE, TILE), r.mpp)
            lw, lh = s.level_dimensions[level]
            n = math.ceil(w / ENC)
            assert min(x, y) >= 0 and x + w <= lw and y + h <= lh
            # the box lies inside one block of n x n encoded tiles: it decodes n*n tiles, no more
            assert x // ENC + n - 1 == (x + w - 1) // ENC and y // ENC + n - 1 == (y + h - 1) // ENC
            f = w // TILE
            if f in (2, 4, 8) and w == f * TILE:  # on the reduction's grid: scaled decode applies
                assert x % f == 0 and y % f == 0
            per_mpp[r.mpp] += 1
    assert all(v > 200 for v in per_mpp.values()), per_mpp


def test_random_aligned_covers_every_tile_uniformly_with_uniform_offsets():
    levels = (
        level_grids(
            type(
                "S",
                (),
                {
                    "level_downsamples": (1.0,),
                    "level_dimensions": ((2560, 1792),),
                    "level_tile_sizes": ((ENC, ENC),),
                },
            )()
        )  # fmt: skip
    )
    geo = SlideGeometry("s", (2560, 1792), 0.5, None, None, levels)  # 10 x 7 encoded tiles, no mask
    sampler = RandomSampler(["s"], lambda i: geo, mpps=(0.5,), tile_size=TILE, aligned=True, seed=0)
    recs = sampler.records(0, 0, 70 * 300)
    xy = np.array([(r.x, r.y) for r in recs])
    counts = np.zeros((7, 10), int)
    np.add.at(counts, (xy[:, 1] // ENC, xy[:, 0] // ENC), 1)
    assert (counts > 0).all()  # every tile is reachable
    inner = counts[1:-1, 1:-1]
    # a centre drawn uniformly over the slide snaps to each interior block with equal probability;
    # 300 expected draws per tile: 5 standard deviations is about 30 %
    assert abs(inner.mean() / counts.mean() - 1) < 0.1 and inner.min() > 0.7 * inner.mean()
    off = xy % ENC
    assert off.min() == 0 and off.max() == ENC - TILE  # the whole slack inside the tile is used
    for axis in (0, 1):  # uniform over 0..32: mean 16, each value about 1/33 of the draws
        assert abs(off[:, axis].mean() - 16) < 0.5
        hist = np.bincount(off[:, axis], minlength=33)
        assert hist.min() > 0.7 * len(off) / 33


def test_unaligned_stream_is_unchanged_by_the_option():
    geo = SlideGeometry("s", (4000, 3000), 0.25, None)
    kw = {"mpps": (0.25, 0.5), "tile_size": TILE, "seed": 3}
    a = RandomSampler(["s"], lambda i: geo, **kw).records(0, 0, 300)
    b = RandomSampler(["s"], lambda i: geo, aligned=True, **kw).records(0, 0, 300)  # no levels: unaligned
    assert a == b


@pytest.mark.parametrize("name", ["int", "frac"])
@pytest.mark.parametrize("tile_size, mpp", [(256, 0.25), (128, 0.25), (256, 0.5), (256, 1.0), (128, 2.0)])
def test_grid_aligns_where_the_tile_size_allows(slides, name, tile_size, mpp):
    with open_slide(slides[name]) as s:
        levels = level_grids(s)
        coords = grid_coords(s.dimensions, None, base_mpp=0.25, mpp=mpp, tile_size=tile_size, levels=levels)
        box = level_box(levels, 0.25, mpp, tile_size)
        assert len(coords) > 0
        side = box.side
        for x0, y0 in coords[:: max(1, len(coords) // 200)]:
            level, (x, y, w, h) = s.region_for_mpp((int(x0), int(y0)), (tile_size, tile_size), mpp)
            assert level == box.level and w == side
            if side >= ENC:
                assert x % ENC == 0 and y % ENC == 0  # whole encoded tiles
            else:
                assert ENC % side == 0 and x % side == 0 and x // ENC == (x + w - 1) // ENC
        # every box of the level fits: as many as the plain grid lays (± the level's rounding)
        plain = grid_coords(s.dimensions, None, base_mpp=0.25, mpp=mpp, tile_size=tile_size)
        assert abs(len(coords) - len(plain)) <= 2 * int(math.sqrt(len(plain))) + 2


def test_grid_with_a_tile_size_that_does_not_align_is_the_plain_grid(slides):
    with open_slide(slides["int"]) as s:
        levels = level_grids(s)
        for mpp in (0.25, 0.5):
            a = grid_coords(s.dimensions, None, base_mpp=0.25, mpp=mpp, tile_size=TILE, levels=levels)
            b = grid_coords(s.dimensions, None, base_mpp=0.25, mpp=mpp, tile_size=TILE)
            assert (a == b).all()
