"""`slidestream embed stain_norm=METHOD:TARGET`: each batch is stain-normalised (models.stain, on the
encoder's device) before the encoder; the features are those of the normalised tiles, the file
records the normalisation, a file embedded otherwise is not reused, and a bad spec is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_close_scaled
from torch import nn

from models.encoders import load_encoder, preprocess
from models.stain import stain_normalizer
from pipelines.cli import main
from pipelines.embed import embed_slides
from pipelines.embed.worker import check_feature_file
from wsi.io import read_features
from wsi.loader import TileDataset
from wsi.loader.stain import reference_pixels

KW = dict(mpp=2.0, tile_size=64, tissue_method="otsu", progress=False, isolation={"enabled": False})


class PixelPool(nn.Module):
    """An 'encoder' whose features are the normalised pixels pooled to 4 x 4: what went in shows."""

    num_features = 48

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_embedding_with_stain_norm_is_the_encoder_on_normalised_tiles(demo_slide, tmp_path, method):
    enc = PixelPool()
    embed_slides([str(demo_slide)], enc, out=tmp_path / "plain", **KW)
    embed_slides([str(demo_slide)], enc, out=tmp_path / "stain", stain_norm=f"{method}:demo", **KW)
    plain = read_features(tmp_path / "plain" / "CMU-1-Small-Region.h5")
    stain = read_features(tmp_path / "stain" / "CMU-1-Small-Region.h5")
    assert np.array_equal(plain.coords, stain.coords) and len(stain) > 10
    assert np.abs(plain.features - stain.features).mean() > 0.01  # normalisation changed the features
    assert stain.attrs["stain_norm"] == f"{method}:demo" and plain.attrs["stain_norm"] == "none"
    assert json.loads(stain.attrs["stain_norm_target"])["method"] == method
    # the same tiles read by the loader, normalised by models.stain fitted to the same target
    ds = TileDataset(
        [str(demo_slide)],
        mode="grid",
        tiles=[("CMU-1-Small-Region", int(x), int(y), 2.0) for x, y in stain.coords],
        mpps=(2.0,),
        tile_size=64,
        tissue_method=None,
        rank=0,
        world_size=1,
    )
    tiles = torch.stack([it["image"] for it in sorted(ds, key=lambda it: it["tile"])])
    e = load_encoder(enc)
    with torch.no_grad():
        want = enc(preprocess(stain_normalizer(method, reference_pixels("demo"))(tiles), e.mean, e.std))
        raw = enc(preprocess(tiles, e.mean, e.std))
    assert_close_scaled(plain.features, raw, rtol=1e-5)
    # batches of 64 vs one batch: per-image transforms; rounding may move a pixel by 1/255
    assert_close_scaled(stain.features, want, rtol=1e-3)
    # a file embedded with another normalisation is not reused
    ok, why, _ = check_feature_file(tmp_path / "stain" / "CMU-1-Small-Region.h5", {"stain_norm": "none"})
    assert not ok and "stain_norm" in why


def test_a_bad_stain_spec_is_one_line(demo_slide, tmp_path, capsys):
    argv = ["embed", "--slides", str(demo_slide), "--encoder", "resnet18", "--out", str(tmp_path)]
    assert main([*argv, "--stain-norm", "macenko:/no/such.png"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("slidestream embed: error: stain_norm target /no/such.png: no such image file")
    assert main([*argv, "stain_norm=sepia"]) == 2
    assert "expected METHOD:TARGET" in capsys.readouterr().err
