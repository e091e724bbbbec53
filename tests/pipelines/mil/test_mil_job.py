"""``slidestream mil train/predict`` end to end on feature files written with FeatureWriter:
outputs, patient-grouped folds, determinism, multi-task, and the error/skip paths."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from conftest import make_mil_archive as make_archive
from conftest import mil_train as _train
from conftest import write_feature_slide as write_slide

from pipelines.cli import main as cli
from pipelines.mil import MILDataError, load_dataset, make_folds

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bootstrap_aurocs(y: np.ndarray, p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """AUROC of ``n`` percentile-bootstrap resamples (resamples of one class skipped), computed
    as the Mann-Whitney statistic over all pairs, vectorised (an implementation independent of the
    job's)."""
    idx = rng.integers(0, len(y), (n, len(y)))
    yb, pb = y[idx], p[idx]
    npos = yb.sum(1)
    ok = (npos > 0) & (npos < len(y))
    yb, pb, npos = yb[ok], pb[ok], npos[ok]
    pos, neg = yb[:, :, None] == 1, yb[:, None, :] == 0
    diff = pb[:, :, None] - pb[:, None, :]
    wins = ((diff > 0) + 0.5 * (diff == 0)) * (pos & neg)
    return wins.sum((1, 2)) / (npos * (len(y) - npos))


def test_train_predict_end_to_end(tmp_path, capsys):
    feats, labels = make_archive(tmp_path)
    out = tmp_path / "run"
    assert (
        _train(
            feats,
            labels,
            out,
            "--head",
            "abmil",
            "--config",
            "pipelines/configs/mil/abmil.yaml",
            "head.dropout=0.0",
            "optim.lr=3e-3",
            "bootstrap=1000",  # the interval is checked below against an independent bootstrap
        )
        == 0
    )
    for name in (
        "model.json",
        "fold0.safetensors",
        "fold2.safetensors",
        "metrics.json",
        "metrics.csv",
        "roc.png",
        "predictions.csv",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    assert not (out / "skipped.csv").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["folds"]) == 3
    assert m["summary"]["auroc"]["mean"] > 0.9, m["summary"]
    assert m["pooled"]["auroc"] > 0.9 and len(m["pooled"]["auroc_ci95"]) == 2
    # the pooled AUROC and its interval, computed another way: sklearn on predictions.csv, and an
    # independent percentile bootstrap (own resampling, own seed) of the same predictions
    from sklearn.metrics import roc_auc_score

    with open(out / "predictions.csv", newline="") as fh:
        pred = list(csv.DictReader(fh))
    y = np.array([r["label_true"] == "tumor" for r in pred], int)
    p = np.array([float(r["label_prob_tumor"]) for r in pred])
    auroc = roc_auc_score(y, p)
    assert m["pooled"]["auroc"] == pytest.approx(auroc, abs=1e-5)  # probabilities written to 6 decimals
    boots = _bootstrap_aurocs(y, p, 20000, np.random.default_rng(12345))
    m_boot = yaml.safe_load((out / "config.yaml").read_text())["bootstrap"]
    assert m_boot == 1000
    lo, hi = m["pooled"]["auroc_ci95"]
    assert lo <= auroc <= hi
    # the job's interval is a percentile of m_boot resamples: its Monte-Carlo standard error is
    # sqrt(q(1-q)/1000) / density at the percentile, the density read off the 20000 resamples here
    # (whose own error is sqrt(20) times smaller); 4 standard errors + a floor for ties
    for got, q in ((lo, 0.025), (hi, 0.975)):
        lo_q, hi_q = np.percentile(boots, [100 * max(q - 0.01, 0), 100 * min(q + 0.01, 1)])
        se = (hi_q - lo_q) / 0.02 * np.sqrt(q * (1 - q) / m_boot)
        assert got == pytest.approx(np.percentile(boots, 100 * q), abs=4 * se + 2e-3), (q, se)
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == {"label": ["normal", "tumor"]} and meta["head"] == "abmil"
    assert meta["config"]["head"]["proj_dim"] == 256  # from the YAML
    # every slide tested exactly once, and a patient's slides share a fold
    with open(out / "predictions.csv") as fh:
        pred = list(csv.DictReader(fh))
    assert len(pred) == 36
    fold_of_patient: dict[str, set] = {}
    for r in pred:
        fold_of_patient.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(v) == 1 for v in fold_of_patient.values())
    test_patients = [{s.split("-")[0] for s in info["test_slides"]} for info in meta["folds"]]
    assert sum(len(p) for p in test_patients) == 18 == len(set().union(*test_patients))
    # predict: ensemble and one fold, on a directory of new slides
    rng = np.random.default_rng(99)
    new = tmp_path / "new"
    for i in range(6):
        write_slide(new / f"new{i}.h5", i < 3, rng)
    preds = tmp_path / "preds.csv"
    assert cli(["mil", "predict", "--model", str(out), "--features", str(new), "--out", str(preds)]) == 0
    with open(preds) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == [f"new{i}" for i in range(6)]
    p = np.array([float(r["label_prob_tumor"]) for r in rows])
    assert p[:3].min() > p[3:].max()
    assert [r["label_pred"] for r in rows] == ["tumor"] * 3 + ["normal"] * 3
    assert (
        cli(
            [
                "mil",
                "predict",
                "--model",
                str(out),
                "--features",
                str(new / "new0.h5"),
                "--fold",
                "1",
                "--out",
                str(tmp_path / "one.csv"),
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "mil",
                "predict",
                "--model",
                str(out),
                "--features",
                str(new),
                "--fold",
                "7",
                "--out",
                str(tmp_path / "bad.csv"),
            ]
        )
        == 2
    )
    assert "fold 7 does not exist" in capsys.readouterr().err


def test_training_is_deterministic(tmp_path):
    feats, labels = make_archive(tmp_path, n_patients=12)
    for run in ("a", "b"):
        assert _train(feats, labels, tmp_path / run, "--head", "noisy_and", "--epochs", "4") == 0
    a = (tmp_path / "a" / "predictions.csv").read_text()
    assert a == (tmp_path / "b" / "predictions.csv").read_text()


def test_folds_group_patients_and_keep_classes():
    patients = [f"p{i // 3}" for i in range(60)]  # three slides per patient
    y = np.array([int(p[1:]) % 2 for p in patients])
    folds = make_folds(y, patients, [None] * 60, 5, 0.2, seed=0)
    assert len(folds) == 5
    seen_test = []
    groups = np.array(patients)
    for tr, va, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert not set(groups[va]) & set(groups[te]) and not set(groups[va]) & set(groups[tr])
        assert len(va) > 0 and set(y[te]) == {0, 1}
        seen_test.extend(te.tolist())
    assert sorted(seen_test) == list(range(60))
    splits = ["train"] * 40 + ["val"] * 10 + ["test"] * 10
    ((tr, va, te),) = make_folds(y, patients, splits, 5, 0.2, seed=0)
    assert list(te) == list(range(50, 60)) and list(va) == list(range(40, 50))


def test_missing_features_are_recorded_not_dropped(tmp_path, capsys):
    feats, labels = make_archive(tmp_path, n_patients=12)
    (feats / "P03-S1.h5").unlink()
    (feats / "P05-S0.h5").write_bytes(b"not hdf5")
    with open(labels, "a", newline="") as fh:
        fh.write("ghost,P99,tumor,g0\n")
    out = tmp_path / "run"
    assert _train(feats, labels, out, "--head", "mean", "--epochs", "3") == 0
    err = capsys.readouterr().err
    assert "warning: skipped 3 slide(s)" in err
    with open(out / "skipped.csv") as fh:
        skipped = {r["slide_id"]: r["reason"] for r in csv.DictReader(fh)}
    assert set(skipped) == {"P03-S1", "ghost", "P05-S0"}
    assert "no feature file" in skipped["ghost"] and "unreadable" in skipped["P05-S0"]
    with open(out / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 24 - 2
    # --on-missing error fails with the file named
    assert _train(feats, labels, tmp_path / "strict", "--on-missing", "error") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'P03-S1' has no feature file" in err and "embed it or remove its row" in err
    with pytest.raises(MILDataError, match="no feature file"):
        load_dataset(labels, feats, on_missing="error")


def test_label_errors(tmp_path, capsys):
    feats, labels = make_archive(tmp_path, n_patients=8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("classes:\n  label: [normal, cancer]\n")
    assert _train(feats, labels, tmp_path / "r", "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "['tumor']" in err and "not among the classes" in err
    with pytest.raises(MILDataError, match="missing column"):
        load_dataset(labels, feats, ["label", "stage"])
    with pytest.raises(MILDataError, match="features directory not found"):
        load_dataset(labels, tmp_path / "nope")
    dup = tmp_path / "dup.csv"
    dup.write_text("slide_id,label\nP00-S0,tumor\nP01-S0,normal\nP00-S0,normal\n")
    with pytest.raises(MILDataError, match="appears twice"):
        load_dataset(dup, feats)
    # a fixed split whose test set holds a label value the training slides lack
    bad = tmp_path / "split.csv"
    rows = ["slide_id,label,split"] + [
        f"P{p:02d}-S{s},{'tumor' if p % 2 == 0 else 'normal'},train" for p in range(1, 8) for s in range(2)
    ]
    rows += ["P00-S0,metastasis,test", "P00-S1,tumor,test"]
    bad.write_text("\n".join(rows) + "\n")
    assert _train(feats, bad, tmp_path / "r2") == 2
    err = capsys.readouterr().err
    assert "['metastasis']" in err and "not in the training classes ['normal', 'tumor']" in err


def test_predict_labels_outside_classes_are_recorded(tmp_path, capsys):
    feats, labels = make_archive(tmp_path, n_patients=8)
    out = tmp_path / "run"
    assert _train(feats, labels, out, "--head", "max", "--epochs", "3", "--folds", "2") == 0
    lab = tmp_path / "new_labels.csv"
    lab.write_text("slide_id,label\nP00-S0,tumor\nP01-S0,metastasis\n")
    preds = tmp_path / "p" / "preds.csv"
    preds.parent.mkdir()
    assert (
        cli(
            [
                "mil",
                "predict",
                "--model",
                str(out),
                "--features",
                str(feats / "P00-S0.h5"),
                str(feats / "P01-S0.h5"),
                str(feats / "P02-S0.h5"),
                "--labels",
                str(lab),
                "--out",
                str(preds),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: skipped 2 slide(s)" in err
    with open(preds.parent / "skipped.csv") as fh:
        reasons = {r["slide_id"]: r["reason"] for r in csv.DictReader(fh)}
    assert "not among the model's classes" in reasons["P01-S0"] and "no label" in reasons["P02-S0"]
    res = json.loads(preds.with_suffix(".metrics.json").read_text())
    assert res["label"]["n"] == 1
    assert (
        cli(
            [
                "mil",
                "predict",
                "--model",
                str(out),
                "--features",
                str(tmp_path / "missing.h5"),
                "--out",
                str(tmp_path / "x.csv"),
            ]
        )
        == 2
    )
    assert "feature file not found" in capsys.readouterr().err


def test_multitask_uncertainty_weighted(tmp_path):
    feats, labels = make_archive(tmp_path)
    out = tmp_path / "mt"
    assert (
        _train(
            feats,
            labels,
            out,
            "--config",
            "pipelines/configs/mil/abmil.yaml",
            "--label-columns",
            "label,grade",
            "head.dropout=0.0",
            "optim.lr=3e-3",
        )
        == 0
    )
    meta = json.loads((out / "model.json").read_text())
    assert meta["tasks"] == ["label", "grade"] and meta["classes"]["grade"] == ["g0", "g1"]
    assert (out / "metrics_grade.json").is_file() and (out / "roc_grade.png").is_file()
    from safetensors.torch import load_file

    sd = load_file(str(out / "fold0.safetensors"))
    assert "weighting.log_sigma" in sd and sd["weighting.log_sigma"].shape == (2,)
    assert float(sd["weighting.log_sigma"].abs().sum()) > 0  # learned, not left at 0
    g = json.loads((out / "metrics_grade.json").read_text())
    assert g["pooled"]["auroc"] > 0.8
    assert json.loads((out / "metrics.json").read_text())["pooled"]["auroc"] > 0.8


def test_class_balance_weights_and_sampler():
    from pipelines.mil.train import _batches, _class_weights

    y = np.array([0] * 30 + [1] * 10 + [-1] * 5)  # -1: no label for this task
    w = _class_weights(y, 2)
    np.testing.assert_allclose(w, [40 / (2 * 30), 40 / (2 * 10)])
    # the sampler draws each class about equally often despite 3:1 imbalance
    per_slide = np.where(y >= 0, w[np.maximum(y, 0)], 0.0)
    rng = np.random.default_rng(0)
    drawn = np.concatenate([np.concatenate(_batches(len(y), 8, rng, per_slide)) for _ in range(200)])
    assert not np.isin(drawn, np.flatnonzero(y < 0)).any()
    frac1 = np.mean(y[drawn] == 1)
    assert 0.45 < frac1 < 0.55, frac1


def test_noisy_and_model_dirs_from_before_the_learned_slope_load(tmp_path):
    """A model directory written by the fixed-slope noisy-AND (no log_a in the weights, no
    learn_slope in model.json) loads with that fixed slope."""
    from safetensors.torch import load_file, save_file

    from pipelines.mil import load_model_dir

    feats, labels = make_archive(tmp_path, n_patients=8)
    out = tmp_path / "na"
    assert _train(feats, labels, out, "--head", "noisy_and", "--epochs", "2", "--folds", "2") == 0
    meta = json.loads((out / "model.json").read_text())
    meta["head_kwargs"] = {k: meta["head_kwargs"][k] for k in ("dropout", "proj_dim", "hidden")} | {"a": 10.0}
    (out / "model.json").write_text(json.dumps(meta))
    for k in range(2):
        sd = load_file(str(out / f"fold{k}.safetensors"))
        assert "heads.label.log_a" in sd
        save_file({n: t for n, t in sd.items() if not n.endswith("log_a")}, str(out / f"fold{k}.safetensors"))
    _, models = load_model_dir(out)
    head = models[0].heads["label"]
    assert "log_a" not in dict(head.named_parameters())
    np.testing.assert_allclose(head.a.numpy(), [10.0, 10.0], rtol=1e-6)
