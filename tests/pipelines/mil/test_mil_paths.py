"""MIL labels CSV slide ids resolve only inside ``--features`` (issue 12 §6): ``../x``, an absolute
path and a symlink out of the folder are refused with a clear reason and recorded as skips, never
read; ``--on-missing error`` makes them errors."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from conftest import make_mil_archive, write_feature_slide

from pipelines.mil.data import MILDataError, load_dataset


def test_slide_ids_never_read_outside_the_features_folder(tmp_path):
    feats, labels = make_mil_archive(tmp_path, n_patients=6)
    rng = np.random.default_rng(1)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("up", "abs", "target"):  # readable feature files, all outside the folder
        write_feature_slide(outside / f"{name}.h5", True, rng)
    shutil.copy(outside / "up.h5", tmp_path / "up.h5")
    (feats / "link.h5").symlink_to(outside / "target.h5")
    (feats / "inside-link.h5").symlink_to(feats / "P00-S0.h5")  # a link that stays inside is fine
    rows = [
        ("../up", "tumor"),
        ("../outside/up", "tumor"),
        (str(outside / "abs"), "tumor"),
        ("link", "tumor"),
        ("inside-link", "tumor"),
    ]
    with open(labels, "a", newline="") as fh:
        w = csv.writer(fh)
        for sid, label in rows:
            w.writerow([sid, "PX", label, "g0"])
    ds = load_dataset(labels, feats)
    skipped = {s.slide_id: s.reason for s in ds.skipped}
    assert set(skipped) == {"../up", "../outside/up", str(outside / "abs"), "link"}
    for sid in ("../up", "../outside/up", str(outside / "abs")):
        assert "is a path, not a name" in skipped[sid] and str(feats) in skipped[sid]
    assert "outside" in skipped["link"] and "link.h5" in skipped["link"]
    assert "inside-link" in ds.slide_ids and len(ds) == 13
    with pytest.raises(MILDataError, match="is a path, not a name"):
        load_dataset(labels, feats, on_missing="error")
