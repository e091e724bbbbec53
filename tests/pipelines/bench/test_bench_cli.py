"""The read and loader benchmarks run end to end on small inputs and report every row and ratio
(speed targets are checked by running the benchmarks, not here)."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_read_small(capsys, tmp_path):
    out = _json(
        capsys,
        ["bench", "read", "--size", "2048", "--tiles", "60", "--threads", "1", "--repeats", "1",
         "--cache-dir", str(tmp_path), "--json"],
    )  # fmt: skip
    text = json.dumps(out)
    for name in ("decode", "tiff", "zarr", "openslide"):
        assert name in text.lower()


def test_bench_loader_small(capsys, tmp_path):
    out = _json(
        capsys,
        ["bench", "loader", "--slides", "1", "--size", "2048", "--tiles", "192", "--workers", "0",
         "--openslide-tiles", "64", "--repeats", "1", "--batch-size", "8", "--grid-tiles", "40",
         "--cache-dir", str(tmp_path), "--json"],
    )  # fmt: skip
    grid = {r["mode"]: r for r in out["rows"] if r["method"] == "slidestream grid"}
    assert set(grid) == {f"grid overlap {o} cache {c}" for o in (0, 112) for c in ("on", "off")}
    for o in (0, 112):
        on, off = grid[f"grid overlap {o} cache on"], grid[f"grid overlap {o} cache off"]
        assert off["cache_hit_rate"] is None and 0 < on["cache_hit_rate"] < 1
        assert on["decoded_per_delivered"] < off["decoded_per_delivered"]  # each encoded tile decoded once
    rows = {
        (r["method"], r["mode"], r.get("workers")): r
        for r in out["rows"]
        if r["method"] != "slidestream grid"
    }
    assert set(rows) == {
        ("slidestream", "unaligned", 0),
        ("slidestream", "aligned", 0),
        ("decode bound", "unaligned", None),
        ("decode bound", "aligned", None),
        ("openslide dataloader", "unaligned", 0),
    }
    for r in rows.values():  # every row states its resources
        assert r["procs_x_threads"] == r["processes"] * r["threads"] == 1
        assert r["cpu_ms_per_tile"] > 0 and r["decoded_per_delivered"] >= 1
    un, al = rows[("slidestream", "unaligned", 0)], rows[("slidestream", "aligned", 0)]
    b_un, b_al = rows[("decode bound", "unaligned", None)], rows[("decode bound", "aligned", None)]
    osr = rows[("openslide dataloader", "unaligned", 0)]
    assert un["tiles"] == al["tiles"] == 192 and osr["tiles"] == 64
    # ratios are computed from the rows' own figures
    assert un["x_decode_bound"] == pytest.approx(un["tiles_per_s"] / b_un["tiles_per_s"], abs=0.01)
    assert al["x_unaligned_bound"] == pytest.approx(al["tiles_per_s"] / b_un["tiles_per_s"], abs=0.02)
    assert al["x_openslide"] == pytest.approx(al["tiles_per_s"] / osr["tiles_per_s"], abs=0.02)
    # decoded pixels per delivered pixel: the aligned stream decodes one 256-px tile per 224-px tile
    assert (
        al["decoded_per_delivered"]
        == b_al["decoded_per_delivered"]
        == pytest.approx(256**2 / 224**2, abs=1e-3)
    )
    assert un["decoded_per_delivered"] == pytest.approx(b_un["decoded_per_delivered"], abs=1e-3)
    assert un["decoded_per_delivered"] > 4
    assert set(out["verdict"]) == {
        "unaligned w0 >= 0.9x own bound",
        "unaligned w0 RSS flat",
        "aligned w0 >= 4x openslide",
        "aligned w0 >= 2x unaligned bound",
        "aligned w0 RSS flat",
    }
    assert sum(out["mpp_mix"].values()) == 192 and len(out["mpp_mix"]) == 4
    assert un["rss_end_mb"] > 0
