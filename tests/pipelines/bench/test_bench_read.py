"""``slidestream bench read``: a bench subcommand, its JSON report on a small generated slide."""

from __future__ import annotations

import argparse
import json

import pytest

from pipelines.bench import read
from wsi.synth import mirror_tile, write_tiff_pyramid


def test_bench_read_is_a_bench_subcommand():
    from pipelines.bench import BENCHES

    assert "read" in BENCHES


def test_bench_read_json_structure(tmp_path, capsys, demo_pixels):
    img = mirror_tile(demo_pixels[:1024, :1024], (1024, 768))
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
    bound = {r["threads"]: r["tiles_per_s"] for r in rows if r["method"] == "decode bound"}
    for r in rows:
        assert isinstance(r["method"], str) and r["threads"] in (1, 2)
        if r["method"].startswith("2x"):  # 2x reads compare with the exact 2x row (checked below)
            assert "x_decode_bound" not in r
            continue
        # every level-0 row's ratio is its measured rate over the decode bound's at the same threads
        assert r["x_decode_bound"] == pytest.approx(r["tiles_per_s"] / bound[r["threads"]], rel=1e-2)
    assert {(r["method"], r["threads"]) for r in rows} >= {("decode bound", 1), ("decode bound", 2)}
    assert all(r["x_decode_bound"] == pytest.approx(1.0) for r in rows if r["method"] == "decode bound")
    assert doc["tiles"] == 50
    # 2x reads: the exact and the scaled rows, ratios against the exact row, pixel differences
    two = {(r["method"], r["threads"]): r for r in rows if r["method"].startswith("2x")}
    for t in (1, 2):
        exact, sj = two[("2x exact: decode + reduce", t)], two[("2x scaled: simplejpeg", t)]
        assert exact["x_exact_2x"] == 1.0 and exact["pixel_diff_vs_exact"]["max"] == 0
        assert sj["x_exact_2x"] == pytest.approx(sj["tiles_per_s"] / exact["tiles_per_s"], abs=0.01)
        d = sj["pixel_diff_vs_exact"]
        assert 0 < d["mean"] <= 0.5 and d["max"] > 0  # a DCT-domain decode: close, not equal
        assert two[("2x reader (scaled)", t)]["x_exact_2x"] > 0 and ("2x scaled: Pillow draft", t) in two
