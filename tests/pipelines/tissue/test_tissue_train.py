"""`slidestream tissue train`: a tiny real training run writes safetensors + recipe, and
fine-tunes from --init on user pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TESTDATA

from models.seg import tissue_net
from pipelines.cli import main
from pipelines.tissue import load_pairs


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    from PIL import Image

    from wsi.tissue import synth as tissue_synth

    d = tmp_path_factory.mktemp("pairs")
    sources = tissue_synth.load_sources(
        tissue_synth.default_source_paths(tissue_synth.testdata_sources(TESTDATA))
    )
    for i in range(2):
        rgb, mask, _ = tissue_synth.make_pair(sources, 99, i, size=(96, 112))
        Image.fromarray(rgb).save(d / f"case{i}_thumb.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(d / f"case{i}_mask.png")
    sub = d / "case2"
    sub.mkdir()
    rgb, mask, _ = tissue_synth.make_pair(sources, 99, 2, size=(80, 80))
    Image.fromarray(rgb).save(sub / "thumb.png")
    # a mask at half resolution: resized (nearest) to the thumbnail
    Image.fromarray(mask[::2, ::2].astype(np.uint8) * 255).save(sub / "mask.png")
    return d


def _weights(path):
    state, meta = tissue_net.read_weights(path)
    return state, meta


def test_train_then_finetune(tmp_path, pairs_dir):
    out = tmp_path / "w.safetensors"
    tiny = [
        "--steps",
        "3",
        "--pool",
        "2",
        "--pool-size",
        "96",
        "--crop",
        "64",
        "--batch-size",
        "2",
        "--width",
        "4",
        "--eval-n",
        "0",
        "--threads",
        "1",
    ]
    assert main(["tissue", "train", "--out", str(out), "--seed", "3", *tiny]) == 0
    assert out.exists()
    assert out.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON
    recipe = json.loads(out.with_suffix(".json").read_text())
    assert recipe["steps"] == 3 and recipe["seed"] == 3 and recipe["config"]["width"] == 4
    assert recipe["command"].startswith("slidestream tissue train")
    state, meta = _weights(out)
    assert meta["config"]["width"] == 4
    # the recipe is deterministic: the same command gives the same weights
    again = tmp_path / "again.safetensors"
    assert main(["tissue", "train", "--out", str(again), "--seed", "3", *tiny]) == 0
    state2, _ = _weights(again)
    assert all(torch.equal(state[k], state2[k]) for k in state)
    # predict_proba is the sigmoid of an eval-mode forward (BatchNorm on running statistics) and
    # leaves the model's mode and torch's thread count as it found them
    net = tissue_net.load(out).train()
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    prob = tissue_net.predict_proba(img, model=net)
    assert net.training and torch.get_num_threads() == threads
    with torch.no_grad():
        ref = torch.sigmoid(net.eval()(tissue_net.to_input(torch.from_numpy(img)[None])))[0, 0].numpy()
    assert prob.shape == (50, 70)
    # float32 sums in another order (1 thread in predict_proba, the default here)
    np.testing.assert_allclose(prob, ref, rtol=1e-5, atol=1e-6)

    # fine-tune on user pairs from --init: same architecture, weights moved
    ft = tmp_path / "ft.safetensors"
    assert (
        main(
            [
                "tissue",
                "train",
                "--out",
                str(ft),
                "--pairs",
                str(pairs_dir),
                "--init",
                str(out),
                "--synthetic-fraction",
                "0",
                *tiny,
            ]
        )
        == 0
    )
    recipe = json.loads(ft.with_suffix(".json").read_text())
    assert recipe["user_pairs"] == 3 and recipe["init"] == str(out) and recipe["pool"] == 0
    s0, _ = _weights(out)
    s1, m1 = _weights(ft)
    assert m1["config"]["width"] == 4 and s0.keys() == s1.keys()
    moved = [k for k in s0 if s0[k].is_floating_point() and not torch.equal(s0[k], s1[k])]
    assert moved


def test_load_pairs(pairs_dir, tmp_path):
    pairs = load_pairs(pairs_dir)
    assert len(pairs) == 3
    for rgb, mask in pairs:
        assert rgb.dtype == np.uint8 and rgb.shape[:2] == mask.shape and mask.dtype == bool
    (tmp_path / "x_thumb.png").write_bytes((pairs_dir / "case0_thumb.png").read_bytes())
    with pytest.raises(FileNotFoundError, match="x_mask.png"):
        load_pairs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no pairs"):
        load_pairs(empty)
