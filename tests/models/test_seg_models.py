"""Segmentation models: output shapes on CNN and plain-ViT backbones, the multi-scale encoder's
strides, frozen encoders, and rebuilding from ``model.config``."""

from __future__ import annotations

import pytest
import torch

from models.seg.decoders import LinearDecoder, SegModel, create_segmenter
from models.seg.segformer import MultiScaleEncoder, SegFormerHead


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "segformer", "backbone": "resnet18", "embed_dim": 32},
        {"kind": "segformer", "backbone": "vit_tiny_patch16_224", "img_size": 64, "embed_dim": 32},
        {"kind": "linear", "backbone": "resnet18", "scales": "all"},
        {"kind": "unet", "unet_depth": 2, "unet_width": 4},
    ],
    ids=["segformer-resnet18", "segformer-vit", "linear-resnet18-ms", "unet"],
)
def test_logits_at_input_size(kwargs):
    model = create_segmenter(n_classes=3, **kwargs).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 3, 64, 96)
    assert torch.isfinite(out).all()
    if kwargs["kind"] == "linear":
        return
    # the config rebuilds the same architecture (same state-dict keys and shapes)
    cfg = dict(model.config)
    twin = create_segmenter(cfg.pop("kind"), **cfg)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        # same weights, same arithmetic: logits are O(1-10), so relative plus a small floor
        assert torch.allclose(twin.eval()(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,plain", [("resnet10t", False), ("vit_tiny_patch16_224", True)])
def test_multiscale_encoder_strides(name, plain):
    enc = MultiScaleEncoder(name, img_size=64).eval()
    assert enc.plain is plain
    assert enc.strides == [4, 8, 16, 32]
    with torch.no_grad():
        feats = enc(torch.rand(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == enc.channels
    if plain:  # simple feature pyramid on four evenly spaced blocks of 12
        assert tuple(enc.body.feature_info.out_indices) == (2, 5, 8, 11)


def test_frozen_encoder_gets_no_gradients():
    model = create_segmenter("segformer", backbone="resnet10t", n_classes=2, embed_dim=16).freeze_encoder()
    model.train()
    assert not model.encoder.training  # BN statistics stay fixed
    bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    x = torch.rand(2, 3, 64, 64)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
    assert torch.equal(bn.running_mean, before)
    model.freeze_encoder(False)
    model(x).mean().backward()
    assert any(p.grad is not None for p in model.encoder.parameters())


def test_unet_has_no_encoder_to_freeze():
    model = create_segmenter("unet", n_classes=1, unet_depth=2, unet_width=4)
    with pytest.raises(ValueError, match="no separate encoder"):
        model.freeze_encoder()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown segmenter kind"):
        create_segmenter("fcn", n_classes=2)
    with pytest.raises(ValueError, match="needs backbone"):
        create_segmenter("segformer", n_classes=2)
    with pytest.raises(ValueError, match="scales"):
        LinearDecoder([8], 2, scales="some")


def test_segformer_head_fuses_all_scales():
    head = SegFormerHead([4, 8, 16, 32], n_classes=2, embed_dim=8, dropout=0.0).eval()
    feats = [torch.rand(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([4, 8, 16, 32])]
    base = head(feats)
    assert base.shape == (1, 2, 32, 32)
    for i in range(4):  # every scale influences the output
        changed = [f.clone() for f in feats]
        changed[i] += 1.0
        assert not torch.allclose(head(changed), base)


def test_segmodel_normalises_input():
    dec = torch.nn.Identity()
    model = SegModel(None, dec)
    x = torch.full((1, 3, 4, 4), 0.5)
    want = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(model(x)[0, :, 0, 0], want)


def test_encoder_weights_load_into_the_feature_wrapper(tmp_path):
    """A plain backbone file (``models.backbones.save_backbone``) initialises the encoder of a
    ViT segmenter, whose timm feature wrapper holds the model as ``.model``."""
    from models import backbones

    vit = backbones.create("vit_tiny_patch16_224", img_size=32)
    path = backbones.save_backbone(vit, tmp_path / "vit.safetensors")
    model = create_segmenter(
        "segformer", backbone="vit_tiny_patch16_224", img_size=32, weights=str(path), n_classes=2, embed_dim=8
    )
    inner = model.encoder.body.model.state_dict()
    for k, v in vit.state_dict().items():
        if k in inner:
            assert torch.equal(inner[k], v), k
    assert torch.equal(inner["blocks.3.mlp.fc1.weight"], vit.state_dict()["blocks.3.mlp.fc1.weight"])
    with pytest.raises(backbones.WeightsError, match="not in the file"):
        MultiScaleEncoder("resnet10t", weights=str(path))
