"""Annotation import: QuPath GeoJSON (polygons, multipolygons, holes, class names) and label masks
(PNG, Zarr) rasterised to tile masks; bad annotations reported with file and feature index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi.annotations import (
    AnnotationError,
    LabelMask,
    load_annotations,
    load_geojson,
    load_label_mask,
    rasterize,
)

CLASSES = {"background": 0, "Tumor": 1, "Stroma": 2}


def feature(coords, name, *, kind="Polygon", qupath=True):
    props = {"classification": {"name": name, "color": [200, 0, 0]}} if qupath else {"name": name}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write(tmp_path: Path, features, name="a.geojson") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return p


def test_polygon_with_hole_and_multipolygon(tmp_path):
    feats = [
        feature([square(10, 10, 90, 90), square(40, 40, 60, 60)], "Tumor"),  # hole in the middle
        feature(
            [[square(100, 0, 120, 20)], [square(100, 80, 120, 100)]],
            "Stroma",
            kind="MultiPolygon",
            qupath=False,
        ),
    ]
    ann = load_geojson(write(tmp_path, feats), slide_dimensions=(200, 100), class_map=CLASSES)
    assert ann.class_names == ["Stroma", "Tumor"]
    m = rasterize(ann, (0, 0, 200, 100), (200, 100), CLASSES)
    # pixel (x, y) has its centre at (x + 0.5, y + 0.5): direct check against the geometry
    ys, xs = np.mgrid[0:100, 0:200] + 0.5
    tumor = (xs > 10) & (xs < 90) & (ys > 10) & (ys < 90) & ~((xs > 40) & (xs < 60) & (ys > 40) & (ys < 60))
    stroma = (xs > 100) & (xs < 120) & (((ys > 0) & (ys < 20)) | ((ys > 80) & (ys < 100)))
    want = np.where(tumor, 1, np.where(stroma, 2, 0))
    assert np.array_equal(m, want)


def test_rasterize_box_at_lower_resolution(tmp_path):
    ann = load_geojson(write(tmp_path, [feature([square(0, 0, 64, 32)], "Tumor")]), class_map=CLASSES)
    # box (32, 0, 64, 64) at 16x16: 4 level-0 px per mask px
    m = ann.rasterize((32, 0, 64, 64), (16, 16), CLASSES)
    assert m[:8, :8].all() and not m[8:].any() and not m[:, 8:].any()


def test_bad_annotations_are_reported_together(tmp_path):
    feats = [
        feature([square(0, 0, 10, 10)], "Tumor"),  # 0: fine
        feature([[[0, 0], [5, 5], [0, 0]]], "Tumor"),  # 1: 2 distinct points
        feature([[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]], "Tumor"),  # 2: bow-tie
        feature([[[0, 0], [float("nan"), 1], [3, 3], [0, 0]]], "Tumor"),  # 3: NaN (json NaN)
        feature([square(0, 0, 5000, 10)], "Tumor"),  # 4: outside the slide
        feature([square(0, 0, 10, 10)], "Lymphocyte"),  # 5: unknown class
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1, 1]},
            "properties": {"name": "Tumor"},
        },  # 6: not a region
    ]
    path = write(tmp_path, feats, "bad.geojson")
    with pytest.raises(AnnotationError) as e:
        load_geojson(path, slide_dimensions=(100, 100), class_map=CLASSES)
    msg = str(e.value)
    assert "bad.geojson" in msg
    idx = {i for i, _ in e.value.problems if i is not None}
    assert idx == {1, 2, 3, 4, 6}
    assert "3 distinct points" in msg and "self-intersecting" in msg and "non-finite" in msg
    assert "outside the slide" in msg and "'Lymphocyte' (features [5])" in msg and "Point" in msg
    assert isinstance(e.value, ValueError)


def test_unknown_classes_ignored_when_configured(tmp_path):
    feats = [feature([square(0, 0, 10, 10)], "Tumor"), feature([square(20, 0, 30, 10)], "Lymphocyte")]
    ann = load_geojson(write(tmp_path, feats), class_map=CLASSES, on_unknown="ignore")
    assert [r.class_name for r in ann.regions] == ["Tumor"]
    strict = load_geojson(write(tmp_path, feats, "b.geojson"))  # no class map: nothing to check yet
    with pytest.raises(AnnotationError, match="Lymphocyte"):
        strict.rasterize((0, 0, 30, 10), (30, 10), CLASSES)


def test_not_geojson(tmp_path):
    p = tmp_path / "x.geojson"
    p.write_text("{nope")
    with pytest.raises(AnnotationError, match="(?s)x.geojson.*not valid JSON"):
        load_geojson(p)
    with pytest.raises(FileNotFoundError):
        load_geojson(tmp_path / "missing.geojson")


def test_label_mask_png_at_a_downsample(tmp_path):
    labels = np.zeros((25, 50), np.uint8)  # slide 200 x 100 at downsample 4
    labels[5:10, 10:20] = 2
    p = tmp_path / "labels.png"
    Image.fromarray(labels).save(p)
    lm = load_annotations(p, slide_dimensions=(200, 100))
    assert isinstance(lm, LabelMask) and lm.downsample == 4
    # level-0 box (40, 20, 40, 20) covers mask [5:10, 10:20] exactly
    m = lm.rasterize((40, 20, 40, 20), (40, 20))
    assert (m == 2).all()
    m2 = lm.rasterize((0, 0, 200, 100), (50, 25))
    assert np.array_equal(m2, labels)
    # a box partly outside the mask gets background there
    m3 = lm.rasterize((180, 80, 40, 40), (10, 10))
    assert m3.shape == (10, 10) and not m3.any()
    with pytest.raises(AnnotationError, match="aspect ratio"):
        load_label_mask(p, slide_dimensions=(100, 100))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(AnnotationError, match="single-channel"):
        load_label_mask(rgb, downsample=1)


def test_label_mask_zarr_and_class_remap(tmp_path):
    import zarr

    labels = np.zeros((64, 64), np.uint8)
    labels[16:48, 16:48] = 7
    z = zarr.create_array(store=str(tmp_path / "m.zarr"), shape=labels.shape, chunks=(16, 16), dtype="uint8")
    z[:] = labels
    lm = load_label_mask(tmp_path / "m.zarr", downsample=2.0)
    m = lm.rasterize((32, 32, 64, 64), (32, 32), {"7": 1})
    assert np.array_equal(m, (labels[16:48, 16:48] == 7).astype(np.uint8))


def test_contours_round_trip_through_geojson(tmp_path):
    """Predicted label maps → QuPath polygons → rasterised again: the same map."""
    from pipelines.segment import label_polygons
    from wsi.annotations import to_geojson_feature

    rng = np.random.default_rng(0)
    labels = np.zeros((96, 128), np.uint8)
    for _ in range(6):
        y, x, r = rng.integers(10, 86), rng.integers(10, 118), rng.integers(5, 14)
        yy, xx = np.ogrid[:96, :128]
        labels[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.integers(1, 3)
    labels[40:60, 50:80] = 1
    labels[46:54, 60:70] = 0  # a hole
    names = ["background", "Tumor", "Stroma"]
    feats = [to_geojson_feature(r, names[c]) for c, r in label_polygons(labels, 4.0)]
    assert any(len(f["geometry"]["coordinates"]) > 1 for f in feats)  # the hole is kept
    ann = load_geojson(write(tmp_path, feats), slide_dimensions=(512, 384), class_map=CLASSES)
    back = ann.rasterize((0, 0, 512, 384), (128, 96), CLASSES)
    assert (back == labels).mean() > 0.995
