"""`stain_norm="METHOD:TARGET"` in the online loader: the tiles it yields are the tiles read without
it, normalised by models.stain fitted to the same target; bad specs are refused with the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.stain import stain_normalizer
from wsi.loader import DEMO_REFERENCE, TileDataset, parse_stain_norm, stain_normalizer_from_spec
from wsi.slide import open_slide

TILES = [(x, y) for x in (600, 900, 1200) for y in (800, 1300)]


def _images(demo_slide, **kw) -> torch.Tensor:
    ds = TileDataset(
        [str(demo_slide)],
        mode="grid",
        tiles=[("CMU-1-Small-Region", x, y, 1.0) for x, y in TILES],
        mpps=(1.0,),
        tile_size=64,
        tissue_method=None,
        chunk=4,  # 6 tiles: one full chunk and one partial
        rank=0,
        world_size=1,
        **kw,
    )
    items = sorted(ds, key=lambda it: it["tile"])
    assert [it["tile"] for it in items] == list(range(len(TILES)))
    return torch.stack([it["image"] for it in items])


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_loader_tiles_are_the_read_tiles_normalised(demo_slide, tmp_path, method):
    with open_slide(demo_slide) as s:
        x, y, w, h = DEMO_REFERENCE
        target = np.array(np.asarray(s.read_region((x, y), 0, (w, h)))[..., :3])
    Image.fromarray(target).save(tmp_path / "target.png")
    raw = _images(demo_slide)
    got = _images(demo_slide, stain_norm=f"{method}:{tmp_path / 'target.png'}")
    want = stain_normalizer(method, target)(raw)
    # per-image transforms; batched linear algebra over 4 + 2 tiles vs 6 may differ in the last
    # bits, so by at most 1 after rounding
    assert got.dtype == torch.uint8 and (got.int() - want.int()).abs().max() <= 1
    assert (got.float() - raw.float()).abs().mean() > 1  # it changed the tiles
    demo = _images(demo_slide, stain_norm=f"{method}:demo")  # the same region, built in
    assert torch.equal(demo, got)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("macenko", "expected METHOD:TARGET"),
        ("vahadane:demo", "METHOD one of macenko, reinhard"),
        ("reinhard:", "expected METHOD:TARGET"),
        ("macenko:/no/such/file.png", "no such image file"),
    ],
)
def test_bad_specs_are_refused_with_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        stain_normalizer_from_spec(spec)


def test_a_target_that_is_not_an_image(tmp_path):
    (tmp_path / "t.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image PIL can read"):
        stain_normalizer_from_spec(f"macenko:{tmp_path / 't.png'}")
    assert parse_stain_norm(" Macenko : demo ") == ("macenko", "demo")
