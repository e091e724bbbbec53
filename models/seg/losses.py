"""Segmentation losses on logits, multi-class aware, with ``ignore_index``.

Conventions (all losses): ``logits`` is (B, C, H, W) float. With ``C > 1`` the classes are
mutually exclusive: probabilities are ``softmax`` over C and ``target`` is (B, H, W) integer class
indices. With ``C == 1`` the task is binary: probabilities are ``sigmoid`` and ``target`` is
(B, H, W) or (B, 1, H, W) with values 0/1. Pixels whose target equals ``ignore_index`` (default
-100, torch's convention) are left out of every sum and mean.

Region losses (Dice, Jaccard, Tversky, MCC) compute soft counts per class over the whole batch
(``TP_c = Σ p_c t_c``, ``FP_c = Σ p_c (1 - t_c)``, ``FN_c = Σ (1 - p_c) t_c``,
``TN_c = Σ (1 - p_c)(1 - t_c)``) and return ``1 - mean_c score_c``; for binary tasks only the
foreground class counts. Formulas:

- Dice  ``(2 TP + s) / (2 TP + FP + FN + s)``
- Jaccard ``(TP + s) / (TP + FP + FN + s)``
- Tversky ``(TP + s) / (TP + α FP + β FN + s)`` (α = β = 0.5 is Dice, α = β = 1 is Jaccard)
- MCC ``(TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN) + eps)``

Pixel losses (means over valid pixels): BCE (binary, or one-vs-rest on one-hot targets for
C > 1), cross-entropy with label smoothing ``(1 − ε)(−log p_y) + ε · mean_c(−log p_c)``, focal
``−(1 − p_y)^γ log p_y`` (sigmoid form for binary), soft BCE whose targets are smoothed to
``t (1 − ε) + (1 − t) ε``.

``build_loss({"ce": 1.0, "dice": 1.0})`` or ``build_loss({"ce": {"weight": 1, "label_smoothing":
0.1}, "tversky": {"alpha": 0.3, "beta": 0.7}})`` returns a :class:`CombinedLoss`, the weighted sum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def _prepare(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """(probabilities (B, K, N), one-hot targets (B, K, N), valid mask (B, 1, N), binary flag).

    For binary tasks K = 1 (foreground); for C > 1, K = C."""
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    b, c, h, w = logits.shape
    if target.ndim == 4:
        if target.shape[1] != 1:
            raise ValueError(f"target must be (B, H, W) or (B, 1, H, W), got {tuple(target.shape)}")
        target = target[:, 0]
    if target.shape != (b, h, w):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    if c == 1:
        prob = torch.sigmoid(logits).reshape(b, 1, h * w)
        onehot = t.reshape(b, 1, h * w).to(logits.dtype)
    else:
        prob = torch.softmax(logits, dim=1).reshape(b, c, h * w)
        onehot = F.one_hot(t.long(), c).permute(0, 3, 1, 2).reshape(b, c, h * w).to(logits.dtype)
    return prob, onehot, valid.reshape(b, 1, h * w).to(logits.dtype), c == 1


def soft_counts(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Soft TP, FP, FN, TN per class (shape (K,)) over valid pixels of the batch."""
    p, t, v, _ = _prepare(logits, target, ignore_index)
    p, t = p * v, t * v
    tp = (p * t).sum(dim=(0, 2))
    fp = (p * (1 - t)).sum(dim=(0, 2))
    fn = ((1 - p) * t * v).sum(dim=(0, 2))
    tn = ((1 - p) * (1 - t) * v).sum(dim=(0, 2))
    return tp, fp, fn, tn


class _SegLoss(nn.Module):
    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index


class TverskyLoss(_SegLoss):
    """``1 − mean_c (TP + s)/(TP + α FP + β FN + s)``; α weighs false positives, β false negatives."""

    def __init__(
        self, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX
    ):
        super().__init__(ignore_index)
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tp, fp, fn, _ = soft_counts(logits, target, self.ignore_index)
        score = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return 1 - score.mean()


class DiceLoss(TverskyLoss):
    """``1 − mean_c (2 TP + s)/(2 TP + FP + FN + s)`` (soft Dice)."""

    def __init__(self, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX):
        super().__init__(0.5, 0.5, smooth / 2, ignore_index)


class JaccardLoss(TverskyLoss):
    """``1 − mean_c (TP + s)/(TP + FP + FN + s)`` (soft IoU)."""

    def __init__(self, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX):
        super().__init__(1.0, 1.0, smooth, ignore_index)


class MCCLoss(_SegLoss):
    """``1 − mean_c MCC_c`` with soft one-vs-rest counts per class."""

    def __init__(self, eps: float = 1e-6, ignore_index: int = IGNORE_INDEX):
        super().__init__(ignore_index)
        self.eps = float(eps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tp, fp, fn, tn = soft_counts(logits, target, self.ignore_index)
        num = tp * tn - fp * fn
        den = torch.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) + self.eps)
        return 1 - (num / den).mean()


def _valid_mean(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


class BCELoss(_SegLoss):
    """Binary cross-entropy on logits; for C > 1, one-vs-rest on one-hot targets (mean over C)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _, t, v, _ = _prepare(logits, target, self.ignore_index)
        z = logits.reshape(t.shape)
        per = F.binary_cross_entropy_with_logits(z, t, reduction="none").mean(dim=1, keepdim=True)
        return _valid_mean(per, v)


class SoftBCELoss(_SegLoss):
    """BCE against smoothed targets ``t (1 − ε) + (1 − t) ε``."""

    def __init__(self, smooth_factor: float = 0.1, ignore_index: int = IGNORE_INDEX):
        super().__init__(ignore_index)
        self.smooth_factor = float(smooth_factor)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _, t, v, _ = _prepare(logits, target, self.ignore_index)
        eps = self.smooth_factor
        soft = t * (1 - eps) + (1 - t) * eps
        z = logits.reshape(t.shape)
        per = F.binary_cross_entropy_with_logits(z, soft, reduction="none").mean(dim=1, keepdim=True)
        return _valid_mean(per, v)


class CrossEntropyLoss(_SegLoss):
    """Softmax cross-entropy with label smoothing ε (C > 1 only; use BCE for binary tasks)."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        weight: list[float] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer(
            "class_weight", None if weight is None else torch.tensor(weight, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < 2:
            raise ValueError("cross-entropy needs C >= 2 classes; use 'bce' for a single-logit binary task")
        if target.ndim == 4:
            target = target[:, 0]
        w = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        return F.cross_entropy(
            logits,
            target.long(),
            weight=w,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )


class FocalLoss(_SegLoss):
    """Focal loss ``−(1 − p_y)^γ log p_y`` (softmax for C > 1, sigmoid for binary), mean over valid pixels."""

    def __init__(self, gamma: float = 2.0, ignore_index: int = IGNORE_INDEX):
        super().__init__(ignore_index)
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _, t, v, binary = _prepare(logits, target, self.ignore_index)
        if binary:
            z = logits.reshape(t.shape)
            logp = -F.binary_cross_entropy_with_logits(z, t, reduction="none")  # log p_y
        else:
            logp_all = torch.log_softmax(logits, dim=1).reshape(t.shape)
            logp = (logp_all * t).sum(dim=1, keepdim=True)
        per = -((1 - logp.exp()) ** self.gamma) * logp
        return _valid_mean(per, v)


LOSSES: dict[str, type[nn.Module]] = {
    "bce": BCELoss,
    "soft_bce": SoftBCELoss,
    "ce": CrossEntropyLoss,
    "dice": DiceLoss,
    "jaccard": JaccardLoss,
    "tversky": TverskyLoss,
    "focal": FocalLoss,
    "mcc": MCCLoss,
}


class CombinedLoss(nn.Module):
    """Weighted sum of losses: ``CombinedLoss({"ce": 1.0, "dice": 1.0})``.

    A value may be a number (the weight) or a mapping with ``weight`` and the loss's keyword
    arguments. ``ignore_index`` is passed to every term. ``last_terms`` keeps the unweighted
    value of each term from the last call (detached tensors, no device sync), for logging."""

    def __init__(self, spec: dict[str, Any], ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if not spec:
            raise ValueError(
                f"empty loss spec; use e.g. {{'ce': 1.0, 'dice': 1.0}} (losses: {sorted(LOSSES)})"
            )
        unknown = sorted(set(spec) - set(LOSSES))
        if unknown:
            raise ValueError(f"unknown loss(es) {unknown}; valid: {sorted(LOSSES)}")
        self.weights: dict[str, float] = {}
        self.terms = nn.ModuleDict()
        for name, value in spec.items():
            kwargs = dict(value) if isinstance(value, dict) else {"weight": value}
            weight = float(kwargs.pop("weight", 1.0))
            if name == "ce" and "class_weight" in kwargs:
                kwargs["weight"] = kwargs.pop("class_weight")
            try:
                self.terms[name] = LOSSES[name](ignore_index=ignore_index, **kwargs)
            except TypeError as e:
                raise ValueError(f"loss {name!r}: {e}") from None
            self.weights[name] = weight
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        terms = {}
        for name, loss in self.terms.items():
            value = loss(logits, target)
            terms[name] = value.detach()
            total = total + self.weights[name] * value
        self.last_terms = terms
        return total


def build_loss(spec: dict[str, Any] | str, ignore_index: int = IGNORE_INDEX) -> CombinedLoss:
    """A :class:`CombinedLoss` from a mapping (see the module docstring) or one loss name."""
    if isinstance(spec, str):
        spec = {spec: 1.0}
    return CombinedLoss(dict(spec), ignore_index=ignore_index)
