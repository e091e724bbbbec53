"""Weights never execute code (issue 12 §5), in the model layer: a pickle that writes a marker file
when unpickled, and weights files whose metadata, JSON sidecar, checkpoint model config or hub
``config.json`` name a checkpoint for timm to load, go through every loader of ``models``. Each is
refused with a WeightsError naming the file (and the key); the marker never appears. The payload
is live: unpickled the unsafe way it does write the marker (the first test), and timm itself —
at the version installed, which the ``timm>=1.0.26`` pin guarantees — refuses to unpickle it."""

from __future__ import annotations

import io
import json

import pytest
import torch
from hostile import evil_pickle, weights_with_metadata
from zoo_helpers import add_to_hub_cache, json_bytes, safetensors_bytes

from models import backbones
from models.backbones import ARCH_KEYS, WeightsError, check_arch_kwargs
from models.encoders import load_encoder
from models.seg import tissue_net
from models.seg.decoders import segmenter_from_config

ARCH = "resnet10t"


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    path = evil_pickle(tmp_path / "evil.pt", marker)
    yield path, marker
    assert not marker.exists(), "a pickle's code ran"


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "PWNED"
    path = evil_pickle(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)  # what slidestream never does
    assert marker.exists()


def test_installed_timm_loads_checkpoints_without_unpickling(evil):
    """What a ``checkpoint_path`` in a file's metadata would have reached: timm's own loader. With
    timm >= 1.0.26 it refuses the pickle (1.0.25 and earlier run it)."""
    import timm

    path, _ = evil
    with pytest.raises(Exception, match="(?i)weights.?only|unpickl"):
        timm.create_model(ARCH, pretrained=False, checkpoint_path=str(path))


def test_pickles_are_refused_by_every_weights_reader(evil, tmp_path):
    path, _ = evil
    with pytest.raises(WeightsError, match="weights_only"):
        backbones.load_state_dict(path)
    with pytest.raises(WeightsError, match="weights_only"):
        backbones.create(ARCH, weights=path)
    with pytest.raises(WeightsError, match="weights_only"):
        load_encoder(f"{ARCH}={path}")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(path.read_bytes())
    for load in (backbones.load_state_dict, backbones.read_metadata, lambda p: load_encoder(str(p))):
        with pytest.raises(WeightsError, match="not a readable safetensors") as ei:
            load(disguised)
        assert str(disguised) in str(ei.value)
    with pytest.raises(WeightsError, match="must be a .safetensors"):
        tissue_net.load(path)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        tissue_net.load(disguised)


@pytest.mark.parametrize(
    "timm_kwargs, key",
    [
        ({"checkpoint_path": "EVIL"}, "checkpoint_path"),
        ({"pretrained": True}, "pretrained"),
        ({"pretrained_cfg_overlay": {"file": "EVIL"}}, "pretrained_cfg_overlay"),
        ({"pretrained_cfg": {"file": "EVIL"}}, "pretrained_cfg"),
        ({"cache_dir": "/tmp"}, "cache_dir"),
        ({"features_only": True}, "features_only"),
        ({"global_pool": "../../EVIL"}, "global_pool"),
        ({"act_layer": "/abs/path"}, "act_layer"),
    ],
)
def test_metadata_and_sidecars_set_architecture_keys_only(evil, tmp_path, timm_kwargs, key):
    path, _ = evil
    kw = json.loads(json.dumps(timm_kwargs).replace("EVIL", str(path)))
    w = weights_with_metadata(tmp_path / "w.safetensors", ARCH, {"timm_kwargs": kw})
    s = weights_with_metadata(tmp_path / "s.safetensors", ARCH, {}, sidecar={"timm_kwargs": kw})
    for f in (w, s):
        for load in (lambda p: backbones.create(None, weights=p), lambda p: load_encoder(str(p))):
            with pytest.raises(WeightsError, match=key) as ei:
                load(f)
            assert str(f) in str(ei.value)


def test_architecture_names_from_files_are_plain(tmp_path):
    for name in ("hf-hub:org/evil", "local-dir:/tmp/evil", "../evil"):
        w = weights_with_metadata(tmp_path / "w.safetensors", ARCH, {"timm_name": name})
        with pytest.raises(WeightsError, match="not a plain timm model name"):
            backbones.create(None, weights=w)


def test_what_the_project_writes_still_loads(tmp_path):
    torch.manual_seed(0)
    m = backbones.create("vit_tiny_patch16_224", img_size=32, patch_size=8)
    p = backbones.save_backbone(
        m, tmp_path / "b.safetensors", {"timm_kwargs": {"patch_size": 8, "drop_path_rate": 0.1}}
    )
    again = backbones.create(None, weights=p)
    assert again.patch_embed.patch_size == (8, 8) and again.load_report.ok
    assert check_arch_kwargs({"img_size": 224, "reg_tokens": 4, "mlp_ratio": 5.3, "depths": [2, 2]}, "x")
    assert {
        "img_size",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "global_pool",
        "reg_tokens",
    } <= ARCH_KEYS


def test_segmentation_model_configs_set_architecture_keys_only(evil):
    path, _ = evil
    base = {
        "kind": "linear",
        "n_classes": 2,
        "backbone": ARCH,
        "img_size": None,
        "scales": "last",
        "dropout": 0.0,
    }
    assert segmenter_from_config(base, "ckpt.pt").config["backbone"] == ARCH
    for key, value in (("checkpoint_path", str(path)), ("weights", str(path)), ("pretrained", True)):
        with pytest.raises(WeightsError, match=key) as ei:
            segmenter_from_config({**base, key: value}, "ckpt.pt")
        assert "ckpt.pt" in str(ei.value)
    for name in ("hf-hub:org/evil", "local-dir:/tmp/evil"):
        with pytest.raises(WeightsError, match="backbone"):
            segmenter_from_config({**base, "backbone": name}, "ckpt.pt")


def test_tissue_net_config_from_metadata(evil, tmp_path):
    path, _ = evil
    net = tissue_net.build()
    good = tissue_net.save(net, tmp_path / "t.safetensors")
    assert tissue_net.load(good) is not None
    from safetensors.torch import save_file

    cfg = {**net.config, "checkpoint_path": str(path)}
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"config": json.dumps(cfg)})
    with pytest.raises(WeightsError, match="checkpoint_path"):
        tissue_net.load(tmp_path / "bad.safetensors")


def test_zoo_local_files_and_hub_cache_config(evil, tmp_path):
    from models.zoo import PRESETS, build_trunk, with_kwargs
    from models.zoo import load_encoder as zoo_load

    path, _ = evil
    preset = with_kwargs(PRESETS["kaiko-vits16"], depth=1)
    with pytest.raises(WeightsError, match="weights_only"):
        zoo_load(preset, weights=path)
    torch.manual_seed(0)
    sd = build_trunk(preset).state_dict()
    local = tmp_path / "local"
    local.mkdir()
    (local / "model.safetensors").write_bytes(safetensors_bytes(sd))
    evil_cfg = {"architecture": preset.arch, "model_args": {"checkpoint_path": str(path)}}
    (local / "config.json").write_text(json.dumps(evil_cfg))
    with pytest.raises(WeightsError, match="checkpoint_path") as ei:
        zoo_load(preset, weights=local / "model.safetensors")
    assert "config.json" in str(ei.value)
    fname = preset.files[-1]
    if fname.endswith(".safetensors"):
        data = safetensors_bytes(sd)
    else:
        buf = io.BytesIO()
        torch.save(sd, buf)
        data = buf.getvalue()
    cache = tmp_path / "cache"
    files = {fname: data, "config.json": json_bytes(evil_cfg)}
    add_to_hub_cache(cache, preset.hub_id, files)
    with pytest.raises(WeightsError, match="checkpoint_path"):
        zoo_load(preset, cache_dir=cache, offline=True)
    # a hub config with architecture keys loads (the layer names are the preset's)
    ok = {"architecture": preset.arch, "model_args": {"img_size": 224, "mlp_layer": "timm.layers.Mlp"}}
    add_to_hub_cache(tmp_path / "ok", preset.hub_id, {fname: data, "config.json": json_bytes(ok)})
    assert zoo_load(preset, cache_dir=tmp_path / "ok", offline=True).dim == preset.dim
