"""Probes and patch tasks of ``slidestream eval``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.evaluate import (
    PatchTask,
    Stat,
    few_shot,
    knn,
    linear_probe,
    load_patch_task,
    metrics_from_scores,
    save_patch_task_h5,
    summarise,
)


def _clusters(n_per=60, n_classes=7, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per)
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def test_metrics_from_scores_by_hand():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    r = metrics_from_scores(scores, y, 2)
    assert r.top1 == 0.75
    assert r.balanced_accuracy == pytest.approx((1.0 + 2 / 3) / 2)
    assert math.isnan(r.top5)


@pytest.mark.parametrize("probe", ["linear", "knn", "few"])
def test_probes_separate_clusters_and_stay_at_chance_on_noise(probe):
    x, y = _clusters()
    # test points around the same centres (seed 0), drawn with a different noise seed
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(7, 16)) * 3
    rng2 = np.random.default_rng(5)
    tx = np.concatenate([c + 0.3 * rng2.normal(size=(30, 16)) for c in centres])
    ty = np.repeat(np.arange(7), 30)
    run = {
        "linear": lambda a, b, c, d: linear_probe(a, b, c, d, 7, seed=0),
        "knn": lambda a, b, c, d: knn(a, b, c, d, 7),
        "few": lambda a, b, c, d: few_shot(a, b, c, d, 7, shots=5, seed=0),
    }[probe]
    good = run(x, y, tx, ty)
    assert good.top1 > 0.95 and good.top5 > 0.99 and good.macro_f1 > 0.95
    noise_rng = np.random.default_rng(3)
    bad = run(noise_rng.normal(size=x.shape), y, noise_rng.normal(size=tx.shape), ty)
    assert bad.top1 < 0.4  # chance is 1/7


def test_knn_matches_brute_force_vote():
    x, y = _clusters(n_per=10, n_classes=3, spread=2.0)
    q, qy = _clusters(n_per=5, n_classes=3, spread=2.0, seed=2)
    res = knn(x, y, q, qy, 3, k=5, temperature=0.07)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    preds = []
    for v in q / np.linalg.norm(q, axis=1, keepdims=True):
        sims = xn @ v
        nn = np.argsort(-sims)[:5]
        votes = np.zeros(3)
        for i in nn:
            votes[y[i]] += np.exp(sims[i] / 0.07)
        preds.append(votes.argmax())
    assert res.top1 == pytest.approx(float((np.array(preds) == qy).mean()))


def test_summarise_reports_a_spread_only_when_measured():
    s = summarise([{"a": 1.0, "b": math.nan, "c": 0.5}, {"a": 3.0, "b": math.nan, "c": math.nan}])
    assert s["a"] == Stat(2.0, math.sqrt(2.0), 2, "seeds")  # sample sd of 1 and 3
    assert math.isnan(s["b"].mean) and s["b"].sd is None and s["b"].n == 0 and str(s["b"]) == "—"
    # measured once (the other run undefined): the value, no spread
    assert s["c"] == Stat(0.5, None, 1, "seeds") and str(s["c"]) == "0.500"
    assert str(s["a"]) == "2.000 ± 1.414"
    one = summarise([{"a": 0.25}], "run")["a"]
    assert one.sd is None and one.n == 1 and "±" not in str(one)


def test_patch_task_folder_and_h5_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, value in (("tumour", 50), ("stroma", 200)):
        (tmp_path / "task" / cls).mkdir(parents=True)
        for i in range(10):
            arr = np.clip(value + rng.normal(0, 5, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "task" / cls / f"{i}.png")
    task = load_patch_task(tmp_path / "task", test_fraction=0.3, seed=0)
    assert task.classes == ["stroma", "tumour"]
    assert len(task.train_labels) == 14 and len(task.test_labels) == 6
    assert sorted(np.bincount(task.test_labels)) == [3, 3]
    h5 = save_patch_task_h5(task, tmp_path / "task.h5")
    back = load_patch_task(h5)
    np.testing.assert_array_equal(back.test_images, task.test_images)
    assert back.classes == task.classes


def test_patch_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_patch_task(tmp_path / "nope")
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least two class folders"):
        load_patch_task(tmp_path / "one")


def test_builtin_patch_tasks_by_name(tmp_path):
    from pipelines.errors import InputError, MissingInputError

    task = load_patch_task("tissue-types,per_class=30,seed=1")
    assert task.name == "tissue-types" and task.classes == ["stroma", "epithelium", "dense-nuclear"]
    assert task.train_images.shape[1:] == (64, 64, 3) and set(task.test_labels) == {0, 1, 2}
    mag = load_patch_task("magnification,per_class=8,tile=32")
    assert mag.name == "magnification" and mag.n_classes == 4
    with pytest.raises(InputError, match="colour must be 'matched' or 'natural'"):
        load_patch_task("tissue-types,colour=blue")
    with pytest.raises(InputError, match="not one of"):
        load_patch_task("tissue-types,bogus=1")
    with pytest.raises(InputError, match="is not of type int"):
        load_patch_task("tissue-types,per_class=many")
    with pytest.raises(MissingInputError, match="built-in tasks: tissue-types, magnification"):
        load_patch_task(tmp_path / "nothing.h5")


def test_patch_task_dataclass():
    t = PatchTask(
        "x",
        ["a", "b"],
        np.zeros((2, 4, 4, 3), np.uint8),
        np.array([0, 1]),
        np.zeros((1, 4, 4, 3), np.uint8),
        np.array([1]),
    )
    assert t.n_classes == 2


def _mini_archive(tmp_path):
    """Six small slides of real demo tissue; 'positive' ones carry a square of another morphology."""
    import csv

    from pipelines.tasks import make_real_slides

    info = make_real_slides(
        tmp_path / "slides", n_slides=6, size=448, tile=112, region_tiles=2, cell=112, seed=0
    )
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        for s in info["slides"]:
            w.writerow([s["slide_id"], "pos" if s["label"] else "neg"])
    return tmp_path / "slides", labels


def _spread(values):
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None), len(v)


def test_eval_cli_runs_patch_slide_and_seg_tasks(tmp_path):
    """`slidestream eval` end to end: one encoder, a patch task (h5), a slide task (embed + MIL
    cross-validation) and the segmentation task (frozen encoder + 1x1 decoder), with two seeds:
    every seeded probe runs once per seed and its reported mean and sd are those of the runs'
    own outputs (recomputed here from the files each run wrote); kNN, deterministic, runs once
    and reports no spread."""
    import json

    from pipelines.cli import main as cli

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    images[20:] //= 3  # two separable classes: bright and dark tiles
    task = PatchTask(
        "bright-dark",
        ["bright", "dark"],
        images[::2],
        np.repeat([0, 1], 10),
        images[1::2],
        np.repeat([0, 1], 10),
    )
    h5 = save_patch_task_h5(task, tmp_path / "bright-dark.h5")  # the task is named after the file
    slides, labels = _mini_archive(tmp_path)
    out = tmp_path / "eval"
    rc = cli(
        [
            "eval",
            "--encoder",
            "resnet10t",
            "--patch-task",
            str(h5),
            "--slide-task",
            f"slides={slides},labels={labels},mpp=1.0,tile_size=112,folds=2,epochs=5,name=archive",
            "--seg-task",
            "exact,steps=4",
            "--seeds",
            "0,1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    by = {(r["task"], r["probe"]): r for r in rows}
    assert {t for t, _ in by} == {"bright-dark", "archive", "exact-label"}
    linear, knn_row = by["bright-dark", "linear"], by["bright-dark", "knn"]
    assert linear["top1_mean"] > 0.9 and knn_row["top1_mean"] > 0.9
    assert linear["runs"] == "2 seeds" and linear["top1_n"] == 2 and linear["top1_sd"] is not None
    assert knn_row["runs"] == "1 run" and knn_row["top1_n"] == 1 and knn_row["top1_sd"] is None
    # the slide task: MIL cross-validated once per seed; mean and sd over the seeds' fold means
    mil = by["archive", "mil-abmil"]
    seed_means = [
        json.loads((out / "enc0" / "archive" / "mil" / f"seed{s}" / "metrics.json").read_text())["summary"]
        for s in (0, 1)
    ]
    mean, sd, n = _spread([m["auroc"]["mean"] for m in seed_means])
    assert mil["runs"] == f"{n} seeds" and mil["auroc_n"] == n == 2
    assert mil["auroc_mean"] == pytest.approx(mean, rel=1e-12) and mil["auroc_sd"] == pytest.approx(
        sd, rel=1e-9
    )
    # the segmentation task: the decoder trained once per seed; Dice of each run's last validation
    seg = by["exact-label", "1x1 decoder (frozen)"]
    histories = [
        json.loads((out / "enc0" / "exact-label" / f"seed{s}" / "metrics.json").read_text())["history"]
        for s in (0, 1)
    ]
    dice = [[r for r in h if "dice" in r][-1]["dice"] for h in histories]
    mean, sd, n = _spread([float(np.mean(d)) for d in dice])
    assert seg["dice_mean_n"] == n == 2 and seg["dice_mean_mean"] == pytest.approx(mean, rel=1e-9)
    assert seg["dice_mean_sd"] == pytest.approx(sd, rel=1e-9, abs=1e-12)
    md = (out / "results.md").read_text()
    assert md.count("| task | encoder | probe | runs |") == 3
    knn_line = next(ln for ln in md.splitlines() if "| knn |" in ln)
    assert "±" not in knn_line and "| 1 run |" in knn_line


def test_task_specs_are_checked(tmp_path):
    from pipelines.evaluate import parse_seg_task, parse_slide_task

    with pytest.raises(ValueError, match="lacks labels"):
        parse_slide_task("slides=x")
    with pytest.raises(ValueError, match="unknown task option 'fold'"):
        parse_slide_task(f"slides=x,labels={tmp_path},fold=3")
    with pytest.raises(ValueError, match="built-in task is 'exact'"):
        parse_seg_task("nuclei")
    assert parse_seg_task("exact,steps=7").steps == 7
