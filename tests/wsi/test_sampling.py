"""wsi.sampling: grid coverage and sharding, random determinism, tissue rejection, mpp policy."""

from __future__ import annotations

import numpy as np
import pytest

from wsi.sampling import (
    RandomSampler,
    SlideGeometry,
    TileRecord,
    grid_coords,
    grid_records,
    iter_grid,
    level_grids,
    shard_index,
    usable_mpps,
)
from wsi.tissue import TissueMask


def half_mask(w: int, h: int, ds: float = 16.0) -> TissueMask:
    """Tissue in the left half of a (w, h) level-0 slide, mask at downsample ``ds``."""
    m = np.zeros((int(h / ds), int(w / ds)), bool)
    m[:, : m.shape[1] // 2] = True
    return TissueMask(m, ds, slide_dimensions=(w, h))


def test_grid_coords_row_major_footprint_and_stride():
    c = grid_coords((1000, 700), None, base_mpp=0.5, mpp=1.0, tile_size=100)
    # level-0 footprint 200 px: 5 columns (0..800), 3 rows (0..400)
    assert c.dtype == np.int64 and c.shape == (15, 2)
    assert c[:5, 0].tolist() == [0, 200, 400, 600, 800] and set(c[:5, 1]) == {0}
    assert c[5:10, 1].tolist() == [200] * 5
    assert (c[:, 0] + 200 <= 1000).all() and (c[:, 1] + 200 <= 700).all()
    ov = grid_coords((1000, 700), None, base_mpp=0.5, mpp=1.0, tile_size=100, overlap=50)
    assert ov[:3, 0].tolist() == [0, 100, 200] and len(ov) == 9 * 6
    st = grid_coords((1000, 700), None, base_mpp=0.5, mpp=1.0, tile_size=100, stride=150)
    assert st[:3, 0].tolist() == [0, 300, 600]
    recs = grid_records("s", (1000, 700), None, base_mpp=0.5, mpp=1.0, tile_size=100)
    assert recs[1] == TileRecord("s", 200, 0, 200.0, 1.0, 100)
    with pytest.raises(ValueError, match="stride"):
        grid_coords((1000, 700), None, base_mpp=0.5, mpp=1.0, tile_size=100, overlap=100)


def test_grid_min_tissue_keeps_only_tissue():
    mask = half_mask(2048, 1024)
    c = grid_coords((2048, 1024), mask, base_mpp=0.5, mpp=0.5, tile_size=256, min_tissue=0.5)
    assert len(c) == 4 * 4  # the 4 left columns of 8, all 4 rows
    assert (c[:, 0] + 256 <= 1024).all()
    f = mask.fractions(c[:, 0], c[:, 1], 256, 256)
    assert (f >= 0.5).all()
    assert len(grid_coords((2048, 1024), mask, base_mpp=0.5, mpp=0.5, tile_size=256, min_tissue=0.0)) == 32


def _geos() -> list[SlideGeometry | None]:
    return [
        SlideGeometry("a", (3000, 2000), 0.25, half_mask(3000, 2000)),
        None,  # a slide that could not be opened
        SlideGeometry("b", (1500, 1700), 0.5, None),
        SlideGeometry("c", (900, 900), 1.0, None),  # too coarse for 0.5 µm/px without upsampling
    ]


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2)])
def test_grid_shards_cover_every_tile_exactly_once(world_size, num_workers):
    kw = dict(mpps=(0.5, 1.0), tile_size=64, min_tissue=0.4)
    full = [r for _, r in iter_grid(_geos(), **kw)]
    assert len(full) > 100 and len(set(full)) == len(full)
    assert {r.slide_id for r in full if r.mpp == 0.5} == {"a", "b"}  # c skipped at 0.5 (policy)
    seen: list[TileRecord] = []
    sizes = []
    for rank in range(world_size):
        for w in range(num_workers):
            shard, n = shard_index(rank, world_size, w, num_workers)
            mine = list(iter_grid(_geos(), shard=shard, num_shards=n, **kw))
            assert [k for k, _ in mine] == list(range(len(mine)))
            seen.extend(r for _, r in mine)
            sizes.append(len(mine))
            # resume: starting at k gives exactly the tail
            k = len(mine) // 3
            assert [r for _, r in iter_grid(_geos(), shard=shard, num_shards=n, start=k, **kw)] == [
                r for _, r in mine[k:]
            ]
    assert sorted(seen, key=full.index) == full  # every tile once
    assert max(sizes) - min(sizes) <= 1


def test_usable_mpps_policy():
    assert usable_mpps(0.5, (0.25, 0.5, 1.0), upsample=False) == [1, 2]
    assert usable_mpps(0.5, (0.25, 0.5, 1.0), upsample=True) == [0, 1, 2]
    assert usable_mpps(0.2501, (0.25,), upsample=False) == [0]  # within tolerance


def _sampler(geos, **kw):
    return RandomSampler([g.slide_id for g in geos], lambda i: geos[i], **kw)


def test_random_deterministic_sharded_and_resumable():
    geos = [g for g in _geos() if g is not None]
    a = _sampler(geos, seed=3).records(epoch=0, shard=0, n=300)
    b = _sampler(geos, seed=3).records(epoch=0, shard=0, n=300)
    assert a == b and len(a) == 300
    assert _sampler(geos, seed=3).records(0, 1, 300) != a  # another shard
    assert _sampler(geos, seed=3).records(1, 0, 300) != a  # another epoch
    assert _sampler(geos, seed=4).records(0, 0, 300) != a  # another seed
    s = _sampler(geos, seed=3)
    assert s.records(0, 0, 100, start=137) == a[137:237]


def test_random_tiles_inside_tissue_and_multi_mpp():
    g = SlideGeometry("a", (8192, 4096), 0.25, half_mask(8192, 4096))
    recs = _sampler([g], mpps=(0.25, 0.5, 1.0, 2.0), min_tissue=0.6, seed=0).records(0, 0, 2000)
    assert {r.mpp for r in recs} == {0.25, 0.5, 1.0, 2.0}
    for r in recs[:200]:
        assert r.size0 == pytest.approx(224 * r.mpp / 0.25)
        assert g.mask.fraction(r.x, r.y, r.size0, r.size0) >= 0.6
        assert r.x >= 0 and r.x + r.size0 <= 8192 + 1e-6 and r.y + r.size0 <= 4096 + 1e-6
    xs = np.array([r.x + r.size0 / 2 for r in recs])
    assert xs.max() < 4096 + 0.4 * 224 * 8  # centres in the tissue half (up to 40 % background)
    # uniform over tissue: left/right quarters of the tissue half are equally likely at 0.25 µm/px
    small = np.array([r.x for r in recs if r.mpp == 0.25])
    lo, hi = (small < 2048).mean(), ((small >= 2048) & (small < 4096)).mean()
    assert abs(lo - hi) < 0.12


def test_random_mpp_weights_policy_and_area_weighting():
    g_fine = SlideGeometry("fine", (4000, 4000), 0.25, None)
    g_coarse = SlideGeometry("coarse", (2000, 2000), 1.0, None)  # cannot serve 0.25/0.5 without upsampling
    recs = _sampler([g_fine, g_coarse], mpps=(0.25, 0.5, 1.0), seed=1).records(0, 0, 1500)
    assert all(r.mpp == 1.0 for r in recs if r.slide_id == "coarse")
    assert {r.mpp for r in recs if r.slide_id == "fine"} == {0.25, 0.5, 1.0}
    up = _sampler([g_fine, g_coarse], mpps=(0.25, 0.5, 1.0), upsample=True, seed=1).records(0, 0, 1500)
    assert {r.mpp for r in up if r.slide_id == "coarse"} == {0.25, 0.5, 1.0}
    only = _sampler([g_fine], mpps=(0.25, 0.5, 1.0), mpp_weights=(0, 1, 0)).records(0, 0, 100)
    assert {r.mpp for r in only} == {0.5}
    # area weighting: 'big' has 4x the tissue area (µm²) of 'small'
    big = SlideGeometry("big", (4000, 4000), 0.5, None)
    small = SlideGeometry("small", (2000, 2000), 0.5, None)
    recs = _sampler([big, small], mpps=(0.5,), slide_weighting="area").records(0, 0, 2000)
    frac = np.mean([r.slide_id == "big" for r in recs])
    assert 0.75 < frac < 0.85
    uni = _sampler([big, small], mpps=(0.5,)).records(0, 0, 2000)
    assert 0.45 < np.mean([r.slide_id == "big" for r in uni]) < 0.55


def test_random_sampler_rejects_bad_arguments_and_unusable_slides():
    g = SlideGeometry("c", (900, 900), 1.0, None)
    with pytest.raises(ValueError, match="none of the 1 slides"):
        _sampler([g], mpps=(0.25,)).records(0, 0, 10)
    with pytest.raises(ValueError, match="mpp_weights"):
        _sampler([g], mpps=(0.25, 1.0), mpp_weights=(1,))
    with pytest.raises(ValueError, match="slide_weighting"):
        _sampler([g], slide_weighting="big")


@pytest.mark.parametrize("aligned", [False, True])
def test_blocks_drawn_together_equal_blocks_drawn_one_by_one(aligned):
    """The sampler places several candidate blocks in one vectorised pass; each block keeps its own
    generator, so the records (and hence every stream and resume point) are those of one block at
    a time, whatever the grouping."""
    grid = type(
        "S", (), {"level_downsamples": (1.0, 4.0), "level_dimensions": ((3000, 2000), (750, 500)),
                  "level_tile_sizes": ((256, 256), (256, 256))},
    )()  # fmt: skip
    geos = [
        SlideGeometry("a", (3000, 2000), 0.25, half_mask(3000, 2000), None, level_grids(grid)),
        SlideGeometry("b", (1500, 1700), 0.5, None),
    ]
    s = _sampler(geos, seed=7, mpps=(0.25, 0.5, 1.0), tile_size=256, min_tissue=0.95, aligned=aligned)
    one = [s.block_records(2, 1, b) for b in range(9)]
    assert sum(map(len, one)) > 300 and len({len(r) for r in one}) > 1  # the tissue test rejects some
    for group in ([0, 1, 2, 3], [4, 5], [6, 7, 8], [8, 0, 4]):
        assert s.blocks_records(2, 1, group) == [one[b] for b in group]
    stream = [r for _, r in s.iter(2, 1, stop=sum(map(len, one[:6])))]
    assert stream == [r for blk in one[:6] for r in blk]
