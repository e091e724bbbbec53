"""``slidestream bench isolation`` runs end to end on a tiny archive: both modes embed every slide,
with identical features (the overhead target is checked by running the benchmark, not here)."""

from __future__ import annotations

import json

from pipelines.cli import main


def test_bench_isolation_small(capsys):
    argv = ["bench", "isolation", "--n-slides", "1", "--size", "768", "--repeats", "1", "--encoder", "resnet10t",
            "--tile-size", "128", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["features_identical"] is True and out["slides"] == 1 and out["tiles_per_job"] > 0
    assert len(out["isolated_wall_s"]) == len(out["in_process_wall_s"]) == 1
    ratio = out["isolated_slides_per_hour"] / out["in_process_slides_per_hour"]
    assert abs(out["isolated_over_in_process"] - ratio) < 0.01 and out["worker_start_s"] > 0
