"""Feature files other tools write, read by slidestream (and through it by `slidestream mil`): laid
out as TRIDENT writes them (attributes on the `features` and `coords` datasets, none on the file;
an empty slide as features of shape (0,)) and as CLAM writes them (plain `features`/`coords`, or
coords with the patching attributes of its create_patches step)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsi.io import read_features


def trident_file(path, feats, coords, *, patch=256, mag0=40, target=20, width=40000, height=30000):
    """As TRIDENT's extract_patch_features saves one slide: datasets and their attributes."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", data=feats)
        d.attrs["name"] = path.stem
        d.attrs["savetodir"] = str(path.parent)
        c = f.create_dataset("coords", data=coords)
        for k, v in {
            "patch_size": patch,
            "patch_size_level0": patch * mag0 // target,
            "level0_magnification": mag0,
            "target_magnification": target,
            "overlap": 0,
            "name": path.stem,
            "savetodir": str(path.parent),
            "level0_width": width,
            "level0_height": height,
        }.items():
            c.attrs[k] = v
    return path


def clam_file(path, feats, coords, coords_attrs=None):
    """As CLAM's extract_features_fp saves one slide (coords attributes only when its patches carry them)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        c = f.create_dataset("coords", data=coords)
        for k, v in (coords_attrs or {}).items():
            c.attrs[k] = v
    return path


def _bag(n=6, d=8, step=512):
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(3) * step, np.arange(n // 3) * step), -1).reshape(-1, 2)
    return rng.normal(size=(n, d)).astype(np.float32), coords.astype(np.int64)


def test_a_trident_file_reads_with_its_geometry_in_slidestreams_names(tmp_path):
    feats, coords = _bag()
    f = read_features(trident_file(tmp_path / "TCGA-1.h5", feats, coords))
    assert f.layout == "trident" and np.array_equal(f.features, feats) and np.array_equal(f.coords, coords)
    a = f.attrs
    assert a["tile_size_level0"] == 512 and a["tile_size_px"] == 256
    assert a["mpp"] == pytest.approx(0.5) and a["slide_mpp"] == pytest.approx(0.25)
    assert (a["slide_id"], a["slide_width"], a["slide_height"]) == ("TCGA-1", 40000, 30000)
    assert f.coords_attrs["overlap"] == 0 and f.features_attrs["savetodir"] == str(tmp_path)
    empty = read_features(
        trident_file(tmp_path / "e.h5", np.empty((0,), np.float32), np.empty((0, 2), np.int64))
    )
    assert len(empty) == 0 and empty.coords.shape == (0, 2)


def test_clam_files_plain_and_with_patching_attributes(tmp_path):
    feats, coords = _bag()
    plain = read_features(clam_file(tmp_path / "a.h5", feats[None], coords))  # (1, N, D) as some versions
    assert plain.layout == "clam" and plain.features.shape == (6, 8) and "tile_size_level0" not in plain.attrs
    lvl1 = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0]), "name": "b"}
    f = read_features(clam_file(tmp_path / "b.h5", feats, coords, lvl1))
    assert f.attrs["tile_size_level0"] == 1024 and f.attrs["slide_id"] == "b" and "mpp" not in f.attrs
    f0 = read_features(clam_file(tmp_path / "c.h5", feats, coords, {"patch_size": 512, "patch_level": 0}))
    assert f0.attrs["tile_size_level0"] == 512


def test_rows_that_do_not_match_are_refused(tmp_path):
    feats, coords = _bag()
    with pytest.raises(ValueError, match="not a feature file slidestream, CLAM or TRIDENT wrote"):
        read_features(clam_file(tmp_path / "bad.h5", feats, coords[:-1]))


def test_mil_reads_trident_and_clam_files_side_by_side(tmp_path):
    from pipelines.mil import load_dataset
    from pipelines.mil.draw import tile_size_from_attrs

    feats, coords = _bag()
    trident_file(tmp_path / "s1.h5", feats, coords)
    clam_file(tmp_path / "s2.h5", feats[:3] + 1, coords[:3])
    (tmp_path / "labels.csv").write_text("slide_id,label\ns1,tumour\ns2,normal\n")
    ds = load_dataset(tmp_path / "labels.csv", tmp_path)
    assert ds.slide_ids == ["s1", "s2"] and [len(b) for b in ds.bags] == [6, 3] and not ds.skipped
    assert np.array_equal(ds.bags[1], feats[:3] + 1) and ds.classes["label"] == ["normal", "tumour"]
    t = read_features(tmp_path / "s1.h5")
    assert tile_size_from_attrs(t.attrs, t.coords, tmp_path / "s1.h5") == 512  # the heatmap's tile size
