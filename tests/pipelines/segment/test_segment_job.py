"""`slidestream segment train/predict` end to end on the exact-label task (composites of real
tissue from the demo slide), stitching against a whole-image pass, metrics, configs, DDP."""

from __future__ import annotations

import csv
import glob
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, assert_close_scaled, torchrun
from PIL import Image

from pipelines.config import ConfigError, load_config
from pipelines.segment import SegmentConfig, metrics_from_confusion
from pipelines.tasks import TASK_CLASSES, make_exact_label_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("segtask")
    # 512 x 384 at 1 µm/px: (W - 256) and (H - 256) are multiples of the 128 px stitching stride
    return {
        "train": make_exact_label_task(root / "train", seed=0, size=(512, 384)),
        "val": make_exact_label_task(root / "val", seed=1000, size=(512, 384), heldout=True),
        "root": root,
    }


def _config(task, path: Path, steps: int) -> Path:
    cfg = {
        "model": {"kind": "unet", "unet_depth": 2, "unet_width": 4},
        "data": {
            "train": [{"slide": task["train"]["slide"], "annotations": task["train"]["geojson"]}],
            "val": [{"slide": task["val"]["slide"], "annotations": task["val"]["labels"]}],
            "classes": TASK_CLASSES,
            "mpp": 2.0,
            "tile_size": 64,
            "val_max_tiles": 8,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "val_every": 2,
            "checkpoint_every": 2,
            "device": "cpu",
            "threads": 1,
            "loss": {"ce": 1.0, "dice": 0.5},
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*argv: str) -> dict:
    from pipelines.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(list(argv)) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_shipped_configs_load():
    files = sorted(glob.glob(str(REPO / "pipelines" / "configs" / "segment" / "*.yaml")))
    assert len(files) == 3
    for f in files:
        cfg = load_config(SegmentConfig, f)
        assert cfg.data.classes[0] == "background"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(SegmentConfig, files[0], ["train.stepz=3"])


def test_metrics_from_confusion():
    cm = np.array([[50, 10], [5, 35]])
    m = metrics_from_confusion(cm)
    # class 1: tp 35, fp 10, fn 5, tn 50
    assert m["dice"][1] == pytest.approx(70 / 85)
    assert m["iou"][1] == pytest.approx(35 / 50)
    assert m["mcc"][1] == pytest.approx((35 * 50 - 10 * 5) / np.sqrt(45 * 40 * 60 * 55))
    assert m["dice"][0] == pytest.approx(100 / 115)
    assert m["pixel_accuracy"] == pytest.approx(0.85)


def test_train_resume_predict(task, tmp_path):
    cfg = _config(task, tmp_path / "seg.yaml", steps=4)
    out = tmp_path / "run"
    r = _cli("segment", "train", "--config", str(cfg), "--out", str(out))
    assert len(r["dice"]) == 3 and len(r["classes"]) == 3
    # Dice and IoU of one class come from one confusion matrix: Dice = 2 IoU / (1 + IoU)
    for d, j in zip(r["dice"], r["iou"]):
        assert d == pytest.approx(2 * j / (1 + j), rel=1e-9, abs=1e-12)
    # what the command prints is what it logged at its last validation
    with open(out / "metrics.csv", newline="") as fh:
        last = [row for row in csv.DictReader(fh) if row.get(f"dice_{r['classes'][0]}")][-1]
    assert [float(last[f"dice_{c}"]) for c in r["classes"]] == pytest.approx(r["dice"], rel=1e-6)
    from pipelines.training import load_checkpoint

    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    rows = list((out / "metrics.csv").read_text().splitlines())
    assert rows[0].startswith("step,loss,lr,dice_background") and len(rows) == 3
    state = load_checkpoint(out / "checkpoint.pt")
    # the sampler position (per rank) is part of the checkpoint, with the RNG and augmentation state
    (rank0,) = state["rank_states"]
    assert rank0["stream"]["loader"]["consumed"] and {"rng", "augment"} <= set(rank0)
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    # resume to 6 steps: continues at step 4, the log keeps the earlier rows
    _cli("segment", "train", "--config", str(cfg), "--out", str(out), "--resume", "train.steps=6")
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 6
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]

    pred = _cli(
        "segment",
        "predict",
        "--slide",
        task["val"]["slide"],
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--out",
        str(tmp_path / "pred"),
        "--overlap",
        "16",
    )
    assert pred["shape"] == [192, 256] and pred["mpp"] == 2.0
    import zarr

    root = zarr.open_group(pred["zarr"], mode="r")
    assert json.loads((Path(pred["zarr"]) / "zarr.json").read_text())["zarr_format"] == 3
    ome = root.attrs["ome"]
    ds = ome["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"] for d in ds] == [[2.0, 2.0]]  # 256 px: one level
    assert ome["multiscales"][0]["axes"][1]["unit"] == "micrometer"
    assert [p["class"] for p in ome["image-label"]["properties"]] == TASK_CLASSES
    labels = root["0"][:]
    assert labels.dtype == np.uint8 and labels.shape == (192, 256) and labels.max() < 3
    assert root["0"].metadata.codecs[-1].to_dict()["name"] == "zstd"
    from wsi.annotations import load_geojson

    load_geojson(
        pred["geojson"], slide_dimensions=(512, 384), class_map={c: i for i, c in enumerate(TASK_CLASSES)}
    )
    with Image.open(pred["overlay"]) as im:
        assert im.size == (256, 192)
    assert not list(Path(tmp_path / "pred").glob("*tmp*"))  # atomic outputs, no leftovers


def test_pyramid_levels_use_mode_downsampling(tmp_path):
    from pipelines.segment.outputs import LabelZarrWriter, _mode2x

    a = np.array([[1, 1, 2, 0], [1, 2, 2, 0], [0, 0, 0, 3], [0, 3, 3, 3]], np.uint8)  # ties: lowest
    assert _mode2x(a, 4).tolist() == [[1, 0], [0, 3]]
    lab = np.random.default_rng(0).integers(0, 3, (600, 520)).astype(np.uint8)
    w = LabelZarrWriter(tmp_path / "x.zarr", lab.shape, 0.5, ["a", "b", "c"], chunk=128)
    for y in range(0, 600, 70):  # bands not aligned to chunks
        w.write_rows(lab[y : y + 70])
    n = w.close("x")
    import zarr

    root = zarr.open_group(str(tmp_path / "x.zarr"), mode="r")
    assert np.array_equal(root["0"][:], lab)
    assert n == 3 and root["1"].shape == (300, 260) and root["2"].shape == (150, 130)
    assert np.array_equal(root["1"][:], _mode2x(lab, 3))
    scales = [
        d["coordinateTransformations"][0]["scale"][0] for d in root.attrs["ome"]["multiscales"][0]["datasets"]
    ]
    assert scales == [0.5, 1.0, 2.0]


def test_blend_weights_partition_unity():
    from pipelines.segment import ramp_profile

    tile, overlap, margin = 64, 32, 8
    a = ramp_profile(tile, overlap, margin, True, False)
    b = ramp_profile(tile, overlap, margin, False, True)
    stride = tile - overlap
    total = np.zeros(tile + stride)
    total[:tile] += a
    total[stride:] += b
    assert np.allclose(total, 1.0)
    assert (b[:margin] == 0).all() and (a[-margin:] == 0).all()


def test_stitching_matches_whole_image(task):
    """Overlapping windows with margin >= the receptive-field radius reproduce a single
    whole-image forward pass to float32 rounding (tolerance 1e-4 on probabilities); naive
    non-overlapping tiles do not (seams)."""
    from pipelines.segment import stitching_check

    r = stitching_check(task["val"]["slide"], tile=256, overlap=128)
    assert r["max_abs_diff"] <= r["tolerance"] == 1e-4
    assert r["label_agreement"] == 1.0
    assert r["no_overlap_max_abs_diff"] > 100 * max(r["max_abs_diff"], 1e-7)


def test_bad_annotations_stop_training_with_file_and_feature(task, tmp_path, capsys):
    bad = json.loads(Path(task["train"]["geojson"]).read_text())
    bad["features"][0]["properties"]["classification"]["name"] = "Necrosis"
    p = tmp_path / "bad.geojson"
    p.write_text(json.dumps(bad))
    cfg = _config(task, tmp_path / "seg.yaml", steps=2)
    from pipelines.cli import main
    from pipelines.segment import run_training
    from wsi.annotations import AnnotationError

    train = f"data.train=[{{slide: {task['train']['slide']}, annotations: {p}}}]"
    args = ["segment", "train", "--config", str(cfg), "--out", str(tmp_path / "r"), train]
    assert main(args) == 2  # before any training step: one line naming the file and the feature
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slidestream segment: error: ")
    assert "bad.geojson" in err[0] and "'Necrosis' (features [0])" in err[0]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    with pytest.raises(AnnotationError, match=r"(?s)bad\.geojson.*'Necrosis' \(features \[0\]\)"):
        run_training(load_config(SegmentConfig, cfg, [f"out={tmp_path / 'r2'}", train]), quiet=True)


@pytest.mark.slow
def test_bench_unet_reads_morphology_where_colour_fails(capsys):
    """The known-answer check: stroma and epithelium share one colour distribution, so the best
    per-pixel colour classifier of the training composite guesses between them (Dice near 0.5)
    while a short CPU run of a tiny U-Net separates them (Dice >= 0.8 per class; it levels off
    near 0.89 at 150-300 steps)."""
    import argparse

    from pipelines.bench import segment

    rc = segment.main(argparse.Namespace(json=True, steps=150, seed=0, work_dir=None))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert min(report["per_class_dice"]) >= 0.8, report
    assert max(report["baseline_pixel_colour_dice"][1:]) < 0.65, report
    assert report["baseline_pixel_colour_dice"][0] > 0.95  # it does tell glass from tissue
    # probabilities in [0, 1]: tiled and whole-image forwards differ only by float32 round-off
    assert report["stitching"]["max_abs_diff"] <= 1e-4
    assert rc == 0


@pytest.mark.slow
def test_demo_segmentation(tmp_path):
    from pipelines.demo import demo_segmentation

    r = demo_segmentation(tmp_path, minutes_budget=1.0)
    with Image.open(r["overlay"]) as im:
        assert im.format == "PNG"
    # stroma vs epithelium by morphology alone (colour-matched): see the bench test above
    assert min(r["dice"]) >= 0.8, r


@pytest.mark.ddp
@pytest.mark.slow
def test_torchrun_two_gloo_processes(task, tmp_path):
    cfg = _config(task, tmp_path / "seg.yaml", steps=2)
    res = torchrun(
        "-m", "pipelines", "segment", "train", "--config", str(cfg), "--out", str(tmp_path / "ddp")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    from pipelines.training import load_checkpoint

    state = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rank_states"]) == 2
    # like pretraining, a checkpoint of 2 ranks does not resume in 1 process: one line, exit 2
    from pipelines.cli import main

    rc = main(
        [
            "segment",
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "ddp"),
            "--resume",
            "train.steps=4",
        ]
    )
    assert rc == 2
    assert load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["step"] == 2


def test_layer_decay_and_encoder_lr_scale():
    from pipelines.segment import SegmentModelConfig, build_model, segment_param_groups

    cfg = SegmentConfig(
        model=SegmentModelConfig(kind="segformer", backbone="vit_tiny_patch16_224", img_size=32, embed_dim=8)
    )
    cfg.optim.layer_decay, cfg.train.encoder_lr_scale = 0.5, 0.1
    model = build_model(cfg)
    groups = segment_param_groups(model, cfg)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    first = next(v for n, v in scale.items() if "blocks.0." in n)
    last = next(v for n, v in scale.items() if "blocks.11." in n)
    assert last == pytest.approx(0.1 * 0.5) and first == pytest.approx(0.1 * 0.5**12)
    decoder = [g for g in groups if any(n.startswith("proj") or n.startswith("classify") for n in g["names"])]
    assert decoder and all(g["lr_scale"] == 1.0 for g in decoder)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_predict_real_slide_in_bands(demo_slide, tmp_path):
    """The demo slide (2220 x 2967, not a multiple of anything): finished rows come out band by
    band (never more than one window height), the label grid covers the slide, the GeoJSON stays
    inside the slide."""
    import torch

    from models.seg.decoders import create_segmenter
    from pipelines.segment import predict_slide, sliding_window
    from wsi.annotations import load_geojson
    from wsi.slide import open_slide

    torch.manual_seed(0)
    model = create_segmenter("unet", n_classes=2, unet_depth=2, unet_width=4).eval()
    with open_slide(demo_slide) as s:
        bands = [
            (y, p.shape, w.shape)
            for y, p, w in sliding_window(s, model, n_classes=2, mpp=8.0, tile=64, overlap=16, progress=False)
        ]
    H = -(-2967 * s.mpp // 8.0)
    assert sum(shape[1] for _, shape, _ in bands) == H and len(bands) > 1
    assert all(shape[1] <= 64 and shape[2] == -(-2220 * s.mpp // 8.0) for _, shape, _ in bands)
    r = predict_slide(
        demo_slide,
        None,
        tmp_path,
        model=model,
        classes=["background", "tissue"],
        mpp=8.0,
        tile=64,
        overlap=16,
        progress=False,
    )
    assert r.shape == (int(H), int(-(-2220 * s.mpp // 8.0)))
    load_geojson(r.geojson, slide_dimensions=(2220, 2967), class_map={"background": 0, "tissue": 1})


def test_tiles_are_class_balanced_and_aligned(task):
    """Each draw centres a tile on a pixel of a uniformly chosen class; flips/rotations move image
    and mask together (glass is bright, tissue is not, in every augmented tile)."""
    import itertools

    import torch

    from pipelines.segment import AnnotatedSlideConfig, SegmentDataConfig, augment_pairs, tile_dataset

    spec = [AnnotatedSlideConfig(slide=task["train"]["slide"], annotations=task["train"]["geojson"])]
    plain = SegmentDataConfig(train=spec, classes=TASK_CLASSES, mpp=2.0, tile_size=32)
    items = list(itertools.islice(iter(tile_dataset(plain, train=True)), 90))
    centres = [int(it["mask"][16, 16]) for it in items]
    counts = np.bincount(centres, minlength=3)
    assert counts.min() >= 15, counts  # uniform over 3 classes: 30 each expected
    items = list(itertools.islice(iter(tile_dataset(plain, train=True, seed=1)), 40))
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    aug_i, aug_m = augment_pairs(images, masks, torch.Generator().manual_seed(0), jitter=0.1)
    assert aug_i.dtype == torch.uint8 and aug_m.shape == masks.shape
    n = 0
    for img, m in zip(aug_i, aug_m):
        grey = img.float().mean(0)
        glass, tissue = m == 0, m > 0
        if glass.sum() > 50 and tissue.sum() > 50:
            assert grey[glass].mean() > grey[tissue].mean() + 20
            n += 1
    assert n >= 5
    # the same label counts before and after: the mask moved with the image, nothing was lost
    for m0, m1 in zip(masks, aug_m):
        assert torch.equal(
            torch.bincount(m0.flatten().long(), minlength=256),
            torch.bincount(m1.flatten().long(), minlength=256),
        )


def test_resume_equals_an_uninterrupted_run(task, tmp_path):
    """4 steps straight vs 2 steps, then --resume for 2 more: the same sampler position, RNG and
    augmentation state give the same model (float round-off only) and one log row per step."""
    import torch

    from pipelines.segment import run_training
    from pipelines.training import load_checkpoint

    path = _config(task, tmp_path / "seg.yaml", steps=4)
    run_training(load_config(SegmentConfig, path, [f"out={tmp_path / 'a'}"]), quiet=True)
    first = run_training(
        load_config(SegmentConfig, path, [f"out={tmp_path / 'b'}"]), quiet=True, stop_after=2
    )
    assert first["steps"] == 2
    run_training(load_config(SegmentConfig, path, [f"out={tmp_path / 'b'}"]), quiet=True, resume=True)
    a, b = (
        load_checkpoint(tmp_path / "a" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "b" / "checkpoint.pt"),
    )
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        if v.is_floating_point():
            assert_close_scaled(b["model"][k], v, rtol=1e-5, floor=1e-7, msg=k)
        else:
            assert torch.equal(b["model"][k], v), k
    ra = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == [2, 4]
    assert_close_scaled(rb[-1]["dice"], ra[-1]["dice"], rtol=1e-6, floor=1e-9, msg="dice")
