"""models.ssl: DINO head/loss/teacher and SimCLR's NT-Xent against direct reference computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import backbones
from models.ssl.dino import DINO, DINOHead, DINOLoss, MultiCropWrapper
from models.ssl.simclr import SimCLR, nt_xent


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR's loss written out as a loop over the 2N anchors."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / tau) / denom)
    return total / (2 * n)


def test_nt_xent_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    for tau in (0.1, 0.5):
        # float32 loss against a float64 loop: relative, the loss grows as tau shrinks
        assert float(nt_xent(z1, z2, tau)) == pytest.approx(
            _reference_nt_xent(z1, z2, tau), rel=1e-5, abs=1e-6
        )
    # identical views with well separated rows give a much smaller loss than random pairs
    e = torch.eye(5, 8) * 10
    assert float(nt_xent(e, e, 0.1)) < 0.01 < float(nt_xent(z1, z2, 0.1))


def _reference_dino(student, teacher, center, n_global, n_crops, s_temp, t_temp) -> float:
    s = [x / s_temp for x in student.chunk(n_crops)]
    t = [F.softmax((x - center) / t_temp, dim=-1) for x in teacher.chunk(n_global)]
    total, terms = 0.0, 0
    for iq in range(n_global):
        for v in range(n_crops):
            if v == iq:
                continue
            for b in range(student.shape[0] // n_crops):
                total += float(-(t[iq][b] * F.log_softmax(s[v][b], dim=-1)).sum()) / (
                    student.shape[0] // n_crops
                )
            terms += 1
    return total / terms


def test_dino_loss_matches_reference_and_centre_update():
    g = torch.Generator().manual_seed(1)
    b, k = 3, 16
    loss = DINOLoss(
        k,
        n_global=2,
        n_local=2,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_steps=10,
        total_steps=20,
        center_momentum=0.9,
    )
    loss.center.copy_(torch.randn(1, k, generator=g))
    s, t = torch.randn(4 * b, k, generator=g), torch.randn(2 * b, k, generator=g)
    assert (
        loss.teacher_temp(0) == 0.04 and loss.teacher_temp(10) == 0.07 and 0.04 < loss.teacher_temp(5) < 0.07
    )
    ref = _reference_dino(s, t, loss.center, 2, 4, 0.1, loss.teacher_temp(5))
    assert float(loss(s, t, 5)) == pytest.approx(ref, rel=1e-5, abs=1e-6)  # float32 vs float64 loop
    before = loss.center.clone()
    loss.accumulate_center(t[:b])
    loss.accumulate_center(t[b:])
    loss.update_center()
    torch.testing.assert_close(loss.center, 0.9 * before + 0.1 * t.mean(0, keepdim=True))


def test_dino_head_last_layer_is_unit_norm_and_frozen_scale():
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    assert not head.last_layer.weight_g.requires_grad
    w = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    x = torch.randn(4, 32)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), bottleneck @ w.T)
    # outputs are cosines: bounded by 1
    assert float(head(x).detach().abs().max()) <= 1 + 1e-5


def _tiny_dino(**kw) -> DINO:
    torch.manual_seed(0)
    s = backbones.create("vit_tiny_patch16_224", img_size=32)
    t = backbones.create("vit_tiny_patch16_224", img_size=32)
    return DINO(s, t, 192, out_dim=64, hidden_dim=64, bottleneck_dim=32, n_local=2, **kw)


def test_dino_teacher_gets_no_gradient_and_follows_ema():
    d = _tiny_dino()
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    loss = d.compute_loss(views, 0)
    loss.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(not p.requires_grad for p in d.teacher.parameters())
    assert d.student.backbone.pos_embed.grad is not None
    with torch.no_grad():
        for p in d.student.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in d.teacher.parameters()]
    d.finish_step(0.9)
    for p0, pt, ps in zip(t0, d.teacher.parameters(), d.student.parameters()):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * ps)
    d.cancel_last_layer_grad()
    assert d.student.head.last_layer.weight_v.grad is None


def test_multicrop_wrapper_groups_sizes():
    calls = []
    bb = backbones.create("vit_tiny_patch16_224", img_size=32)
    bb.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    w = MultiCropWrapper(bb, torch.nn.Identity())
    out = w([torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 3)
    assert out.shape == (10, 192)
    assert calls == [(4, 3, 32, 32), (6, 3, 16, 16)]


def test_simclr_module_loss_and_gradient():
    torch.manual_seed(0)
    m = SimCLR(backbones.create("vit_tiny_patch16_224", img_size=32), 192, hidden_dim=64, out_dim=16)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss = m.compute_loss(views, 0)
    assert 0 < float(loss.detach()) < 10
    loss.backward()
    assert m.student.head.mlp[0].weight.grad is not None
    assert m.export_backbone() is m.student.backbone
