"""``slidestream mil train`` under real ``torchrun`` with 2 gloo processes: folds are split
between the ranks, rank 0 writes the run, and the run equals the one-process run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import MIL_TRAIN_ARGS, torchrun
from conftest import make_mil_archive as make_archive
from conftest import mil_train as _train

ARGS = [*MIL_TRAIN_ARGS, "--head", "abmil"]


def _preds(path):
    with open(path) as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    return rows


@pytest.mark.ddp
@pytest.mark.usefixtures("one_torch_thread")  # as the torchrun processes
def test_two_ranks_train_the_same_folds_as_one_process(tmp_path):
    feats, labels = make_archive(tmp_path)
    one = tmp_path / "one"
    assert _train(feats, labels, one, "--head", "abmil") == 0

    two = tmp_path / "two"
    r = torchrun("-m", "pipelines", "mil", "train", "--features", str(feats), "--labels", str(labels),
                 "--out", str(two), *ARGS)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "folds (rank 0)" not in r.stdout
    assert r.stdout.count("wrote ") == 1  # only rank 0 reports and writes

    for k in range(3):
        assert (two / f"fold{k}.safetensors").is_file()
    a, b = _preds(one / "predictions.csv"), _preds(two / "predictions.csv")
    assert set(a) == set(b) and len(a) == 36
    for sid in a:
        assert a[sid]["fold"] == b[sid]["fold"]
        pa = float(a[sid]["label_prob_tumor"])
        pb = float(b[sid]["label_prob_tumor"])
        # probabilities in [0, 1]; one process and two ranks train with the same arithmetic, but
        # gloo's all-reduce may sum in another order (round-off grows over training steps)
        assert abs(pa - pb) < 1e-4, (sid, pa, pb)
    ma = json.loads((one / "metrics.json").read_text())
    mb = json.loads((two / "metrics.json").read_text())
    # AUROC in [0, 1] is a rank statistic: equal probabilities give the same value exactly
    assert [f["auroc"] for f in ma["folds"]] == pytest.approx([f["auroc"] for f in mb["folds"]], abs=1e-6)
    info = json.loads((two / "model.json").read_text())
    assert [f["fold"] for f in info["folds"]] == [0, 1, 2]
    assert np.isfinite(mb["pooled"]["auroc"])
