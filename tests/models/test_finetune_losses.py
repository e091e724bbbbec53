"""Fine-tuning losses (models.finetune): each against its formula written out in plain Python on
small hand-made cases, gradcheck in float64, and the identities behind the papers (KD with a
uniform teacher = label smoothing; Tf-KD-reg at τ = 1 = label smoothing; SupCon with one positive
per anchor = InfoNCE; mixup with λ = 1 = plain cross-entropy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch.autograd import gradcheck

from models.finetune import (
    KDLoss,
    MixupConfig,
    SupConLoss,
    TeacherLogitCache,
    UncertaintyWeighting,
    criterion,
    freeze_teacher,
    kd_loss,
    linear_mmd,
    self_distillation_loss,
    supcon_loss,
    tfkd_reg_loss,
    virtual_teacher_logits,
)
from models.mil import UncertaintyWeighting as MILUncertaintyWeighting
from models.ssl.simclr import nt_xent

# --- plain-Python references -------------------------------------------------------------------


def _softmax(z: list[float], tau: float = 1.0) -> list[float]:
    m = max(z)
    e = [math.exp((v - m) / tau) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _ce(z: list[float], y: int) -> float:
    return -math.log(_softmax(z)[y])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _ls(z: list[float], y: int, eps: float) -> float:
    k = len(z)
    p = _softmax(z)
    return (1 - eps) * -math.log(p[y]) + eps * sum(-math.log(v) for v in p) / k


def _logits(n: int, k: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def _grad(fn, z: torch.Tensor) -> torch.Tensor:
    z = z.detach().clone().requires_grad_(True)
    fn(z).backward()
    return z.grad


Z = [[1.0, 0.0, -1.0], [0.5, 2.0, -0.3]]
ZT = [[0.2, 1.5, 0.1], [-1.0, 0.0, 3.0]]
Y = [0, 2]

# --- label smoothing, mixup ---------------------------------------------------------------------


def test_label_smoothing_criterion_is_the_formula():
    got = criterion(0.2)(torch.tensor(Z, dtype=torch.float64), torch.tensor(Y))
    want = sum(_ls(z, y, 0.2) for z, y in zip(Z, Y)) / len(Y)
    assert abs(float(got) - want) <= 1e-12 * want


@pytest.mark.parametrize("soft", [False, True])
def test_classification_criteria_gradcheck(soft):
    y = torch.tensor([0, 2, 1])
    target = F.softmax(_logits(3, 4, seed=9).detach(), 1) if soft else y
    loss = criterion(soft_targets=True) if soft else criterion(0.15)
    assert gradcheck(lambda v: loss(v, target), (_logits(3, 4, seed=10),))


def test_mixup_with_lambda_one_is_plain_cross_entropy():
    """prob = 0: timm's Mixup never mixes (λ = 1); the inputs are untouched, the targets one-hot,
    and the soft-target loss equals cross-entropy on the indices (values and gradients)."""
    mix = MixupConfig(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.0).build(n_classes=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=g)
    x0 = x.clone()
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    xm, t = mix(x, y)
    assert torch.equal(xm, x0)
    assert torch.equal(t, F.one_hot(y, 5).float())
    z = _logits(6, 5, seed=1)
    soft = criterion(soft_targets=True)
    assert_close_scaled(soft(z, t.double()), F.cross_entropy(z, y), rtol=1e-12, msg="loss")
    assert_close_scaled(
        _grad(lambda v: soft(v, t.double()), z),
        _grad(lambda v: F.cross_entropy(v, y), z),
        rtol=1e-12,
        msg="grad",
    )


def test_mixup_smoothing_matches_torch_label_smoothing():
    mix = MixupConfig(mixup_alpha=0.2, prob=0.0).build(n_classes=4, label_smoothing=0.1)
    y = torch.tensor([3, 0, 1, 1])
    _, t = mix(torch.zeros(4, 3, 2, 2), y)
    z = _logits(4, 4, seed=2)
    assert_close_scaled(
        criterion(soft_targets=True)(z, t.double()),
        criterion(0.1)(z, y),
        rtol=1e-7,
        msg="LS in mixup targets",
    )


def test_mixup_mixes_inputs_and_targets_with_one_lambda():
    mix = MixupConfig(mixup_alpha=1.0).build(n_classes=3)
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0 = x.clone()
    y = torch.tensor([0, 1, 2, 2])
    state = np.random.get_state()
    try:
        np.random.seed(3)  # timm draws λ from numpy's global RNG
        xm, t = mix(x, y)
    finally:
        np.random.set_state(state)
    lam = float(t[0, 0])  # y[0] = 0 and y.flip(0)[0] = 2
    assert 0.0 < lam < 1.0
    assert_close_scaled(xm, lam * x0 + (1 - lam) * x0.flip(0), rtol=1e-6, msg="mixed inputs")
    onehot = F.one_hot(y, 3).double()
    assert_close_scaled(t.double(), lam * onehot + (1 - lam) * onehot.flip(0), rtol=1e-6, msg="targets")


def test_mixup_config_checks():
    assert MixupConfig().build(3) is None
    with pytest.raises(ValueError, match="mode"):
        MixupConfig(mixup_alpha=1.0, mode="rows")
    with pytest.raises(ValueError, match="prob"):
        MixupConfig(mixup_alpha=1.0, prob=1.5)
    with pytest.raises(ValueError, match="already carry"):
        criterion(0.1, soft_targets=True)


# --- knowledge distillation ---------------------------------------------------------------------


def test_kd_is_the_formula():
    alpha, tau = 0.7, 3.0
    got = kd_loss(torch.tensor(Z), torch.tensor(ZT), torch.tensor(Y), alpha=alpha, temperature=tau)
    want = sum(
        (1 - alpha) * _ce(z, y) + alpha * tau**2 * _kl(_softmax(zt, tau), _softmax(z, tau))
        for z, zt, y in zip(Z, ZT, Y)
    ) / len(Y)
    assert abs(float(got) - want) <= 1e-6 * want
    assert (
        abs(float(KDLoss(alpha, tau)(torch.tensor(Z), torch.tensor(ZT), torch.tensor(Y))) - want)
        <= 1e-6 * want
    )


@pytest.mark.parametrize("soft", [False, True])
def test_kd_gradcheck(soft):
    z, zt = _logits(4, 5, seed=3), _logits(4, 5, seed=4).detach()
    y = torch.tensor([0, 3, 4, 1])
    target = F.softmax(_logits(4, 5, seed=5).detach(), 1) if soft else y
    assert gradcheck(lambda v: kd_loss(v, zt, target, alpha=0.6, temperature=2.5), (z,))


def test_kd_teacher_gets_no_gradient():
    z, zt = _logits(3, 4, seed=6), _logits(3, 4, seed=7)
    kd_loss(z, zt, torch.tensor([0, 1, 2]), alpha=0.5, temperature=2.0).backward()
    assert zt.grad is None


@pytest.mark.parametrize("alpha, k", [(0.1, 2), (0.3, 5), (0.9, 10)])
def test_kd_with_uniform_teacher_is_label_smoothing(alpha, k):
    """τ = 1, teacher logits all equal: KD_α = LS_{ε=α} − α·log K, same gradients."""
    z = _logits(6, k, seed=k)
    y = torch.arange(6) % k
    uniform = torch.full((6, k), 0.37, dtype=torch.float64)

    def kd(v):
        return kd_loss(v, uniform, y, alpha=alpha, temperature=1.0)

    def ls(v):
        return F.cross_entropy(v, y, label_smoothing=alpha)

    assert_close_scaled(kd(z) + alpha * math.log(k), ls(z), rtol=1e-12, msg="value")
    assert_close_scaled(_grad(kd, z), _grad(ls, z), rtol=1e-12, msg="gradient")


def test_kd_with_uniform_teacher_at_other_temperatures():
    """τ ≠ 1: the soft term's gradient is α·τ·(softmax(z/τ) − u)/N, not LS's; as τ → ∞ the soft
    term tends to (α/2)·Var_k(z_k) (docstring of models.finetune.distill)."""
    alpha, tau, k = 0.4, 3.0, 6
    z = _logits(5, k, seed=11)
    y = torch.tensor([0, 1, 2, 3, 4])
    uniform = torch.zeros(5, k, dtype=torch.float64)

    def soft_only(v, t):
        return kd_loss(v, uniform, y, alpha=alpha, temperature=t) - (1 - alpha) * F.cross_entropy(v, y)

    want = alpha * tau * (F.softmax(z.detach() / tau, 1) - 1.0 / k) / 5
    assert_close_scaled(_grad(lambda v: soft_only(v, tau), z), want, rtol=1e-10, msg="gradient at τ=3")
    var = z.detach().var(1, unbiased=False).mean()
    assert_close_scaled(soft_only(z, 1000.0), alpha / 2 * var, rtol=2e-3, msg="τ → ∞ limit")


# --- teacher-free KD ----------------------------------------------------------------------------


def test_virtual_teacher_is_yuans_distribution():
    y = torch.tensor([2, 0])
    p = F.softmax(virtual_teacher_logits(y, 4, 0.9, dtype=torch.float64), 1)
    want = torch.full((2, 4), 0.1 / 3, dtype=torch.float64)
    want[0, 2] = want[1, 0] = 0.9
    assert_close_scaled(p, want, rtol=1e-12, msg="p^d")


def test_tfkd_reg_is_the_formula():
    alpha, tau, a = 0.5, 4.0, 0.8
    got = tfkd_reg_loss(torch.tensor(Z), torch.tensor(Y), alpha=alpha, temperature=tau, correct_prob=a)
    want = 0.0
    for z, y in zip(Z, Y):
        pd = [a if k == y else (1 - a) / 2 for k in range(3)]
        pd_tau = _softmax([math.log(v) for v in pd], tau)  # ∝ (p^d)^(1/τ)
        want += (1 - alpha) * _ce(z, y) + alpha * tau**2 * _kl(pd_tau, _softmax(z, tau))
    want /= len(Y)
    assert abs(float(got) - want) <= 1e-6 * want


def test_tfkd_reg_gradcheck():
    y = torch.tensor([1, 0, 3])
    assert gradcheck(
        lambda v: tfkd_reg_loss(v, y, alpha=0.7, temperature=5.0, correct_prob=0.9), (_logits(3, 4, 8),)
    )


def _entropy_of_smoothed(k: int, eps: float) -> float:
    on, off = 1 - eps + eps / k, eps / k
    return -(on * math.log(on) + ((k - 1) * off * math.log(off) if off > 0 else 0.0))


@pytest.mark.parametrize("alpha, a, k", [(1.0, 0.9, 5), (1.0, 0.6, 3), (0.5, 0.9, 5), (0.3, 0.99, 10)])
def test_tfkd_reg_at_unit_temperature_is_label_smoothing(alpha, a, k):
    """τ = 1: Tf-KD-reg_{α,a} = LS_{α·ε} − α·H(q_ε) with ε = K(1 − a)/(K − 1); α = 1 is LS_ε."""
    eps = k * (1 - a) / (k - 1)
    z = _logits(7, k, seed=20 + k)
    y = torch.arange(7) % k

    def reg(v):
        return tfkd_reg_loss(v, y, alpha=alpha, temperature=1.0, correct_prob=a)

    def ls(v):
        return F.cross_entropy(v, y, label_smoothing=alpha * eps)

    assert_close_scaled(reg(z) + alpha * _entropy_of_smoothed(k, eps), ls(z), rtol=1e-12, msg="value")
    assert_close_scaled(_grad(reg, z), _grad(ls, z), rtol=1e-12, msg="gradient")


def test_tfkd_reg_limits():
    """a = 1/K is the uniform teacher (identity 1: LS_α − α·log K); a = 1 is plain CE."""
    k, alpha = 4, 0.35
    z = _logits(5, k, seed=30)
    y = torch.tensor([0, 1, 2, 3, 0])
    uniform = tfkd_reg_loss(z, y, alpha=alpha, temperature=1.0, correct_prob=1 / k)
    assert_close_scaled(
        uniform + alpha * math.log(k), F.cross_entropy(z, y, label_smoothing=alpha), rtol=1e-12
    )
    one_hot = tfkd_reg_loss(z, y, alpha=alpha, temperature=1.0, correct_prob=1.0)
    assert_close_scaled(one_hot, F.cross_entropy(z, y), rtol=1e-12)
    g = _grad(lambda v: tfkd_reg_loss(v, y, alpha=alpha, temperature=1.0, correct_prob=1.0), z)
    assert torch.isfinite(g).all()
    assert_close_scaled(g, _grad(lambda v: F.cross_entropy(v, y), z), rtol=1e-12)


def test_tf_kd_self_teacher_and_cache():
    teacher = freeze_teacher(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5)))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(6, 3)
    cache = TeacherLogitCache(n_samples=10, n_classes=4)
    calls = []

    def run(idx):
        def compute():
            calls.append(idx.tolist())
            return teacher(x[idx])

        return cache(idx, compute)

    first = run(torch.tensor([0, 1, 2]))
    again = run(torch.tensor([2, 1, 0]))
    assert calls == [[0, 1, 2]]
    assert torch.equal(again, first.flip(0))
    run(torch.tensor([2, 3]))  # 3 is new: the teacher runs on the whole batch
    assert calls[-1] == [2, 3]
    restored = TeacherLogitCache(10, 4)
    restored.load_state_dict(cache.state_dict())
    assert torch.equal(
        restored(torch.tensor([3, 0]), lambda: pytest.fail("cache missed")), teacher(x[[3, 0]])
    )


# --- self-distillation (DDGSD) ------------------------------------------------------------------


def test_self_distillation_is_the_formula():
    z1, z2 = Z, ZT
    lam, mu = 0.8, 0.5
    f1 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    f2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    got = self_distillation_loss(
        torch.tensor(z1), torch.tensor(z2), torch.tensor(Y), weight=lam, features=(f1, f2), mmd_weight=mu
    )
    n = len(Y)
    ce = sum(_ce(a, y) + _ce(b, y) for a, b, y in zip(z1, z2, Y)) / n
    kl = sum(_kl(_softmax(b), _softmax(a)) + _kl(_softmax(a), _softmax(b)) for a, b in zip(z1, z2)) / n
    mmd = (2.0 - 0.5) ** 2 + (0.5 - 1.0) ** 2  # means (2, 0.5) and (0.5, 1)
    want = ce + lam * kl + mu * mmd
    assert abs(float(got) - want) <= 1e-6 * want
    assert abs(float(linear_mmd(f1, f2)) - mmd) <= 1e-7


def test_self_distillation_of_identical_views_is_twice_ce():
    z = _logits(4, 3, seed=40)
    y = torch.tensor([0, 1, 2, 0])
    assert_close_scaled(self_distillation_loss(z, z, y, weight=2.0), 2 * F.cross_entropy(z, y), rtol=1e-12)


def test_self_distillation_gradients():
    z1, z2 = _logits(4, 3, seed=41), _logits(4, 3, seed=42)
    y = torch.tensor([2, 1, 0, 0])
    f1, f2 = _logits(4, 5, seed=43), _logits(4, 5, seed=44)
    # without stop-gradient the loss is an ordinary function of both views: gradcheck
    assert gradcheck(
        lambda a, b, c, d: self_distillation_loss(
            a, b, y, weight=0.7, features=(c, d), mmd_weight=0.3, stop_gradient=False
        ),
        (z1, z2, f1, f2),
    )
    # with stop-gradient (default) each view's KL gradient is λ·(p_self − p_other)/N
    lam = 0.7
    a, b = z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
    self_distillation_loss(a, b, y, weight=lam).backward()
    p1, p2 = F.softmax(z1.detach(), 1), F.softmax(z2.detach(), 1)
    onehot = F.one_hot(y, 3).double()
    assert_close_scaled(a.grad, ((p1 - onehot) + lam * (p1 - p2)) / 4, rtol=1e-12, msg="view 1")
    assert_close_scaled(b.grad, ((p2 - onehot) + lam * (p2 - p1)) / 4, rtol=1e-12, msg="view 2")


def test_self_distillation_checks():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="features"):
        self_distillation_loss(z, z, torch.tensor([0, 1]), mmd_weight=1e-4)


# --- SupCon -------------------------------------------------------------------------------------


def _supcon_reference(feats: list[list[list[float]]], labels: list[int], tau: float, base: float) -> float:
    """Khosla et al. Eq. 2 written out: rows view-major, anchors with no positive skipped."""
    b, v = len(feats), len(feats[0])
    rows, lab = [], []
    for j in range(v):
        for i in range(b):
            f = feats[i][j]
            nrm = math.sqrt(sum(c * c for c in f))
            rows.append([c / nrm for c in f])
            lab.append(labels[i])
    losses = []
    for i, zi in enumerate(rows):
        others = [a for a in range(len(rows)) if a != i]
        sims = {a: sum(p * q for p, q in zip(zi, rows[a])) / tau for a in others}
        log_den = math.log(sum(math.exp(s) for s in sims.values()))
        pos = [p for p in others if lab[p] == lab[i]]
        if pos:
            losses.append(-sum(sims[p] - log_den for p in pos) / len(pos))
    return tau / base * sum(losses) / len(losses)


def test_supcon_is_the_formula():
    feats = [
        [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]],
        [[0.0, 1.0, 0.0], [0.2, 0.8, 0.1]],
        [[0.5, 0.5, 0.0], [0.6, 0.3, 0.2]],
        [[0.0, 0.0, 2.0], [0.1, -0.3, 1.0]],
    ]
    labels = [0, 1, 0, 2]
    got = supcon_loss(
        torch.tensor(feats, dtype=torch.float64), torch.tensor(labels), temperature=0.5, base_temperature=0.07
    )
    want = _supcon_reference(feats, labels, 0.5, 0.07)
    assert abs(float(got) - want) <= 1e-12 * abs(want)
    mod = SupConLoss(temperature=0.5, base_temperature=0.07)
    assert abs(
        float(mod(torch.tensor(feats, dtype=torch.float64), torch.tensor(labels))) - want
    ) <= 1e-12 * abs(want)


def test_supcon_skips_anchors_without_positives():
    """One view: the samples of classes 5 and 3 have no positive and are left out of the mean
    (the reference averages the two anchors of class 1 only)."""
    feats = [[[1.0, 0.2]], [[0.2, 0.9]], [[-1.0, 0.3]], [[0.5, -0.5]]]
    got = supcon_loss(torch.tensor(feats, dtype=torch.float64), torch.tensor([1, 1, 5, 3]), temperature=1.0)
    want = _supcon_reference(feats, [1, 1, 5, 3], 1.0, 0.07)
    assert abs(float(got) - want) <= 1e-12 * abs(want)
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supcon_loss(torch.tensor(feats), torch.tensor([0, 1, 2, 3]))


def test_supcon_gradcheck():
    g = torch.Generator().manual_seed(50)
    f = torch.randn(5, 3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2, 1])
    assert gradcheck(lambda v: supcon_loss(v, labels, temperature=0.3, base_temperature=0.5), (f,))


@pytest.mark.parametrize("tau, base", [(0.1, 0.1), (0.5, 0.07)])
def test_supcon_with_one_positive_per_anchor_is_infonce(tau, base):
    """No labels, two views: every anchor's one positive is its other view, and SupCon is
    SimCLR's NT-Xent (InfoNCE) times τ/τ_base. Same with one view and classes in pairs."""
    g = torch.Generator().manual_seed(51)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    ref = nt_xent(z1, z2, temperature=tau, gather=False) * (tau / base)
    got = supcon_loss(torch.stack([z1, z2], 1), None, temperature=tau, base_temperature=base)
    assert_close_scaled(got, ref, rtol=1e-5, msg="two views")
    paired = supcon_loss(
        torch.cat([z1, z2])[:, None], torch.arange(6).repeat(2), temperature=tau, base_temperature=base
    )
    assert_close_scaled(paired, ref, rtol=1e-5, msg="one view, classes in pairs")
    a, b = z1.clone().requires_grad_(True), z1.clone().requires_grad_(True)
    nt_xent(a, z2, temperature=tau, gather=False).mul(tau / base).backward()
    supcon_loss(torch.stack([b, z2], 1), None, temperature=tau, base_temperature=base).backward()
    assert_close_scaled(b.grad, a.grad, rtol=1e-5, msg="gradient")


# --- multi-task ---------------------------------------------------------------------------------


def test_uncertainty_weighting_is_the_mil_implementation():
    assert UncertaintyWeighting is MILUncertaintyWeighting
    w = UncertaintyWeighting(2)
    with torch.no_grad():
        w.log_sigma.copy_(torch.tensor([0.0, math.log(2.0)]))
    got = w([torch.tensor(1.0), torch.tensor(4.0)]).item()
    assert abs(got - (1.0 / 2 + 4.0 / (2 * 4) + math.log(2.0))) <= 1e-6
