"""``slidestream bench stain`` runs end to end on a few tiles and reports both implementations and
their ratio for each method (speed itself is checked by running the benchmark, not here)."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main


def test_bench_stain_small(capsys):
    assert main(["bench", "stain", "--tiles", "4", "--batch-size", "2", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tiles"] == 4 and out["device"] == "cpu" and "torchstain" in out["baseline"]
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"macenko", "reinhard"}
    for r in rows.values():
        # the ratio printed is the two measured rates' ratio (the rates themselves are the
        # benchmark's to judge, not a test's)
        assert r["x_torchstain"] == pytest.approx(
            r["slidestream_images_per_s"] / r["torchstain_images_per_s"], rel=1e-9
        )
