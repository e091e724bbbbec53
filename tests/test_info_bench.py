"""``slidestream info`` and ``slidestream bench read`` through the real CLI entry point."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import DEMO_SLIDE

from pipelines.bench import read
from pipelines.cli import main
from wsi.synth import load_demo_pixels, mirror_tile, write_tiff_pyramid


def test_info_json_on_demo_slide(capsys):
    assert main(["info", "--json", str(DEMO_SLIDE)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "tiff" and info["vendor"] == "aperio"
    assert info["dimensions"] == [2220, 2967] and info["level_count"] == 1
    assert info["mpp"] == pytest.approx(0.499)
    assert info["levels"][0] == {
        "level": 0,
        "width": 2220,
        "height": 2967,
        "downsample": 1.0,
        "mpp": pytest.approx(0.499),
        "tile": [240, 240],
    }
    assert set(info["associated_images"]) == {"thumbnail", "label", "macro"}


def test_info_text_backend_and_mpp_override(capsys):
    assert main(["info", str(DEMO_SLIDE), "--backend", "openslide", "--mpp", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "backend:  openslide" in out and "0.25 µm/px" in out and "240x240" in out


def test_info_bad_slide_exits_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all" * 20)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert main(["info", str(tmp_path / "missing.svs")]) == 2
    assert "not found" in capsys.readouterr().err


def test_bench_read_is_a_bench_subcommand():
    from pipelines.bench import BENCHES

    assert "read" in BENCHES


def test_bench_read_json_structure(tmp_path, capsys):
    img = mirror_tile(load_demo_pixels(DEMO_SLIDE)[:1024, :1024], (1024, 768))
    p = tmp_path / "tiny.svs"
    write_tiff_pyramid(p, img, tile=256, downsamples=(1, 4), quality=85)
    argv = [str(p), "--tiles", "50", "--json", "--repeats", "1", "--threads", "1,2", "--no-zarr"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    # the bench module's own parser and main: `slidestream bench` imports every benchmark module
    # (some import timm, ~15 s here), which this structural test does not need
    parser = argparse.ArgumentParser()
    read.add_arguments(parser)
    assert read.main(parser.parse_args(argv)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # exactly one JSON object on stdout
    doc = json.loads(out[0])
    rows = doc["results"]
    methods = {r["method"] for r in rows}
    assert {"decode bound", "tiff", "tiff read_regions", "openslide"} <= methods
    for r in rows:
        assert isinstance(r["method"], str) and r["threads"] in (1, 2)
        assert isinstance(r["tiles_per_s"], float) and r["tiles_per_s"] > 0
    assert {(r["method"], r["threads"]) for r in rows} >= {("decode bound", 1), ("decode bound", 2)}
    assert all(r["x_decode_bound"] == pytest.approx(1.0) for r in rows if r["method"] == "decode bound")
    assert doc["tiles"] == 50
