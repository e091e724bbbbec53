"""Tissue masks: Otsu and the shipped U-Net on real slides and exact-label composites, user masks
(image, GeoJSON), persistence, and the QC command (good and broken slides)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TESTDATA

from pipelines.tissue import iou
from wsi import open_slide
from wsi.tissue import TissueMask, load_user_mask, otsu_mask, resolve_method, tissue_mask

WEIGHTS = REPO / "models" / "weights" / "tissue_unet.safetensors"


@pytest.fixture(scope="module")
def demo_thumb(demo_slide) -> np.ndarray:
    with open_slide(demo_slide) as s:
        return s.get_thumbnail((1024, 1024))


@pytest.fixture(scope="module")
def demo_otsu(demo_slide) -> TissueMask:
    return tissue_mask(demo_slide, method="otsu")


@pytest.fixture(scope="module")
def sources():
    from wsi.tissue import synth as tissue_synth

    return tissue_synth.load_sources(
        tissue_synth.default_source_paths(tissue_synth.testdata_sources(TESTDATA))
    )


def test_otsu_finds_tissue_on_demo(demo_otsu, demo_slide):
    m = demo_otsu
    assert m.method == "otsu"
    assert m.slide_dimensions == (2220, 2967)
    assert max(m.shape) == 1024
    assert m.downsample == pytest.approx(2220 / m.shape[1])
    assert m.mpp == pytest.approx(0.499 * m.downsample, rel=1e-3)
    assert 0.2 < m.area_fraction < 0.6  # a strip of skin on white glass
    h, w = m.shape
    for corner in (
        m.mask[: h // 10, -w // 10 :],
        m.mask[-h // 10 :, : w // 10],
        m.mask[-h // 10 :, -w // 10 :],
    ):
        assert not corner.any()
    # the centre column of the slide is tissue
    assert m.fraction(1000, 1200, 200, 200) > 0.9


def test_black_borders_and_black_background_are_not_tissue(demo_thumb):
    ref = otsu_mask(demo_thumb)
    img = demo_thumb.copy()
    img[:, :50] = 0
    img[:, -40:] = 12
    img[:30] = 5
    rng = np.random.default_rng(0)
    img[-60:] = rng.integers(0, 25, (60, img.shape[1], 3))  # noisy black band
    m = otsu_mask(img)
    assert not m[:, :50].any() and not m[:, -40:].any() and not m[:30].any() and not m[-60:].any()
    inner = (slice(40, -70), slice(60, -50))
    assert iou(m[inner], ref[inner]) > 0.95
    # a whole black background around the glass: only the tissue is found
    framed = np.zeros((1200, 1000, 3), np.uint8)
    framed[88 : 88 + img.shape[0], 117 : 117 + img.shape[1]] = demo_thumb
    fm = otsu_mask(framed)
    assert not fm[:80].any() and not fm[:, :110].any()
    assert iou(fm[88 : 88 + img.shape[0], 117 : 117 + img.shape[1]], ref) > 0.95


def test_otsu_rejects_bad_input():
    with pytest.raises(ValueError, match="RGB uint8"):
        otsu_mask(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="unknown tissue method"):
        resolve_method("magic")


def test_otsu_hysteresis_keeps_pale_edges_but_not_isolated_pale_blobs():
    img = np.full((200, 200, 3), 245, np.uint8)  # white glass
    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(yy - 80, xx - 80)
    img[r < 40] = (220, 180, 200)  # pale rim (saturation 0.18) ...
    img[r < 30] = (180, 80, 140)  # ... around strongly stained tissue (0.56)
    img[(yy - 160) ** 2 + (xx - 160) ** 2 < 15**2] = (220, 180, 200)  # pale blob touching nothing
    rim = (r < 40) & (r >= 31)
    blob = (yy - 160) ** 2 + (xx - 160) ** 2 < 12**2
    plain = otsu_mask(img, hysteresis=1.0)
    hyst = otsu_mask(img)  # default 0.5
    assert plain[r < 28].all() and hyst[r < 28].all()
    assert plain[rim].mean() < 0.2  # a single threshold cuts the pale edge off
    assert hyst[rim].all()  # connected to strong tissue: kept
    assert not hyst[blob].any() and not plain[blob].any()  # pale and alone: not tissue
    with pytest.raises(ValueError, match="hysteresis"):
        otsu_mask(img, hysteresis=0)


def test_auto_method_resolution(tmp_path):
    assert WEIGHTS.exists(), "the tissue U-Net weights ship in models/weights"
    assert resolve_method("auto") == "unet"
    assert resolve_method("auto", weights=tmp_path / "missing.safetensors") == "otsu"
    assert resolve_method("otsu") == "otsu"


# The U-Net on real slides is scored against a full-resolution reference mask, not against Otsu:
# tests/pipelines/tasks/test_tissue_reference.py


def test_unet_beats_otsu_on_pen_marks(sources):
    from wsi.tissue import synth as tissue_synth

    u_ious, o_ious = [], []
    for i in range(3):
        rgb, label, info = tissue_synth.make_pair(
            sources, 4242, i, size=(384, 384), split="heldout", pen=True
        )
        assert info["pen"] and label.any()
        u_ious.append(iou(tissue_mask_array(rgb, "unet"), label))
        o_ious.append(iou(otsu_mask(rgb), label))
    assert np.mean(u_ious) > 0.85
    assert np.mean(u_ious) > np.mean(o_ious) + 0.1


def tissue_mask_array(rgb: np.ndarray, method: str) -> np.ndarray:
    from wsi.tissue import unet_mask

    return unet_mask(rgb) if method == "unet" else otsu_mask(rgb)


def test_composites_are_deterministic_with_exact_labels(sources):
    from wsi.tissue import synth as tissue_synth

    a = tissue_synth.make_pair(sources, 7, 3, size=(128, 160))
    b = tissue_synth.make_pair(sources, 7, 3, size=(128, 160))
    c = tissue_synth.make_pair(sources, 8, 3, size=(128, 160))
    assert a[0].shape == (128, 160, 3) and a[1].shape == (128, 160) and a[1].dtype == bool
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # held-out pieces come from a part of each source the train split never uses
    for s in sources:
        assert not (s.region("train") & s.region("heldout")).any()


def test_mask_save_load_round_trip(demo_otsu, tmp_path):
    p = demo_otsu.save(tmp_path / "demo_mask.png")
    assert p.exists() and Path(str(p) + ".json").exists()
    back = TissueMask.load(p)
    assert np.array_equal(back.mask, demo_otsu.mask)
    assert back.downsample == pytest.approx(demo_otsu.downsample)
    assert back.method == "otsu" and back.slide_dimensions == demo_otsu.slide_dimensions
    assert back.mpp == pytest.approx(demo_otsu.mpp)


def test_fraction_consistency(demo_otsu):
    m = demo_otsu
    W, H = m.slide_dimensions
    d = m.downsample
    # the whole mask in level-0 coordinates is the area fraction
    assert m.fraction(0, 0, m.shape[1] * d, m.shape[0] * d) == pytest.approx(m.area_fraction)
    rng = np.random.default_rng(1)
    xs, ys = rng.uniform(-100, W, 50), rng.uniform(-100, H, 50)
    vec = m.fractions(xs, ys, 300, 300)
    assert np.allclose(vec, [m.fraction(x, y, 300, 300) for x, y in zip(xs, ys)])
    # a mask-pixel-aligned box equals the mean of those mask pixels
    i, j = 300, 200
    assert m.fraction(j * d, i * d, 40 * d, 30 * d) == pytest.approx(m.mask[i : i + 30, j : j + 40].mean())


def test_geojson_user_mask_rasterised_in_place(demo_slide, tmp_path):
    square = [[200, 400], [1200, 400], [1200, 1400], [200, 1400], [200, 400]]
    hole = [[500, 700], [900, 700], [900, 1100], [500, 1100], [500, 700]]
    tri = [[[1600, 2400], [2100, 2400], [1600, 2900], [1600, 2400]]]
    gj = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"classification": {"name": "Tissue"}},
                "geometry": {"type": "Polygon", "coordinates": [square, hole]},
            },
            {"type": "Feature", "properties": {}, "geometry": {"type": "MultiPolygon", "coordinates": [tri]}},
            {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [5, 5]}},
        ],
    }
    path = tmp_path / "user.geojson"
    path.write_text(json.dumps(gj))
    with open_slide(demo_slide) as s:
        m = tissue_mask(s, method="mask", mask_path=path)
    assert m.method == "mask" and m.downsample == 1.0  # fits in 4096 px: level 0 itself
    assert m.fraction(300, 450, 150, 150) == 1.0  # inside the square
    assert m.fraction(600, 800, 200, 200) == 0.0  # inside the hole
    assert m.fraction(1300, 100, 200, 200) == 0.0  # outside
    assert m.fraction(1650, 2450, 100, 100) == 1.0  # inside the triangle
    expected = 1000 * 1000 - 400 * 400 + 500 * 500 / 2
    assert m.tissue_area_level0() == pytest.approx(expected, rel=0.01)
    with open_slide(demo_slide) as s:
        coarse = load_user_mask(s, path, max_side=512)
    assert coarse.downsample == pytest.approx(2967 / 512)
    assert coarse.tissue_area_level0() == pytest.approx(expected, rel=0.03)


def test_image_user_mask_infers_downsample(demo_slide, tmp_path):
    from PIL import Image

    arr = np.zeros((742, 555), np.uint8)  # 2967 x 2220 / 4
    arr[100:200, 50:150] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    with open_slide(demo_slide) as s:
        m = load_user_mask(s, tmp_path / "m.png")
        assert m.downsample == pytest.approx(2220 / 555)
        assert m.fraction(50 * 4 + 8, 100 * 4 + 8, 300, 300) == 1.0
        Image.fromarray(np.zeros((100, 300), np.uint8)).save(tmp_path / "bad.png")
        with pytest.raises(ValueError, match="not proportional"):
            load_user_mask(s, tmp_path / "bad.png")
        with pytest.raises(FileNotFoundError):
            load_user_mask(s, tmp_path / "nope.geojson")


def test_torch_is_imported_by_the_loader_and_the_unet_only(demo_slide):
    """What wsi/__init__.py and ARCHITECTURE.md say: importing wsi and every module but
    wsi.loader leaves torch out, and so does an Otsu mask; the U-Net (the default method) and
    wsi.loader import it."""
    code = """
import sys
import wsi, wsi.annotations, wsi.convert, wsi.data, wsi.io, wsi.openslide, wsi.sampling, wsi.tissue
import wsi.tissue.synth
assert 'torch' not in sys.modules, 'importing wsi imported torch'
m = wsi.tissue_mask(sys.argv[1], method='otsu')
assert 'torch' not in sys.modules, 'an Otsu mask imported torch'
print(m.area_fraction)
u = wsi.tissue_mask(sys.argv[1])
assert u.method == 'unet' and 'torch' in sys.modules, (u.method, 'the default mask is the U-Net')
"""
    r = subprocess.run(
        [sys.executable, "-c", code, str(demo_slide)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert 0.2 < float(r.stdout) < 0.6
    r = subprocess.run(
        [sys.executable, "-c", "import sys, wsi.loader; assert 'torch' in sys.modules"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def test_unet_module_any_size_and_small():
    import torch

    from models.seg.unet import UNet

    net = UNet()
    assert sum(p.numel() for p in net.parameters()) < 3_000_000
    small = UNet(in_channels=3, n_classes=3, depth=3, width=4, norm="group", dropout=0.1).eval()
    with torch.no_grad():
        for h, w in ((37, 50), (8, 8), (64, 64), (5, 130)):
            assert small(torch.rand(2, 3, h, w)).shape == (2, 3, h, w)
    with pytest.raises(ValueError):
        UNet(norm="layer")


def test_shipped_weights_are_safetensors_with_recipe():
    """The recipe beside the shipped weights describes that file (its architecture and parameter
    count agree with the weights themselves); quality is measured, not read back from it."""
    from models.seg import tissue_net

    assert WEIGHTS.stat().st_size < 5 * 2**20
    recipe = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert recipe["command"].startswith("slidestream tissue train")
    state, meta = tissue_net.read_weights(WEIGHTS)
    assert meta["config"] == recipe["config"]
    net = tissue_net.build(meta["config"])
    net.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in net.parameters()) == recipe["parameters"]
    assert meta["recipe"]["steps"] == recipe["steps"] and meta["recipe"]["seed"] == recipe["seed"]
    with pytest.raises(ValueError, match="safetensors"):
        tissue_net.read_weights(WEIGHTS.with_suffix(".json"))


def test_every_job_defaults_to_the_one_tissue_method():
    """One default, stated once (wsi.tissue.DEFAULT_METHOD: the shipped U-Net, Otsu without its
    weights): every config and every function that computes a mask takes it, and no shipped
    YAML overrides it."""
    import inspect

    import yaml
    from conftest import REPO

    from pipelines.embed import EmbedConfig, embed_slides
    from pipelines.pretrain import PretrainConfig
    from pipelines.segment import SegmentPredictConfig, predict_slide
    from pipelines.tissue import TissueQCConfig
    from wsi.loader import SlidePool, TileDataset
    from wsi.tissue import DEFAULT_METHOD, resolve_method

    assert DEFAULT_METHOD == "auto" and resolve_method(DEFAULT_METHOD) == "unet"  # the weights ship
    configs = {
        "PretrainConfig": PretrainConfig().data.tissue_method,
        "EmbedConfig": EmbedConfig().tissue_method,
        "SegmentPredictConfig": SegmentPredictConfig().tissue_method,
        "TissueQCConfig": TissueQCConfig().method,
    }
    functions = {
        f.__qualname__: inspect.signature(f).parameters[p].default
        for f, p in (
            (tissue_mask, "method"),
            (TileDataset, "tissue_method"),
            (SlidePool, "tissue_method"),
            (embed_slides, "tissue_method"),
            (predict_slide, "tissue_method"),
        )
    }
    wrong = {k: v for k, v in {**configs, **functions}.items() if v != DEFAULT_METHOD}
    assert not wrong, wrong
    overridden = []
    for path in sorted((REPO / "pipelines" / "configs").rglob("*.yaml")):
        text = yaml.safe_load(path.read_text())
        for section in (text, text.get("data") or {}):
            if section.get("tissue_method", DEFAULT_METHOD) != DEFAULT_METHOD:
                overridden.append(path.name)
    assert not overridden, overridden
