"""``slidestream mil heatmap``: instance scores drawn at the right place, scale and orientation on
the real demo slide, GeoJSON in level-0 coordinates, and the mask with its sidecar."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from pipelines.cli import main as cli
from pipelines.mil.draw import geojson, rasterize
from pipelines.tasks import signed_features
from wsi.io import FeatureWriter
from wsi.tissue import TissueMask

D = 8
TILE = 256
RECT = (
    1280,
    512,
    2048,
    1280,
)  # level-0 x0, y0, x1, y1 of the "positive" region (3 x 3 tiles, upper right, portrait slide)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grid(W=2220, H=2967):
    xs, ys = np.meshgrid(np.arange(0, W, TILE), np.arange(0, H, TILE))
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


def _in_rect(coords):
    return (
        (coords[:, 0] >= RECT[0])
        & (coords[:, 0] < RECT[2])
        & (coords[:, 1] >= RECT[1])
        & (coords[:, 1] < RECT[3])
    )


def write_features(path: Path, positive: bool, rng, slide: Path) -> np.ndarray:
    coords = _grid()
    # targets (the tiles in RECT of positives) leave the bag mean unchanged: signed_features
    f = signed_features(_in_rect(coords) & positive, D, rng)
    with FeatureWriter(
        path, D, {"mpp": 0.499, "tile_size_px": TILE, "tile_size_level0": TILE, "slide_url": str(slide)}
    ) as w:
        w.append(f, coords)
    return coords


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_slide):
    """Two trained model dirs (noisy-AND and ABMIL) on bags whose positives light up RECT."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("mil_heatmap")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(32):
        write_features(tmp / "feats" / f"s{i}.h5", i % 2 == 0, rng, demo_slide)
        rows.append((f"s{i}", int(i % 2 == 0)))
    with open(tmp / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        w.writerows(rows)
    write_features(tmp / "query.h5", True, np.random.default_rng(7), demo_slide)
    models = {}
    for head, config in (("noisy_and", "noisy-and.yaml"), ("abmil", "abmil.yaml")):
        out = tmp / head
        assert (
            cli(
                [
                    "mil",
                    "train",
                    "--features",
                    str(tmp / "feats"),
                    "--labels",
                    str(tmp / "labels.csv"),
                    "--out",
                    str(out),
                    "--config",
                    str(REPO / "pipelines" / "configs" / "mil" / config),
                    "--folds",
                    "2",
                    "--epochs",
                    "40",
                    "--batch-size",
                    "2",
                    "--no-progress",
                    "bootstrap=0",
                    "val_fraction=0",
                    "optim.lr=3e-3",
                ]
            )
            == 0
        )
        models[head] = out
    return tmp, models


def test_rasterize_position_scale_orientation():
    # a wide slide 1000 x 500 on a 100 x 50 grid (downsample 10): one tile at x=600, y=100, size 200
    hm = rasterize(np.array([[600, 100], [0, 0]]), np.array([0.9, 0.1]), 200, (1000, 500), (100, 50))
    assert hm.grid.shape == (50, 100) and hm.downsample == (10.0, 10.0)
    filled = ~np.isnan(hm.grid)
    assert np.all(hm.grid[10:30, 60:80] == 0.9) and np.all(hm.grid[0:20, 0:20] == 0.1)
    assert filled.sum() == 400 + 400
    assert hm.peak() == (70, 20)  # centre of the 0.9 tile, x first
    # overlapping tiles average
    hm2 = rasterize(np.array([[0, 0], [100, 0]]), np.array([1.0, 0.0]), 200, (1000, 500), (100, 50))
    assert hm2.grid[5, 5] == 1.0 and hm2.grid[5, 15] == 0.5 and hm2.grid[5, 25] == 0.0


def test_geojson_polygons_are_level0_tiles():
    coords = np.array([[0, 0], [512, 256]])
    g = geojson(coords, np.array([0.2, 0.8]), 256)
    assert g["type"] == "FeatureCollection" and len(g["features"]) == 2
    ring = g["features"][1]["geometry"]["coordinates"][0]
    assert ring == [[512, 256], [768, 256], [768, 512], [512, 512], [512, 256]]
    assert g["features"][1]["properties"]["measurements"]["score"] == pytest.approx(0.8)
    assert g["features"][0]["properties"]["objectType"] == "detection"


#: noisy-AND maps instance probabilities (0.5: called positive); ABMIL maps attention after
#: log-min-max scaling, relative to the slide's own weights (the top fifth of the bar)
MASK_THRESHOLD = {"noisy_and": "0.5", "abmil": "0.8"}


@pytest.mark.parametrize("head", ["noisy_and", "abmil"])
def test_heatmap_peaks_over_known_region(trained, demo_slide, head):
    tmp, models = trained
    out = tmp / f"hm_{head}"
    assert (
        cli(
            [
                "mil",
                "heatmap",
                "--model",
                str(models[head]),
                "--features",
                str(tmp / "query.h5"),
                "--slide",
                str(demo_slide),
                "--out",
                str(out),
                "--size",
                "512",
                "--geojson",
                "--mask",
                "--mask-threshold",
                MASK_THRESHOLD[head],
            ]
        )
        == 0
    )
    info = json.loads((out / "heatmap.json").read_text())
    tw, th = info["thumbnail_size"]
    assert (tw, th) == (383, 512)  # 2220 x 2967 fitted into 512 x 512, portrait kept
    dx, dy = info["downsample"]
    assert dx == pytest.approx(2220 / 383) and dy == pytest.approx(2967 / 512)
    px, py = info["peak_thumbnail_xy"]
    assert RECT[0] / dx <= px < RECT[2] / dx and RECT[1] / dy <= py < RECT[3] / dy, (px, py)
    lx, ly = info["peak_level0_xy"]
    assert RECT[0] <= lx < RECT[2] and RECT[1] <= ly < RECT[3]
    assert info["probs"]["1"] > 0.5
    # the overlay is the thumbnail with colour where tiles are: hot (red) over RECT, cool elsewhere
    ov = np.asarray(Image.open(out / "overlay.png").convert("RGB")).astype(int)
    assert ov.shape == (th, tw, 3)
    redness = ov[..., 0] - ov[..., 2]
    inside = redness[
        int(RECT[1] / dy) + 2 : int(RECT[3] / dy) - 2, int(RECT[0] / dx) + 2 : int(RECT[2] / dx) - 2
    ]
    far = redness[int(2000 / dy) : int(2900 / dy), int(100 / dx) : int(1000 / dx)]
    assert inside.mean() > far.mean() + 60, (inside.mean(), far.mean())
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # GeoJSON: one polygon per tile, level-0 footprint, the highest score inside RECT
    g = json.loads((out / "tiles.geojson").read_text())
    coords = _grid()
    assert len(g["features"]) == len(coords)
    scores = np.array([f["properties"]["score"] for f in g["features"]])
    best = g["features"][int(scores.argmax())]["geometry"]["coordinates"][0][0]
    assert RECT[0] <= best[0] < RECT[2] and RECT[1] <= best[1] < RECT[3]
    # mask + sidecar, loadable as a TissueMask, covering RECT and little else
    m = TissueMask.load(out / "mask.png")
    assert m.downsample == pytest.approx(dx) and m.slide_dimensions == (2220, 2967)
    w, h = RECT[2] - RECT[0], RECT[3] - RECT[1]
    # RECT is 8 % of the slide
    assert m.fraction(RECT[0], RECT[1], w, h) > 0.7
    assert m.area_fraction < 0.15


def test_heatmap_errors(trained, tmp_path, capsys):
    tmp, models = trained
    assert (
        cli(
            [
                "mil",
                "heatmap",
                "--model",
                str(models["abmil"]),
                "--features",
                str(tmp_path / "none.h5"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "feature file not found" in capsys.readouterr().err
    with FeatureWriter(tmp_path / "nourl.h5", D, {"tile_size_level0": TILE}) as w:
        w.append(np.zeros((2, D), np.float32), np.array([[0, 0], [256, 0]]))
    assert (
        cli(
            [
                "mil",
                "heatmap",
                "--model",
                str(models["abmil"]),
                "--features",
                str(tmp_path / "nourl.h5"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "pass --slide" in capsys.readouterr().err
    assert (
        cli(
            [
                "mil",
                "heatmap",
                "--model",
                str(tmp_path),
                "--features",
                str(tmp / "query.h5"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "model.json" in capsys.readouterr().err


@pytest.mark.slow
def test_real_tissue_slides_auroc_and_heatmap_peak(tmp_path):
    """Mosaics of the demo slide's stroma and epithelium, positives carrying one tile of its
    dense-nuclear epithelium, every patch colour-matched (no colour cue), embedded by
    `slidestream embed` (random-init resnet18) and cross-validated with the shipped configs: mean
    pooling on the same folds fails, ABMIL learns the bag label, and both heads' out-of-fold
    heatmaps peak over the inserted tile."""
    from pipelines.bench.mil import run_real

    r = run_real(tmp_path)  # 60 slides, 4 folds
    assert r["mean_pool_auroc"] < 0.75, r["mean_pool_auroc"]
    a, n = r["heads"]["abmil"], r["heads"]["noisy_and"]
    assert a["auroc"] >= 0.9, a
    # noisy-AND pools the mean instance probability: one target among 16 tiles moves it little
    assert n["auroc"] >= r["mean_pool_auroc"] + 0.1, (n["auroc"], r["mean_pool_auroc"])
    for v in (a, n):
        assert v["peak_in_region"] >= 0.8, v["peaks"]
    hm = json.loads(next((tmp_path / "heatmaps_abmil").glob("*/heatmap.json")).read_text())
    assert hm["slide_dimensions"] == [896, 896]
