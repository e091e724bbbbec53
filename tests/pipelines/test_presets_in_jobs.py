"""Foundation-model presets wherever a job takes an encoder: `slidestream embed` (feature files
record the preset, hub revision and weights sha256), `finetune` (the last blocks of a preset train,
its export loads back as the preset), `segment train/predict` (a preset backbone with its own
normalisation; predict rebuilds it without the hub) and `eval`'s segmentation task. The hub cache
is a directory laid out as huggingface_hub lays it out, holding random weights of the kaiko ViT-S/16
preset cut to 4 blocks; everything runs offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE=that directory)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch
import yaml
from conftest import REPO, one_thread_env
from zoo_helpers import COMMIT, cache_shallow_preset, use_hub_cache

from models import backbones
from models.encoders import load_encoder
from models.zoo import PRESETS, PresetEmbedding
from pipelines.cli import main
from wsi.io import read_features

PRESET = "kaiko-vits16"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    sd, sha = cache_shallow_preset(root, PRESET, depth=4)
    return root, sd, sha


def test_embed_with_a_preset_records_its_provenance(hub, demo_slide, tmp_path):
    root, _, sha = hub
    env = {**one_thread_env(), "HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "pipelines", "embed", "--slides", str(demo_slide), "--out", str(out)]
    cmd += ["--encoder", PRESET, "--tissue-method", "otsu", "--no-progress", "batch_size=32"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    f = read_features(out / "CMU-1-Small-Region.h5")
    assert f.features.shape == (len(f.coords), 384) and len(f.coords) > 10
    a = f.attrs
    assert (a["encoder"], a["encoder_preset"]) == (PRESET, PRESET)
    assert a["encoder_hub_id"] == PRESETS[PRESET].hub_id and a["encoder_hub_revision"] == COMMIT
    assert a["encoder_weights_sha256"] == sha and a["encoder_pooling"] == "cls"
    assert json.loads(a["encoder_timm_kwargs"])["depth"] == 4  # from the snapshot's config.json
    # TRIDENT's names on the datasets (Patho-Bench reads them), consistent with slidestream's own
    c = f.coords_attrs
    assert c["patch_size"] == 224 and c["patch_size_level0"] == a["tile_size_level0"] and c["overlap"] == 0
    assert c["target_magnification"] == pytest.approx(10 / 0.5) and c["name"] == "CMU-1-Small-Region"
    assert c["level0_magnification"] == pytest.approx(10 / a["slide_mpp"])
    assert c["patch_size"] * c["level0_magnification"] / c["target_magnification"] == pytest.approx(
        c["patch_size_level0"], abs=0.5
    )
    assert (c["level0_width"], c["level0_height"]) == (a["slide_width"], a["slide_height"])
    assert f.features_attrs["name"] == "CMU-1-Small-Region" and f.layout == "slidestream"


def test_a_missing_preset_is_one_line_with_the_fix(tmp_path, demo_slide, monkeypatch, capsys):
    use_hub_cache(monkeypatch, tmp_path / "empty")
    argv = ["embed", "--slides", str(demo_slide), "--out", str(tmp_path / "o"), "--encoder", "uni"]
    assert main([*argv, "--no-isolation"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("slidestream embed: error: MahmoodLab/UNI: ")
    assert (
        "accept the licence at https://huggingface.co/MahmoodLab/UNI" in line and "local weights file" in line
    )


def test_finetune_trains_the_last_block_of_a_preset(hub, monkeypatch, tmp_path):
    from pipelines.config import load_config
    from pipelines.finetune import FinetuneConfig, load_classifier, run_training
    from pipelines.tasks import DEMO_TILES

    root, sd, sha = hub
    use_hub_cache(monkeypatch, root)
    out = tmp_path / "ft"
    over = [f"out={out}", f"data.train.csv={DEMO_TILES}", f"model.encoder={PRESET}", "model.mode=last_n"]
    over += [
        "model.last_n=1",
        "train.steps=3",
        "train.batch_size=8",
        "train.threads=1",
        "train.progress=false",
    ]
    over += ["train.val_every=0"]
    run_training(load_config(FinetuneConfig, REPO / "pipelines/configs/finetune/ce.yaml", over), quiet=True)
    meta = backbones.read_metadata(out / "encoder.safetensors")
    assert (
        meta["preset"] == PRESET
        and meta["base_hub_revision"] == COMMIT
        and meta["base_weights_sha256"] == sha
    )
    enc = load_encoder(out / "encoder.safetensors")
    assert isinstance(enc.model, PresetEmbedding) and enc.name == PRESET and enc.mean == (0.5, 0.5, 0.5)
    tuned = enc.model.trunk.state_dict()
    # frozen blocks keep the hub's tensors (no zero-γ on a pretrained preset); the last block trained
    for k in ("blocks.0.mlp.fc2.weight", "blocks.2.attn.qkv.weight", "patch_embed.proj.weight"):
        assert torch.equal(tuned[k], sd[k]), k
    assert not torch.equal(tuned["blocks.3.mlp.fc2.weight"], sd["blocks.3.mlp.fc2.weight"])
    clf = load_classifier(out)
    assert clf.arch == "vit_small_patch16_224" and clf.mean == (0.5, 0.5, 0.5)


def _cli(*argv: str) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(list(argv)) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_segment_train_and_predict_on_a_preset_backbone(hub, monkeypatch, tmp_path):
    from pipelines.segment.predict import load_model
    from pipelines.tasks import TASK_CLASSES, make_exact_label_task

    root, sd, _ = hub
    use_hub_cache(monkeypatch, root)
    train = make_exact_label_task(tmp_path / "train", seed=0, size=(256, 256))
    val = make_exact_label_task(tmp_path / "val", seed=1, size=(256, 256))
    cfg = {
        "model": {"kind": "linear", "backbone": PRESET, "freeze_encoder": True},
        "data": {
            "train": [{"slide": train["slide"], "annotations": train["geojson"]}],
            "val": [{"slide": val["slide"], "annotations": val["labels"]}],
            "classes": TASK_CLASSES,
            "mpp": 2.0,
            "tile_size": 64,
            "val_max_tiles": 4,
        },
        "train": {"steps": 2, "batch_size": 2, "val_every": 2, "device": "cpu", "threads": 1},
    }
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    _cli("segment", "train", "--config", str(tmp_path / "seg.yaml"), "--out", str(out))
    use_hub_cache(monkeypatch, tmp_path / "empty")  # predict rebuilds the model from the checkpoint alone
    model, _ = load_model(out / "checkpoint.pt", torch.device("cpu"))
    assert model.config["backbone"] == PRESET and model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    body = model.encoder.body.model.state_dict()
    assert torch.equal(body["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])  # frozen: the hub's
    pred = _cli(
        "segment", "predict", "--slide", val["slide"], "--checkpoint", str(out / "checkpoint.pt"),
        "--out", str(tmp_path / "pred"),
    )  # fmt: skip
    assert pred["shape"] == [128, 128]


def test_eval_segmentation_task_takes_a_preset():
    from pipelines.evaluate.tasks import _seg_backbone

    hub_id = PRESETS[PRESET].hub_id
    assert _seg_backbone(f"hf-hub:{hub_id}") == (PRESET, None, None)
    assert _seg_backbone(f"{PRESET}=/w.safetensors") == (PRESET, "/w.safetensors", None)
