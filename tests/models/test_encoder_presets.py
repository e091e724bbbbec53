"""Presets through the one encoder loader (:func:`models.encoders.load_encoder`): the strings that
name them, loading from a hub cache laid out as huggingface_hub lays it out (offline), the preset's
normalisation, input size and embedding rule applied, a fine-tuned preset's export loaded back as
the preset, and a missing model refused with the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled
from zoo_helpers import COMMIT, cache_shallow_preset, use_hub_cache

from models import backbones
from models.encoders import META_PRESET, load_encoder, parse_encoder
from models.zoo import PRESETS, HubWeightsError, PresetEmbedding, build_trunk, with_kwargs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    sd, sha = cache_shallow_preset(root, "kaiko-vits16", depth=2)
    return root, sd, sha


def test_encoder_strings_that_name_presets():
    assert parse_encoder("uni").preset == "uni"
    assert parse_encoder("UNI").preset == "uni"
    s = parse_encoder("hf-hub:MahmoodLab/UNI@abc123")
    assert (s.preset, s.revision, s.name, s.weights) == ("uni", "abc123", None, None)
    s = parse_encoder("kaiko-vits16=/data/w.bin")
    assert (s.preset, s.weights, s.name) == ("kaiko-vits16", "/data/w.bin", None) and s.pretrained
    s = parse_encoder("vit_small_patch16_224")
    assert s.preset is None and not s.pretrained
    assert parse_encoder("vit_small_patch16_224=/x.safetensors").preset is None
    with pytest.raises(backbones.WeightsError, match="not the hub id of a known preset"):
        parse_encoder("hf-hub:someone/some-model")


def test_preset_from_the_hub_cache_applies_its_norm_input_size_and_rule(cache, monkeypatch):
    root, sd, sha = cache
    use_hub_cache(monkeypatch, root)
    enc = load_encoder("hf-hub:1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms")
    assert (enc.name, enc.dim, enc.input_size, enc.fixed_input) == ("kaiko-vits16", 384, 224, True)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    assert enc.weights_sha256 == sha == enc.provenance["encoder_weights_sha256"]
    assert enc.provenance["encoder_hub_revision"] == COMMIT
    assert enc.provenance["encoder_hub_id"] == PRESETS["kaiko-vits16"].hub_id
    # the reference: the cached tensors in a model built here, fed tiles resized to 224 and
    # normalised with kaiko's 0.5/0.5 by hand, pooled as the card says (class token)
    ref = build_trunk(with_kwargs(PRESETS["kaiko-vits16"], depth=2)).eval()
    ref.load_state_dict(sd)
    torch.manual_seed(0)
    tiles = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    x = torch.nn.functional.interpolate(tiles.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        want = ref.forward_features((x - 0.5) / 0.5)[:, 0]
    assert_close_scaled(enc.features(tiles), want, rtol=1e-5)


def test_a_gated_or_missing_preset_says_how_to_fix_it(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(HubWeightsError, match="accept the licence at https://huggingface.co/MahmoodLab/UNI"):
        load_encoder("uni")


def test_an_exported_preset_loads_back_as_the_preset(cache, monkeypatch, tmp_path):
    """What `slidestream finetune` writes for a preset: the trunk's timm keys, the preset's name and
    timm kwargs in the metadata. A kwargs entry that is no architecture key is refused."""
    root, _, _ = cache
    use_hub_cache(monkeypatch, root)
    enc = load_encoder("kaiko-vits16")
    path = tmp_path / "encoder.safetensors"
    meta = {
        META_PRESET: "kaiko-vits16",
        "timm_kwargs": {"depth": 2, "num_classes": 0, "dynamic_img_size": True},
    }
    backbones.save_backbone(enc.model.trunk, path, meta)
    back = load_encoder(path)
    assert isinstance(back.model, PresetEmbedding) and back.name == "kaiko-vits16" and back.fixed_input
    assert back.weights_sha256 == backbones.weights_sha256(path)
    tiles = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    assert torch.equal(back.features(tiles), enc.features(tiles))
    bad = tmp_path / "bad.safetensors"
    backbones.save_backbone(
        enc.model.trunk, bad, {**meta, "timm_kwargs": {"depth": 2, "checkpoint_path": "x"}}
    )
    with pytest.raises(backbones.WeightsError, match="refusing option 'checkpoint_path'"):
        load_encoder(bad)


@pytest.mark.parametrize("name", ["kaiko-vits16", "resnet50-trunc"])
def test_a_preset_has_its_trunks_parameter_groups(name):
    """Layer-wise LR decay and "train the last n blocks" see the same groups through the wrapper."""
    from models.finetune.model import block_groups

    p = PRESETS[name]
    trunk = build_trunk(p if name.startswith("resnet") else with_kwargs(p, depth=2))
    wrapped = block_groups(PresetEmbedding(trunk, p.pooling))
    assert wrapped == [[f"trunk.{n}" for n in g] for g in block_groups(trunk)]
    assert len(wrapped) > 2
