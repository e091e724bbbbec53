"""Segmentation losses: each against a direct numpy computation of its formula, gradcheck in
float64, ignore_index, and weighted combinations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.seg.losses import (
    LOSSES,
    BCELoss,
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    JaccardLoss,
    MCCLoss,
    SoftBCELoss,
    TverskyLoss,
    build_loss,
)

IGN = -100


def _data(c: int, seed: int = 0, b: int = 2, h: int = 4, w: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    target = torch.randint(0, max(2, c), (b, h, w), generator=g)
    target[0, 0, :2] = IGN  # some ignored pixels
    return logits, target


# --- numpy references, pixel by pixel --------------------------------------------------------
def _np_probs(logits: np.ndarray) -> np.ndarray:
    if logits.shape[1] == 1:
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_counts(logits, target):
    """Soft TP/FP/FN/TN per class with loops over valid pixels."""
    p = _np_probs(logits)
    b, c, h, w = logits.shape
    k = 1 if c == 1 else c
    tp, fp, fn, tn = (np.zeros(k) for _ in range(4))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = target[i, y, x]
                if t == IGN:
                    continue
                for cls in range(k):
                    pc = p[i, cls, y, x]
                    tc = float(t == 1) if c == 1 else float(t == cls)
                    tp[cls] += pc * tc
                    fp[cls] += pc * (1 - tc)
                    fn[cls] += (1 - pc) * tc
                    tn[cls] += (1 - pc) * (1 - tc)
    return tp, fp, fn, tn


def ref_tversky(logits, target, a, b, s):
    tp, fp, fn, _ = _np_counts(logits, target)
    return 1 - np.mean((tp + s) / (tp + a * fp + b * fn + s))


def ref_dice(logits, target, s=1.0):
    tp, fp, fn, _ = _np_counts(logits, target)
    return 1 - np.mean((2 * tp + s) / (2 * tp + fp + fn + s))


def ref_jaccard(logits, target, s=1.0):
    tp, fp, fn, _ = _np_counts(logits, target)
    return 1 - np.mean((tp + s) / (tp + fp + fn + s))


def ref_mcc(logits, target, eps=1e-6):
    tp, fp, fn, tn = _np_counts(logits, target)
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) + eps)
    return 1 - mcc.mean()


def _pixels(logits, target):
    b, c, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if target[i, y, x] != IGN:
                    yield logits[i, :, y, x], int(target[i, y, x])


def ref_ce(logits, target, eps):
    vals = []
    for z, t in _pixels(logits, target):
        logp = z - np.log(np.exp(z).sum())
        vals.append((1 - eps) * -logp[t] + eps * np.mean(-logp))
    return np.mean(vals)


def ref_focal(logits, target, gamma):
    vals = []
    for z, t in _pixels(logits, target):
        if len(z) == 1:
            p1 = 1 / (1 + np.exp(-z[0]))
            py = p1 if t == 1 else 1 - p1
        else:
            py = np.exp(z[t]) / np.exp(z).sum()
        vals.append(-((1 - py) ** gamma) * np.log(py))
    return np.mean(vals)


def ref_bce(logits, target, smooth=0.0):
    vals = []
    for z, t in _pixels(logits, target):
        onehot = np.array([float(t == 1)]) if len(z) == 1 else np.eye(len(z))[t]
        soft = onehot * (1 - smooth) + (1 - onehot) * smooth
        p = 1 / (1 + np.exp(-z))
        vals.append(np.mean(-(soft * np.log(p) + (1 - soft) * np.log(1 - p))))
    return np.mean(vals)


CASES = [
    ("dice", lambda: DiceLoss(), ref_dice),
    ("jaccard", lambda: JaccardLoss(), ref_jaccard),
    (
        "tversky",
        lambda: TverskyLoss(alpha=0.3, beta=0.7, smooth=0.5),
        lambda lg, t: ref_tversky(lg, t, 0.3, 0.7, 0.5),
    ),
    ("mcc", lambda: MCCLoss(), ref_mcc),
    ("focal", lambda: FocalLoss(gamma=2.0), lambda lg, t: ref_focal(lg, t, 2.0)),
    ("bce", lambda: BCELoss(), ref_bce),
    ("soft_bce", lambda: SoftBCELoss(smooth_factor=0.1), lambda lg, t: ref_bce(lg, t, 0.1)),
]


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name,make,ref", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_formula(name, make, ref, c):
    logits, target = _data(c, seed=c)
    got = make()(logits, target).item()
    want = ref(logits.numpy(), target.numpy())
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_ce_with_label_smoothing_matches_formula():
    logits, target = _data(4)
    for eps in (0.0, 0.1):
        got = CrossEntropyLoss(label_smoothing=eps)(logits, target).item()
        assert got == pytest.approx(ref_ce(logits.numpy(), target.numpy(), eps), rel=1e-9)


def test_ce_rejects_single_logit():
    with pytest.raises(ValueError, match="bce"):
        CrossEntropyLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name):
    c = 1 if name in ("bce", "soft_bce") else 3
    if name == "ce":
        c = 3
    logits, target = _data(c, seed=7, b=1, h=3, w=3)
    logits.requires_grad_(True)
    loss = build_loss(name)
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_do_not_count(name):
    logits, target = _data(3, seed=3)
    loss = build_loss(name)
    base = loss(logits, target).item()
    changed = logits.clone()
    changed[0, :, 0, :2] += 50.0  # the ignored pixels
    assert loss(changed, target).item() == pytest.approx(base, rel=1e-12)
    changed[1, 0, 2, 2] += 5.0  # a counted pixel
    assert loss(changed, target).item() != pytest.approx(base, rel=1e-6)


def test_perfect_prediction_gives_low_region_losses():
    target = torch.randint(0, 3, (2, 8, 8))
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).double() * 40
    assert DiceLoss(smooth=0.0)(logits, target).item() < 1e-6
    assert JaccardLoss(smooth=0.0)(logits, target).item() < 1e-6
    assert MCCLoss()(logits, target).item() < 1e-4
    assert MCCLoss()(-logits, target).item() > 1.0  # anti-correlated prediction: MCC < 0


def test_combined_loss_is_weighted_sum():
    logits, target = _data(3)
    combo = CombinedLoss({"ce": {"weight": 0.5, "label_smoothing": 0.1}, "dice": 2.0})
    want = 0.5 * CrossEntropyLoss(label_smoothing=0.1)(logits, target) + 2.0 * DiceLoss()(logits, target)
    assert combo(logits, target).item() == pytest.approx(want.item(), rel=1e-12)
    assert set(combo.last_terms) == {"ce", "dice"}
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss({"cee": 1.0})
    with pytest.raises(ValueError, match="tversky"):
        build_loss({"tversky": {"gamma": 1.0}})


def test_binary_target_with_channel_dim():
    logits, target = _data(1)
    a = DiceLoss()(logits, target)
    b = DiceLoss()(logits, target[:, None])
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="does not match"):
        DiceLoss()(logits, target[:, :2])
