"""models.finetune.model: the classifier, which encoder parameters train in each mode, zero-γ
initialisation (each residual block starts as the identity), and the encoder loader's training
options (models.encoders.load_encoder seed and timm options)."""

from __future__ import annotations

import pytest
import timm
import torch

from models import backbones
from models.encoders import load_encoder
from models.finetune import Classifier, block_groups, set_trainable, zero_init_residual


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **kw)


def test_classifier_outputs_and_projection():
    enc = timm.create_model("resnet10t", num_classes=0)
    m = Classifier(enc, enc.num_features, [3, 2], proj_dim=16)
    f, logits = m(torch.rand(4, 3, 32, 32))
    assert f.shape == (4, enc.num_features) and [z.shape for z in logits] == [(4, 3), (4, 2)]
    assert m.project(f).shape == (4, 16)
    with pytest.raises(ValueError, match="at least 2 classes"):
        Classifier(enc, enc.num_features, [1])
    with pytest.raises(RuntimeError, match="projection head"):
        Classifier(enc, enc.num_features, [2]).project(f)


def test_modes_freeze_what_they_say():
    enc = timm.create_model("resnet18", num_classes=0)
    m = Classifier(enc, enc.num_features, [3])
    assert set_trainable(m, "linear") == []
    assert all(not p.requires_grad for p in enc.parameters())
    assert all(p.requires_grad for p in m.heads.parameters())
    m.train()
    assert not enc.bn1.training and m.heads.training  # frozen batch norms keep their statistics
    x = torch.rand(4, 3, 32, 32)
    before = enc.bn1.running_mean.clone()
    m(x)
    assert torch.equal(enc.bn1.running_mean, before)

    names = set_trainable(m, "last_n", 2)
    assert names and all(n.startswith("layer4.") for n in names)  # resnet18: blocks layer4.0, layer4.1
    assert {n.split(".")[1] for n in names} == {"0", "1"}
    m.train()
    assert enc.layer4[0].bn1.training and not enc.layer1[0].bn1.training
    assert len(set_trainable(m, "full")) == len(list(enc.parameters()))
    with pytest.raises(ValueError, match="has 8 blocks"):
        set_trainable(m, "last_n", 9)

    vit = Classifier(_vit(), 192, [2])
    names = set_trainable(vit, "last_n", 1)
    assert set(names) == {
        n for n, _ in vit.encoder.named_parameters() if n.startswith(("blocks.11.", "norm."))
    }
    cnx = timm.create_model("convnext_atto", num_classes=0)
    names = set_trainable(Classifier(cnx, cnx.num_features, [2]), "last_n", 1)
    assert "head.norm.weight" in names and any(n.startswith("stages.3.blocks.1.") for n in names)
    assert not any(n.startswith("stages.3.blocks.0.") for n in names)  # the final norm is not a block
    assert len(block_groups(cnx)) == 14


def test_zero_init_makes_every_residual_block_the_identity():
    # ResNet: the last BN γ of each block; timm's own default, switched off here to see it act
    r = timm.create_model("resnet18", num_classes=0, zero_init_last=False)
    assert float(r.layer1[0].bn2.weight.detach().abs().sum()) > 0
    names = zero_init_residual(r)
    assert len(names) == 8 and all(n.endswith("bn2.weight") for n in names)
    x = torch.rand(2, 64, 8, 8)
    r.eval()
    blk = r.layer1[0]  # identity shortcut: block(x) = relu(x + 0)
    torch.testing.assert_close(blk(x), torch.relu(x))

    # ViT without LayerScale: attn.proj and mlp.fc2 start at zero, so each block returns its input
    v = _vit()
    names = zero_init_residual(v)
    assert len(names) == 12 * 4 and {n.split(".", 2)[2] for n in names} == {
        "attn.proj.weight",
        "attn.proj.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    }
    t = torch.randn(2, 5, 192)
    for blk in v.blocks:
        torch.testing.assert_close(blk(t), t)
    # and it still learns: the zeroed layers get a gradient
    (v(torch.rand(2, 3, 32, 32)) * torch.randn(192)).sum().backward()  # not a plain sum: LayerNorm
    assert float(v.blocks[3].attn.proj.weight.grad.abs().sum()) > 0

    # ViT with LayerScale: γ itself is zeroed, the projections keep their initialisation
    ls = _vit(init_values=1e-5)
    names = zero_init_residual(ls)
    assert len(names) == 24 and all(n.endswith("gamma") for n in names)
    assert float(ls.blocks[0].attn.proj.weight.detach().abs().sum()) > 0
    for blk in ls.blocks:
        torch.testing.assert_close(blk(t), t)
    assert zero_init_residual(timm.create_model("convnext_atto", num_classes=0)) == []


def test_load_encoder_seed_and_timm_options(tmp_path):
    a, b = load_encoder("resnet10t", seed=0), load_encoder("resnet10t", seed=1)
    assert a.weights_sha256 == "random-init-seed0" and b.weights_sha256 == "random-init-seed1"
    wa, wb = a.model.conv1[0].weight, b.model.conv1[0].weight
    assert not torch.equal(wa, wb) and torch.equal(wa, load_encoder("resnet10t").model.conv1[0].weight)
    r = load_encoder("resnet18", zero_init_last=False).model
    assert float(r.layer1[0].bn2.weight.detach().abs().sum()) > 0
    v = load_encoder("vit_tiny_patch16_224", drop_path_rate=0.2, zero_init_last=False).model
    assert v.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # zero_init_last dropped for ViTs
    path = backbones.save_backbone(a.model, tmp_path / "w.safetensors")
    re = load_encoder(str(path), drop_path_rate=0.1)
    assert torch.equal(re.model.conv1[0].weight, wa)
