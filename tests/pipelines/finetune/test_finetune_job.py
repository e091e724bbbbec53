"""`slidestream finetune` end to end on the demo tile table (32 px tiles of the shipped slide,
epithelium vs stroma, streamed through the online loader): every shipped recipe runs, the outputs
are what the README says (an encoder `embed` loads, metrics.json per split, figures), the other
data sources (ImageFolder, QuPath annotations, a multi-task CSV) train, the teacher's logits are
cached when its input never changes, and the shipped tile table is what its builder writes."""

from __future__ import annotations

import csv
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from models.encoders import load_encoder
from pipelines.cli import main
from pipelines.config import ConfigError, load_config
from pipelines.finetune import FinetuneConfig, SplitLeakError, load_classifier, run_training
from pipelines.tasks import DEMO_TILES, read_task_rows, write_tissue_type_task

RECIPES = ["ce", "ls", "mixup", "kd", "tfkd-self", "tfkd-reg", "self-distill", "supcon"]
FAST = ("train.steps=3", "train.batch_size=8", "train.threads=1", "train.progress=false", "train.val_every=0")


def _cfg(recipe: str, out: Path, *overrides: str) -> FinetuneConfig:
    return load_config(
        FinetuneConfig,
        REPO / "pipelines" / "configs" / "finetune" / f"{recipe}.yaml",
        [f"out={out}", f"data.train.csv={DEMO_TILES}", "loss.supcon.steps=2", *FAST, *overrides],
    )


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ce")
    return run_training(_cfg("ce", out), quiet=True), out


def test_ce_outputs(ce_run):
    result, out = ce_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == "ce" and m["classes"] == [["epithelium", "stroma"]] and m["global_batch"] == 8
    assert m["lr"]["peak"] == pytest.approx(0.01 * 8 / 256)  # linear scaling, base lr of ce.yaml
    for split in ("val", "test"):
        s = m[split]
        assert {"top1", "top5", "balanced_accuracy", "macro_f1", "ece", "per_class", "n", "loss"} <= set(s)
        assert 0 <= s["top1"] <= 1 and s["top5"] == 1.0 and 0 <= s["ece"] <= 1  # top-5 of 2 classes
        assert set(s["per_class"]) == {"epithelium", "stroma"}
        assert sum(c["support"] for c in s["per_class"].values()) == s["n"]
        for fig in (f"confusion_{split}.png", f"reliability_{split}.png"):
            assert (out / fig).stat().st_size > 1000
    splits = json.loads((out / "splits.json").read_text())
    assert splits["how"].startswith("group_split(") and splits["moves"] == []
    sizes = {k: v["items"] for k, v in splits["summary"].items()}
    assert sum(sizes.values()) == len(read_task_rows(DEMO_TILES)) and sizes["val"] == m["val"]["n"]
    assert (out / "curves.png").exists() and (out / "metrics.csv").exists()
    # the encoder is what `slidestream embed` loads: normalisation and input size travel with it
    enc = load_encoder(str(out / "encoder.safetensors"))
    assert enc.input_size == 32 and enc.name == "test_resnet"
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    clf = load_classifier(out)
    assert clf.classes == [["epithelium", "stroma"]] and clf.arch == "test_resnet"
    torch.testing.assert_close(clf.model(enc.preprocess(x))[0], enc.features(x))
    assert result["metrics"]["test"]["top1"] == m["test"]["top1"]


@pytest.mark.parametrize("recipe", RECIPES[1:])
def test_every_shipped_recipe_runs_on_the_demo_data(recipe, ce_run, tmp_path):
    _, ce_out = ce_run
    cfg = _cfg(recipe, tmp_path, f"loss.kd.teacher={ce_out}")
    r = run_training(cfg, quiet=True)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["recipe"] == cfg.loss.name and {"val", "test"} <= set(m)
    steps = 3 + (2 if recipe == "supcon" else 0)
    assert r["steps"] == steps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == steps and np.isfinite(rows[-1]["loss"])
    assert load_encoder(str(tmp_path / "encoder.safetensors")).dim > 0


def test_teacher_logits_cached_when_its_input_never_changes(ce_run, tmp_path):
    _, ce_out = ce_run
    cfg = _cfg(
        "kd", tmp_path, f"loss.kd.teacher={ce_out}", "augment.enabled=false", "train.checkpoint_every=3"
    )
    run_training(cfg, quiet=True)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    cache = ck["rank_states"][0]["teacher_cache"]
    assert int(cache["filled"].sum()) == 3 * 8  # every item seen once so far, in its logits row
    teacher = load_classifier(ce_out)
    rows = torch.nonzero(cache["filled"])[:4, 0]
    assert cache["logits"][rows].abs().sum() > 0 and cache["logits"].shape[1] == len(teacher.classes[0])
    # tfkd-self refuses a teacher of another architecture
    other = tmp_path / "other"
    run_training(
        _cfg("ce", other, "model.encoder=test_vit", "model.mode=linear", "train.steps=1"), quiet=True
    )
    with pytest.raises(ConfigError, match="Tf-KD-self distils from a trained copy of the student"):
        run_training(_cfg("tfkd-self", tmp_path / "x", f"loss.kd.teacher={other}"), quiet=True)


def test_cli_runs_and_a_missing_teacher_is_one_line(tmp_path, capsys):
    args = [
        "finetune",
        "--config",
        str(REPO / "pipelines/configs/finetune/tfkd-self.yaml"),
        "--out",
        str(tmp_path),
    ]
    assert main([*args, f"data.train.csv={DEMO_TILES}", *FAST, f"loss.kd.teacher={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher" in err[0] and "not found" in err[0] and "train it first" in err[0]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert (
            main(
                [
                    "finetune",
                    "--config",
                    str(REPO / "pipelines/configs/finetune/ls.yaml"),
                    "--out",
                    str(tmp_path),
                    f"data.train.csv={DEMO_TILES}",
                    *FAST,
                ]
            )
            == 0
        )
    summary = json.loads(buf.getvalue())
    assert set(summary) == {"out", "encoder", "val", "test"} and "ece" in summary["test"]


def _demo_tiles(n_per_class: int = 12) -> dict[str, list[np.ndarray]]:
    from wsi import open_slide

    rows = read_task_rows(DEMO_TILES)
    out: dict[str, list[np.ndarray]] = {}
    with open_slide(DEMO_TILES.parent / rows[0]["slide"]) as s:
        for r in rows:
            lst = out.setdefault(r["label"], [])
            if len(lst) < n_per_class:
                lst.append(s.read_region_mpp((int(r["x"]), int(r["y"])), (40, 40), 1.0))
    return out


def test_imagefolder_with_groups_from_file_names(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    for label, tiles in _demo_tiles().items():
        (root / label).mkdir(parents=True)
        for i, t in enumerate(tiles):
            Image.fromarray(t).save(root / label / f"P{i % 6}_{i}.png")  # 6 patients
    cfg = _cfg(
        "ce",
        tmp_path / "run",
        f"data.train.imagefolder={root}",
        "data.train.csv=null",
        "data.group_pattern=^(P\\d+)_",
        "data.split.val_fraction=0.2",
        "data.split.test_fraction=0.2",
    )
    run_training(cfg, quiet=True)
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())["summary"]
    assert {k: v["groups"] for k, v in splits.items()} == {"train": 4, "val": 1, "test": 1}
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test"]["n"] == splits["test"]["items"] == 4  # tiles resized from 40 to 32 px


def test_annotated_slides_and_multitask_csv(tmp_path, demo_slide):
    # QuPath GeoJSON: rectangles of the demo slide's tile table, classified, one file per split
    rows = read_task_rows(DEMO_TILES)
    for split, part in (("train", rows[::2]), ("val", rows[1::2])):
        feats = []
        for r in part[:60]:
            x, y = int(r["x"]), int(r["y"])
            ring = [[x, y], [x + 64, y], [x + 64, y + 64], [x, y + 64], [x, y]]
            feats.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {"objectType": "annotation", "classification": {"name": r["label"]}},
                }
            )
        (tmp_path / f"{split}.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": feats})
        )
    cfg = _cfg(
        "ce",
        tmp_path / "ann",
        "data.train.csv=null",
        f"data.train.slides=[{{slide: {demo_slide}, annotations: {tmp_path / 'train.geojson'}, group: a}}]",
        f"data.val.slides=[{{slide: {demo_slide}, annotations: {tmp_path / 'val.geojson'}, group: b}}]",
        "data.mpp=1.0",
        "data.eval_max_tiles=40",
    )
    run_training(cfg, quiet=True)
    m = json.loads((tmp_path / "ann" / "metrics.json").read_text())
    assert m["classes"] == [["epithelium", "stroma"]] and 10 <= m["val"]["n"] <= 40 and "test" not in m
    # the same slide in two splits under one group is a leak
    same = cfg.data.val.slides[0]
    same.group = "a"
    with pytest.raises(SplitLeakError, match="straddle splits"):
        run_training(cfg, quiet=True)

    # multi-task: a second label column with empty cells, uncertainty-weighted
    table = tmp_path / "multi.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "x", "y", "mpp", "label", "edge", "group"])
        for i, r in enumerate(rows):
            edge = "" if i % 5 == 0 else ("left" if int(r["x"]) < 1100 else "right")
            w.writerow([str(demo_slide), r["x"], r["y"], 1, r["label"], edge, r["group"]])
    cfg = _cfg("ce", tmp_path / "mt", f"data.train.csv={table}", "data.label_columns=[label, edge]")
    run_training(cfg, quiet=True)
    m = json.loads((tmp_path / "mt" / "metrics.json").read_text())
    assert set(m["test"]["tasks"]) == {"label", "edge"} and m["classes"][1] == ["left", "right"]
    assert m["test"]["tasks"]["edge"]["n"] < m["test"]["n"]  # empty cells are not scored
    assert m["test"]["top1"] == m["test"]["tasks"]["label"]["top1"]
    ck = torch.load(tmp_path / "mt" / "checkpoint.pt", weights_only=True)
    assert ck["model"]["weighting.log_sigma"].shape == (2,)
    assert (tmp_path / "mt" / "confusion_test_edge.png").exists()


def test_shipped_tile_table_is_what_the_builder_writes(tmp_path):
    info = write_tissue_type_task(tmp_path / "tiles.csv")
    rebuilt = read_task_rows(tmp_path / "tiles.csv")
    shipped = read_task_rows(DEMO_TILES)
    strip = [{k: v for k, v in r.items() if k != "slide"} for r in rebuilt]
    assert strip == [{k: v for k, v in r.items() if k != "slide"} for r in shipped]
    assert {r["slide"] for r in shipped} == {"CMU-1-Small-Region.svs"}
    assert info["labels"]["epithelium"] > 100 and info["labels"]["stroma"] > 100 and info["groups"] > 40
