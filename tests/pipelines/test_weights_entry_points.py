"""Weights never execute code (issue 12 §5), through every command that takes weights: a pickle that
writes a marker file when unpickled, disguised as each kind of weights file, and weights whose
metadata name a checkpoint for timm to load. Every command stops with one line naming the file
(exit 2) and the marker never appears:

- ``embed --encoder`` (a .pt pickle, the pickle named .safetensors, metadata ``checkpoint_path``);
- ``eval --encoder``;
- ``segment predict --checkpoint`` (a pickle; a checkpoint whose model_config names a checkpoint);
- ``pretrain --resume`` (OUT/checkpoint.pt a pickle);
- ``mil predict`` and ``mil heatmap --model`` (fold0.safetensors a pickle; model.json options);
- ``tissue qc --weights`` (a pickle; a safetensors whose config names a checkpoint);
- ``finetune --encoder``, ``--teacher`` (head.safetensors a pickle; a head pointing at another
  file) and ``--resume``.

(The zoo's local-file and hub-cache paths are in tests/models/test_weights_safety.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEMO_SLIDE, REPO, make_mil_archive
from hostile import evil_pickle, weights_with_metadata

from pipelines.cli import main

ARCH = "resnet10t"


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    pt = evil_pickle(tmp_path / "evil.pt", marker)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pt.read_bytes())
    meta = weights_with_metadata(
        tmp_path / "meta.safetensors", ARCH, {"timm_kwargs": {"checkpoint_path": str(pt)}}
    )
    yield {"pt": pt, "disguised": disguised, "meta": meta}
    assert not marker.exists(), "a pickle's code ran"


def _refused(capsys, argv: list[str], *expect: str) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for e in expect:
        assert e in err, (argv, err[-1500:])


@pytest.mark.parametrize("kind", ["pt", "disguised", "meta"])
def test_embed_and_eval_encoders(evil, tmp_path, capsys, kind):
    w = evil[kind]
    enc = f"{ARCH}={w}" if kind == "pt" else str(w)
    common = ["--no-progress"]
    _refused(
        capsys,
        ["embed", "--slides", str(DEMO_SLIDE), "--encoder", enc, "--out", str(tmp_path / "e"), *common],
        str(w),
    )
    task = tmp_path / "task"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (task / split / c).mkdir(parents=True)
            from PIL import Image

            Image.new("RGB", (32, 32), (40, 80, 120) if c == "a" else (200, 90, 10)).save(
                task / split / c / "x.png"
            )
    _refused(
        capsys, ["eval", "--encoder", enc, "--patch-task", str(task), "--out", str(tmp_path / "v")], str(w)
    )


def test_segment_predict_checkpoints(evil, tmp_path, capsys):
    from models.seg.decoders import create_segmenter

    base = ["segment", "predict", "--slide", str(DEMO_SLIDE), "--out", str(tmp_path / "p"), "--checkpoint"]
    _refused(capsys, [*base, str(evil["pt"])], str(evil["pt"]), "weights_only")
    model = create_segmenter("linear", n_classes=2, backbone=ARCH)
    cfg = {**model.config, "checkpoint_path": str(evil["pt"])}
    ckpt = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model_config": cfg,
            "model": model.state_dict(),
            "classes": ["a", "b"],
            "mpp": 4.0,
            "tile_size": 64,
        },
        ckpt,
    )
    _refused(capsys, [*base, str(ckpt)], str(ckpt), "checkpoint_path")


def test_pretrain_resume(evil, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(evil["pt"], out / "checkpoint.pt")
    tiny = [
        f"data.slides={DEMO_SLIDE}", "data.tile_size=48", "data.num_workers=0", "model.img_size=32",
        "augment.global_size=32", "augment.local_size=16", "augment.n_local=2", "ssl.out_dim=64",
        "ssl.hidden_dim=64", "ssl.bottleneck_dim=32", "ssl.proj_dim=16", "train.batch_size=4",
        "train.threads=1", "train.progress=false",
    ]  # fmt: skip
    argv = [
        "pretrain",
        "--config",
        str(REPO / "pipelines/configs/pretrain/tiny-cpu.yaml"),
        "--out",
        str(out),
        "--resume",
    ]
    _refused(capsys, [*argv, *tiny], str(out / "checkpoint.pt"), "weights_only")


def test_mil_model_directories(evil, tmp_path, capsys):
    from pipelines.mil.config import MILConfig
    from pipelines.mil.model import MultiTaskMIL, head_kwargs, save_model_dir

    feats, _ = make_mil_archive(tmp_path, n_patients=2)
    cfg = MILConfig()
    m = MultiTaskMIL("abmil", 16, {"label": 2}, head_kwargs(cfg.head))
    model = tmp_path / "model"
    save_model_dir(model, cfg, 16, ["label"], {"label": ["normal", "tumor"]}, [m], [{}])
    predict = [
        "mil",
        "predict",
        "--model",
        str(model),
        "--features",
        str(feats),
        "--out",
        str(tmp_path / "p.csv"),
    ]
    assert main(predict) == 0  # the model directory as written loads
    shutil.copy(evil["pt"], model / "fold0.safetensors")
    _refused(capsys, predict, str(model / "fold0.safetensors"), "not a readable safetensors")
    heat = [
        "mil",
        "heatmap",
        "--model",
        str(model),
        "--features",
        str(next(feats.glob("*.h5"))),
        "--out",
        str(tmp_path / "h"),
    ]
    _refused(capsys, heat, str(model / "fold0.safetensors"))
    save_model_dir(model, cfg, 16, ["label"], {"label": ["normal", "tumor"]}, [m], [{}])
    meta = json.loads((model / "model.json").read_text())
    meta["head_kwargs"]["checkpoint_path"] = str(evil["pt"])
    (model / "model.json").write_text(json.dumps(meta))
    _refused(capsys, predict, str(model / "model.json"), "checkpoint_path")


def test_tissue_weights(evil, tmp_path, capsys):
    from safetensors.torch import save_file

    from models.seg import tissue_net

    net = tissue_net.build()
    bad = tmp_path / "bad.safetensors"
    cfg = {**net.config, "checkpoint_path": str(evil["pt"])}
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        str(bad),
        metadata={"config": json.dumps(cfg)},
    )
    base = [
        "tissue",
        "qc",
        "--slides",
        str(DEMO_SLIDE),
        "--out",
        str(tmp_path / "q"),
        "--method",
        "unet",
        "--weights",
    ]
    _refused(capsys, [*base, str(evil["pt"])], str(evil["pt"]), ".safetensors")
    _refused(capsys, [*base, str(evil["disguised"])], str(evil["disguised"]), "not a readable safetensors")
    _refused(capsys, [*base, str(bad)], str(bad), "checkpoint_path")


def test_finetune_encoder_teacher_and_resume(evil, tmp_path, capsys):
    from pipelines.tasks import DEMO_TILES

    out = tmp_path / "ft"
    fast = [f"data.train.csv={DEMO_TILES}", "train.steps=1", "train.batch_size=4", "train.threads=1",
            "train.progress=false", "train.val_every=0"]  # fmt: skip

    def cmd(recipe: str, *extra: str) -> list[str]:
        return [
            "finetune",
            "--config",
            str(REPO / f"pipelines/configs/finetune/{recipe}.yaml"),
            "--out",
            str(out),
            *extra,
            *fast,
        ]

    _refused(capsys, cmd("ce", "--encoder", f"test_resnet={evil['pt']}"), str(evil["pt"]), "weights_only")
    _refused(capsys, cmd("ce", "--encoder", str(evil["meta"])), str(evil["meta"]), "checkpoint_path")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    shutil.copy(evil["pt"], teacher / "head.safetensors")
    head = str(teacher / "head.safetensors")
    _refused(capsys, cmd("kd", "--teacher", str(teacher)), head, "not a readable safetensors")
    from safetensors.torch import save_file

    tensors = {"heads.label.weight": torch.zeros(2, 4), "heads.label.bias": torch.zeros(2)}
    meta = {"tasks": '["label"]', "classes": '[["a", "b"]]', "encoder": str(evil["meta"])}
    save_file(tensors, head, metadata=meta)
    _refused(capsys, cmd("kd", "--teacher", str(teacher)), head, "not a file next to it")
    out.mkdir(exist_ok=True)
    shutil.copy(evil["pt"], out / "checkpoint.pt")
    _refused(capsys, cmd("ce", "--resume"), str(out / "checkpoint.pt"), "weights_only")
