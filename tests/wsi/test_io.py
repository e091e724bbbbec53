"""Atomic writes, tissue-mask geometry and feature files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsi.atomic import atomic_path
from wsi.io import FeatureWriter, read_features, safe_slide_id
from wsi.tissue import TissueMask


def test_atomic_path_publishes_only_on_success(tmp_path):
    final = tmp_path / "out.bin"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"ok")
        assert not final.exists()
    assert final.read_bytes() == b"ok"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert final.read_bytes() == b"ok"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_path(final, overwrite=False):
        pass


def test_atomic_path_replaces_directories(tmp_path):
    final = tmp_path / "store.zarr"
    for content in ("v1", "v2"):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(content)
    assert (final / "x").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["store.zarr"]


def test_tissue_mask_fraction_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    m = rng.random((40, 60)) > 0.6
    tm = TissueMask(m, downsample=16.0)
    for _ in range(50):
        x, y = rng.integers(-100, 1000, 2)
        w, h = rng.integers(16, 300, 2)
        x0, y0 = int(np.floor(x / 16)), int(np.floor(y / 16))
        x1, y1 = int(np.ceil((x + w) / 16)), int(np.ceil((y + h) / 16))
        padded = np.zeros((200, 200), bool)
        padded[50:90, 50:110] = m
        brute = padded[y0 + 50 : y1 + 50, x0 + 50 : x1 + 50].mean()
        assert tm.fraction(x, y, w, h) == pytest.approx(brute)
    xs, ys = rng.integers(0, 900, 20), rng.integers(0, 600, 20)
    np.testing.assert_allclose(
        tm.fractions(xs, ys, 64, 64), [tm.fraction(a, b, 64, 64) for a, b in zip(xs, ys)]
    )
    import pickle

    blob = pickle.dumps(tm)
    assert len(blob) < m.size * 2  # the summed-area table is rebuilt, not shipped
    assert pickle.loads(blob).fraction(100, 100, 64, 64) == tm.fraction(100, 100, 64, 64)
    tm.save(tmp_path / "m.png")
    back = TissueMask.load(tmp_path / "m.png")
    np.testing.assert_array_equal(back.mask, m)
    assert back.downsample == 16.0


@pytest.mark.parametrize(
    "url, expected",
    [
        ("/data/slides/TCGA-01.svs", "TCGA-01"),
        ("https://host/a/b/slide%201.ome.tiff?sig=abc#frag", "slide_1"),  # URL: path decoded, query dropped
        ("../../etc/passwd", "passwd"),
        ("..", "slide"),
        ("s3://bucket/x.zarr/", "x"),
        ("/d/foo#bar.tif", "foo%23bar"),  # local: '#', '?' are part of the name (issue 12.6)
        ("/d/foo?x=1.tif", "foo%3Fx%3D1"),
        ("/d/foo%23bar.tif", "foo%2523bar"),
        ("/d/café.svs", "café"),
        ("/d/cafè.svs", "cafè"),
        ("/d/a::b.tif", "a%3A%3Ab"),
        ("file:///d/x y#1.svs", "x_y%231"),
    ],
)
def test_safe_slide_id(url, expected):
    sid = safe_slide_id(url)
    assert sid == expected and "/" not in sid and not sid.startswith(".")


def test_safe_slide_ids_of_distinct_local_names_are_distinct():
    names = ["foo#bar.tif", "foo?bar.tif", "foo_bar.tif", "foo%23bar.tif", "café.tif", "cafè.tif", "a::b.tif"]
    ids = [safe_slide_id(f"/slides/{n}") for n in names]
    assert len(set(ids)) == len(ids), ids


def test_feature_writer_is_atomic_and_plain_h5py_readable(tmp_path):
    path = tmp_path / "s.h5"
    w = FeatureWriter(
        path,
        dim=4,
        attrs={"mpp": 0.5, "encoder": "x", "extra": {"a": 1}},
        coords_attrs={"patch_size": 448, "patch_level": 0},
    )
    w.append(np.ones((3, 4)), np.arange(6).reshape(3, 2))
    assert not path.exists()
    w.append(np.zeros((2, 4)), np.arange(4).reshape(2, 2))
    w.close(tile_size_px=224)
    with h5py.File(path) as f:
        assert f["features"].shape == (5, 4) and f["coords"].shape == (5, 2)
        assert f.attrs["complete"] and f.attrs["n_tiles"] == 5
        assert f["coords"].attrs["patch_size"] == 448 and f["coords"].attrs["patch_level"] == 0
    feats = read_features(path)
    assert feats.attrs["mpp"] == 0.5 and feats.attrs["tile_size_px"] == 224
    w2 = FeatureWriter(tmp_path / "t.h5", dim=4)
    w2.append(np.ones((1, 4)), np.zeros((1, 2)))
    w2.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]
