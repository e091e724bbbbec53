"""`slidestream bench finetune` end to end on a tiny budget: the baseline runs with the chosen
recipes (teacher first), and the table's means, sds and differences are those of the per-seed
values it reports (the recipes' figures come from running the benchmark, not from here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.cli import main


@pytest.mark.slow
def test_bench_finetune_tiny(capsys, tmp_path):
    argv = ["bench", "finetune", "--seeds", "2", "--steps", "3", "--recipes", "tfkd-self", "supcon"]
    assert main([*argv, "--work-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["recipes"]) == ["ce", "tfkd-self", "supcon"] and out["seeds"] == 2
    assert out["task"]["tiles"] > 300 and out["task"]["classes"] == ["epithelium", "stroma"]
    ce = out["recipes"]["ce"]
    for r in out["recipes"].values():
        assert len(r["top1"]) == len(r["ece"]) == 2
        assert r["top1_mean"] == pytest.approx(np.mean(r["top1"]))
        assert r["top1_sd"] == pytest.approx(np.std(r["top1"], ddof=1))
        assert r["top1_minus_ce"] == pytest.approx(r["top1_mean"] - ce["top1_mean"])
        assert r["ece_minus_ce"] == pytest.approx(r["ece_mean"] - ce["ece_mean"])
    # the teachers were the same seed's ce runs; SupCon split its budget 2 + 1
    assert (tmp_path / "seed1" / "ce" / "head.safetensors").exists()
    sup = json.loads((tmp_path / "seed0" / "supcon" / "metrics.json").read_text())
    assert sup["steps"] == 3 and sup["recipe"] == "supcon"
