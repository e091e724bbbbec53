"""The read and loader benchmarks run end to end on small inputs and report every row and ratio
(speed targets are checked by running the benchmarks, not here)."""

from __future__ import annotations

import json

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
         "--openslide-tiles", "64", "--repeats", "1", "--batch-size", "32", "--cache-dir", str(tmp_path),
         "--json"],
    )  # fmt: skip
    rows = {(r["method"], r.get("workers")): r for r in out["rows"]}
    assert set(rows) == {("slidestream loader", 0), ("decode bound", None), ("openslide dataloader", 0)}
    ld = rows[("slidestream loader", 0)]
    assert ld["tiles"] == 192
    bound = rows[("decode bound", None)]["tiles_per_s"]
    osr = rows[("openslide dataloader", 0)]["tiles_per_s"]
    assert abs(ld["x_decode_bound"] - ld["tiles_per_s"] / bound) < 0.01
    assert abs(ld["x_openslide_at_bound"] - bound / osr) < 0.02
    assert sum(out["mpp_mix"].values()) == 192 and len(out["mpp_mix"]) == 4
    # RSS is sampled over the stream (a loader that sampled nothing reports 0): a process with torch
    # imported holds well over 50 MB
    assert ld["rss_start_mb"] >= 50 and ld["rss_end_mb"] >= 50
