"""MIL heads: shapes, padding invariance, the gated-attention and noisy-AND formulas, the
uncertainty weighting, and the digit-bag known answer (AUROC and top-instance precision)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.mil import (
    ABMIL,
    HEADS,
    MaxPool,
    MeanPool,
    NoisyAND,
    UncertaintyWeighting,
    bag_loss,
    create_head,
    pad_bags,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bags(seed=0, d=12, sizes=(5, 1, 9, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for n in sizes]


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("n_classes", [2, 3])
def test_padded_batch_equals_bags_one_by_one(name, n_classes):
    torch.manual_seed(0)
    head = create_head(name, 12, n_classes, proj_dim=8).eval()
    bags = _bags()
    x, m = pad_bags(bags)
    x[~m] = 1e3  # garbage in the padding must not leak into any result
    out = head(x, m)
    assert out.probs.shape == (4, n_classes) and out.instance_scores.shape == (4, 9)
    assert out.logits.shape == (4, n_classes)
    for i, b in enumerate(bags):
        one = head(b)
        assert one.probs.shape == (1, n_classes) and one.instance_scores.shape == (1, len(b))
        torch.testing.assert_close(out.probs[i], one.probs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logits[i], one.logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out.instance_scores[i, : len(b)], one.instance_scores[0], rtol=1e-5, atol=1e-6
        )
        assert torch.all(out.instance_scores[i, len(b) :] == 0)
    if name != "noisy_and":
        torch.testing.assert_close(out.probs.sum(1), torch.ones(4))
    assert torch.all((out.probs >= 0) & (out.probs <= 1))


def test_abmil_matches_gated_attention_formula():
    torch.manual_seed(1)
    head = ABMIL(6, 2, hidden=5).eval()
    h = torch.randn(7, 6)
    out = head(h)
    V, U, w = head.V, head.U, head.w
    e = (torch.tanh(h @ V.weight.T + V.bias) * torch.sigmoid(h @ U.weight.T + U.bias)) @ w.weight.T + w.bias
    a = torch.exp(e[:, 0]) / torch.exp(e[:, 0]).sum()
    z = (a[:, None] * h).sum(0)
    logits = head.classifier[1](z)
    torch.testing.assert_close(out.instance_scores[0], a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.logits[0], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.instance_scores.sum(), torch.tensor(1.0))


def test_noisy_and_matches_formula_and_threshold_stays_in_unit_interval():
    torch.manual_seed(2)
    head = NoisyAND(5, 3, a=7.5).eval()
    with torch.no_grad():
        head.b_logit.copy_(torch.tensor([-3.0, 0.2, 4.0]))
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = head(x, mask)
    for i in range(2):
        n = int(mask[i].sum())
        p = 1 / (
            1
            + np.exp(
                -(x[i, :n] @ head.instance.weight.T + head.instance.bias).detach().numpy().astype(np.float64)
            )
        )
        pbar = p.mean(0)
        b = 1 / (1 + np.exp(-np.array([-3.0, 0.2, 4.0])))
        sig = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
        a = 7.5
        P = (sig(a * (pbar - b)) - sig(-a * b)) / (sig(a * (1 - b)) - sig(-a * b))
        np.testing.assert_allclose(out.probs[i].detach().numpy(), P, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.instance_class_scores[i, :n].detach().numpy(), p, rtol=1e-5, atol=1e-6)
    assert torch.all((head.b > 0) & (head.b < 1))
    # P is 0 when every instance says 0 and 1 when every instance says 1
    # probabilities in [0, 1]: float32 round-off of the normalised sigmoid
    torch.testing.assert_close(head.pool(torch.zeros(1, 3)), torch.zeros(1, 3), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(head.pool(torch.ones(1, 3)), torch.ones(1, 3), atol=1e-6, rtol=1e-6)
    assert out.multilabel


def test_mean_and_max_pool_definitions():
    torch.manual_seed(3)
    x = torch.randn(4, 5)
    mp, xp = MeanPool(5, 2).eval(), MaxPool(5, 2).eval()
    torch.testing.assert_close(mp(x).logits[0], mp.instance(x).mean(0))
    torch.testing.assert_close(xp(x).logits[0], xp.instance(x).amax(0))
    torch.testing.assert_close(xp(x).instance_scores[0], torch.softmax(xp.instance(x), -1)[:, 1])


def test_gradients_reach_parameters_and_loss_kinds():
    for name in HEADS:
        torch.manual_seed(0)
        head = create_head(name, 8, 2)
        x, m = pad_bags(_bags(d=8))
        out = head(x, m)
        loss = bag_loss(out, torch.tensor([0, 1, 1, 0]), torch.tensor([1.0, 2.0]))
        loss.backward()
        assert math.isfinite(loss.item())
        assert all(p.grad is not None for p in head.parameters()), name


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown MIL head"):
        create_head("transmil", 4, 2)
    with pytest.raises(ValueError, match="n_classes"):
        create_head("abmil", 4, 1)
    head = ABMIL(4, 2)
    with pytest.raises(ValueError, match="at least one unmasked"):
        head(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        head(torch.zeros(4))


def test_uncertainty_weighting_formula():
    w = UncertaintyWeighting(3)
    with torch.no_grad():
        w.log_sigma.copy_(torch.tensor([0.0, 0.5, -1.0]))
    losses = torch.tensor([2.0, 1.0, 0.3])
    sigma = torch.exp(w.log_sigma.detach())
    expected = (losses / (2 * sigma**2) + torch.log(sigma)).sum()
    torch.testing.assert_close(w(losses), expected)
    # at the optimum of each term, sigma² equals the task loss: d/ds [L e^{-2s}/2 + s] = 0
    opt = UncertaintyWeighting(1)
    sgd = torch.optim.SGD(opt.parameters(), lr=0.2)
    for _ in range(150):
        sgd.zero_grad()
        opt(torch.tensor([4.0])).backward()
        sgd.step()
    # 150 SGD steps converge to the optimum within 0.25 %; a wrong formula lands far from 4
    assert torch.exp(2 * opt.log_sigma.detach()).item() == pytest.approx(4.0, rel=2.5e-3)


def test_digit_bags_known_answer():
    """Both heads with their shipped configs learn 'bag holds a 3' (12-30 digits a bag) from
    held-out bags; their instance scores find the 3s."""
    from pipelines.bench.mil import TARGETS, run_digits
    from pipelines.tasks import digit_bags

    bags, labels, inst = digit_bags(40, k=1, seed=3)
    for b, y, t in zip(bags, labels, inst):
        assert (t.sum() >= 1) == bool(y) and 12 <= len(b) <= 30  # the construction is what it claims
    res = run_digits(digits=(3,), ks=(1,))
    for h in ("abmil", "noisy_and"):
        (r,) = [r for r in res["runs"] if r["head"] == h]
        assert r["auroc"] >= TARGETS[1], (h, r)
        assert r["top_instance_precision"] >= 0.8, (h, r)
        assert res["summary"][h][1]["met"]


@pytest.mark.slow
def test_digit_bags_hardest_digits_both_rules():
    """The shipped configs on the hardest targets (8 and 9: confused with 1, 3, 5 at 8 x 8 px):
    AUROC >= 0.95 with one target, >= 0.85 with two (issue 11 §6; `slidestream bench mil`)."""
    from pipelines.bench.mil import run_digits

    res = run_digits(digits=(8, 9), ks=(1, 2))
    for h in ("abmil", "noisy_and"):
        for k in (1, 2):
            assert res["summary"][h][k]["met"], (h, k, res["summary"][h][k])
    # the mean-pooling shortcut does not reach the heads on the same bags
    for k in (1, 2):
        assert res["summary"]["mean-pool shortcut"][k]["mean"] < res["summary"]["abmil"][k]["mean"]


def test_noisy_and_learned_slope_and_initialisation():
    """The slope is a parameter per class started at ``a`` (a fixed buffer with learn_slope=False,
    not saved, so model files of the fixed-slope head load); b starts at b_init and the instance
    classifier at p = prior."""
    torch.manual_seed(0)
    head = NoisyAND(6, 2, a=30.0, hidden=8, b_init=0.05, prior=0.05)
    assert "log_a" in dict(head.named_parameters())
    torch.testing.assert_close(head.a, torch.full((2,), 30.0))
    torch.testing.assert_close(head.b, torch.full((2,), 0.05))
    torch.testing.assert_close(head.instance[-1].bias, torch.full((2,), math.log(0.05 / 0.95)))
    x = torch.randn(4, 10, 6)
    loss = bag_loss(head(x), torch.tensor([0, 1, 1, 0]))
    loss.backward()
    assert head.log_a.grad is not None and bool(head.log_a.grad.abs().sum() > 0)
    fixed = NoisyAND(6, 2, a=10.0, learn_slope=False, prior=None)
    assert "log_a" not in dict(fixed.named_parameters()) and "log_a" not in fixed.state_dict()
    torch.testing.assert_close(fixed.a, torch.full((2,), 10.0))
    with pytest.raises(ValueError, match="prior"):
        NoisyAND(6, 2, prior=1.0)
