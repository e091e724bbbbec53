"""models.backbones: timm factory, safe weight loading, export with metadata."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from models import backbones


def _tiny(**kw):
    return backbones.create("vit_tiny_patch16_224", img_size=32, **kw)


def test_create_vit_dynamic_size_and_feature_dim():
    m = _tiny()
    assert backbones.feature_dim(m) == 192
    m.eval()
    with torch.no_grad():
        assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 192)
        assert m(torch.zeros(2, 3, 16, 16)).shape == (2, 192)  # local crops: other sizes work
    r = backbones.create("resnet18", img_size=64)  # size options are dropped for CNNs
    assert backbones.feature_dim(r) == 512


def test_pretrained_true_refuses_download():
    with pytest.raises(ValueError, match="weights=FILE"):
        backbones.create("resnet18", pretrained=True)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.create("not_a_model_xyz")


def test_save_and_create_auto_round_trip(tmp_path):
    torch.manual_seed(0)
    m = _tiny()
    path = backbones.save_backbone(m, tmp_path / "enc.safetensors", {"method": "dino"})
    assert (tmp_path / "enc.json").exists()
    m2 = backbones.create(None, weights=path)
    assert backbones.architecture(m2) == "vit_tiny_patch16_224"
    assert backbones.image_size(m2) == 32
    assert m2.load_report.ok and m2.load_report.metadata["method"] == "dino"
    assert m2.load_report.sha256 == backbones.weights_sha256(path)
    x = torch.randn(1, 3, 32, 32)
    m.eval(), m2.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x))


def test_nested_prefixed_torch_checkpoint(tmp_path):
    torch.manual_seed(1)
    src = _tiny()
    sd = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    sd["module.head.last_layer.weight_v"] = torch.zeros(4, 4)  # a DINO head key: unexpected
    torch.save({"teacher": sd, "step": 3}, tmp_path / "ck.pt")
    m = backbones.create("vit_tiny_patch16_224", img_size=32, weights=tmp_path / "ck.pt")
    assert m.load_report.missing == []
    assert m.load_report.unexpected == ["head.last_layer.weight_v"]
    torch.testing.assert_close(m.state_dict()["pos_embed"], src.state_dict()["pos_embed"])
    with pytest.raises(ValueError, match="unexpected"):
        backbones.create("vit_tiny_patch16_224", img_size=32, weights=tmp_path / "ck.pt", strict=True)


def test_pos_embed_resampled_for_other_image_size(tmp_path):
    src = _tiny()
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    m = backbones.create("vit_tiny_patch16_224", img_size=64, weights=tmp_path / "w.safetensors")
    assert m.load_report.resized == ["pos_embed"]
    assert m.pos_embed.shape == (1, 17, 192)


def test_shape_mismatch_is_clear(tmp_path):
    save_file(_tiny().state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="shapes do not match"):
        backbones.create("vit_small_patch16_224", img_size=32, weights=tmp_path / "w.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(ValueError, match="safe torch checkpoint"):
        backbones.create("resnet18", weights=path)


def test_missing_file_and_no_metadata(tmp_path):
    with pytest.raises(FileNotFoundError):
        backbones.create("resnet18", weights=tmp_path / "nope.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no architecture name"):
        backbones.create("auto", weights=tmp_path / "plain.safetensors")


def test_zero_init_last_resnet():
    r = backbones.create("resnet18", zero_init_last=True)
    assert float(r.layer1[0].bn2.weight.detach().abs().sum()) == 0.0
    r = backbones.create("resnet18", zero_init_last=False)
    assert float(r.layer1[0].bn2.weight.detach().abs().sum()) > 0.0
    backbones.create("vit_tiny_patch16_224", img_size=32, zero_init_last=True)  # ignored by ViTs


def test_timm_kwargs_travel_in_metadata(tmp_path):
    m = backbones.create("vit_tiny_patch16_224", img_size=32, patch_size=8)
    path = backbones.save_backbone(m, tmp_path / "p8.safetensors", {"timm_kwargs": {"patch_size": 8}})
    m2 = backbones.create("auto", weights=path)
    assert m2.patch_embed.patch_size == (8, 8) and m2.load_report.ok
