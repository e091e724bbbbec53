"""Slide-level multiple-instance learning (MIL) heads.

A slide is a bag of tile features. Every head takes either one bag ``(N, D)`` or a padded batch
``(B, N, D)`` with a boolean ``mask (B, N)`` (True = real instance, False = padding) and returns a
:class:`MILOutput`:

``logits (B, C)``
    what the loss is computed on (:func:`bag_loss`).
``probs (B, C)``
    slide-level class probabilities. ``C = n_classes`` always, so a binary task has ``C = 2`` and
    column 1 is the positive class. Softmax heads (:class:`ABMIL`, :class:`MeanPool`,
    :class:`MaxPool`) give rows that sum to 1; :class:`NoisyAND` is a one-vs-rest (multi-label)
    head whose column ``c`` is the noisy-AND probability of class ``c`` (rows need not sum to 1).
``instance_scores (B, N)``
    one score per instance for heatmaps, 0 at padded positions: the attention weights for
    :class:`ABMIL`; for the other heads the instance probability of the *score class*, which is
    class 1 for ``C = 2`` and the bag's predicted class for ``C > 2``.
``instance_class_scores (B, N, C) | None``
    per-class instance probabilities where the head has them (not ABMIL).

Padded batches give the same result as the bags one by one (masked positions never enter a sum,
mean, max or softmax). Heads are plain ``nn.Module``s with no dependency on the rest of the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MILOutput",
    "ABMIL",
    "NoisyAND",
    "MeanPool",
    "MaxPool",
    "HEADS",
    "create_head",
    "bag_loss",
    "UncertaintyWeighting",
    "pad_bags",
]


@dataclass
class MILOutput:
    logits: torch.Tensor  # (B, C)
    probs: torch.Tensor  # (B, C)
    instance_scores: torch.Tensor  # (B, N)
    instance_class_scores: torch.Tensor | None = None  # (B, N, C)
    multilabel: bool = False  # True: probs are one-vs-rest (sigmoid-like), trained with BCE


def _prepare(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 2:
        x = x.unsqueeze(0)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"MIL heads take (N, D) or (B, N, D) features, got shape {tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    mask = mask.to(torch.bool)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match features {tuple(x.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every bag needs at least one unmasked instance")
    return x, mask


def _score_class(inst: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(B, N, C) instance probabilities → (B, N) of class 1 (C = 2) or of the predicted class."""
    if inst.shape[-1] == 1:
        return inst[..., 0]
    if inst.shape[-1] == 2:
        return inst[..., 1]
    idx = probs.argmax(dim=1)
    return torch.gather(inst, 2, idx.view(-1, 1, 1).expand(-1, inst.shape[1], 1))[..., 0]


def _projection(in_dim: int, proj_dim: int | None, dropout: float) -> tuple[nn.Module, int]:
    if proj_dim:
        return nn.Sequential(nn.Linear(in_dim, proj_dim), nn.ReLU(), nn.Dropout(dropout)), proj_dim
    return nn.Dropout(dropout), in_dim


class ABMIL(nn.Module):
    """Gated-attention MIL (Ilse, Tomczak & Welling 2018).

    ``a_k = softmax_k( wᵀ (tanh(V h_k) ⊙ sigm(U h_k)) )``, ``z = Σ_k a_k h_k``, ``logits = W_c z``.
    ``h_k`` is the instance feature after the optional projection ``Linear(in_dim, proj_dim) + ReLU``
    and dropout. Instance scores are the attention weights ``a_k`` (sum to 1 over a bag's
    unmasked instances; masked positions get 0 and do not enter the softmax).
    """

    multilabel = False

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 128,
        attn_dim: int | None = None,
        dropout: float = 0.0,
        proj_dim: int | None = None,
    ):
        super().__init__()
        attn_dim = attn_dim or hidden
        self.proj, d = _projection(in_dim, proj_dim, dropout)
        self.V = nn.Linear(d, attn_dim)
        self.U = nn.Linear(d, attn_dim)
        self.w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, n_classes))
        self.n_classes = n_classes

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        x, mask = _prepare(x, mask)
        h = self.proj(x)
        a = self.attention_logits(h).masked_fill(~mask, float("-inf"))
        a = torch.softmax(a, dim=1).masked_fill(~mask, 0.0)
        z = torch.einsum("bn,bnd->bd", a, h)
        logits = self.classifier(z)
        return MILOutput(logits, torch.softmax(logits, dim=1), a)


class NoisyAND(nn.Module):
    """Noisy-AND pooling (Kraus, Ba & Frey 2016), one-vs-rest over ``n_classes``, with a learned slope.

    An instance classifier (optional hidden layer, then ``Linear → sigmoid``) gives ``p_ij``; with
    ``p̄_i`` the mean of ``p_ij`` over the bag's unmasked instances,

    ``P_i = [σ(a_i(p̄_i − b_i)) − σ(−a_i b_i)] / [σ(a_i(1 − b_i)) − σ(−a_i b_i)]``

    with ``b_i = sigmoid(β_i)`` a learned threshold per class kept in (0, 1). ``probs = P``;
    ``logits = logit(P)`` (clamped), trained with binary cross-entropy on one-hot targets. Instance
    scores are the instance probabilities ``p_ij`` (of the score class).

    Three departures from the paper, each for a measured reason (``slidestream bench mil``):

    - **The slope is learned** (``a_i = exp(α_i)`` per class, initialised to ``a``; ``learn_slope=False``
      keeps the paper's fixed slope). ``P`` moves from ~0 to ~1 over a window of width ~4/a in
      ``p̄``. When a bag is positive because of one target instance among 30, ``p̄`` moves by
      ~1/30 between a negative and a positive bag: with the paper's a = 10 the head cannot express a
      confident positive there, and the cross-entropy keeps pushing *every* instance of positive
      bags up (non-targets too), which caps AUROC near 0.8 on "≥ 1 target" digit bags. A learned
      slope (from a = 30) sharpens to the gap the data show.
    - **The threshold starts low** (``b_init = 0.05``, the paper's implementations start at 0.5): a
      positive bag is typically positive because of a small fraction of its instances.
    - **Instances start rare**: the classifier's last bias is initialised to ``logit(prior)``
      (``prior = 0.05``), so at initialisation ``p̄ ≈ b`` sits on the steep part of the curve
      instead of saturating it.
    """

    multilabel = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        a: float = 30.0,
        hidden: int | None = None,
        dropout: float = 0.0,
        proj_dim: int | None = None,
        b_init: float = 0.05,
        prior: float | None = 0.05,
        learn_slope: bool = True,
    ):
        super().__init__()
        if not a > 0:
            raise ValueError(f"noisy-AND slope a must be positive, got {a}")
        if prior is not None and not 0 < prior < 1:
            raise ValueError(f"noisy-AND instance prior must be in (0, 1), got {prior}")
        self.proj, d = _projection(in_dim, proj_dim, dropout)
        if hidden:
            self.instance = nn.Sequential(
                nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
            )
        else:
            self.instance = nn.Linear(d, n_classes)
        if prior is not None:
            last = self.instance[-1] if isinstance(self.instance, nn.Sequential) else self.instance
            nn.init.constant_(last.bias, math.log(prior / (1 - prior)))
        log_a = torch.full((n_classes,), math.log(float(a)))
        if learn_slope:
            self.log_a = nn.Parameter(log_a)
        else:
            self.register_buffer("log_a", log_a, persistent=False)  # model files of a fixed slope lack it
        b_init = min(max(b_init, 1e-3), 1 - 1e-3)
        self.b_logit = nn.Parameter(torch.full((n_classes,), math.log(b_init / (1 - b_init))))
        self.n_classes = n_classes

    @property
    def a(self) -> torch.Tensor:
        """The slope per class ``(C,)``."""
        return torch.exp(self.log_a)

    @property
    def b(self) -> torch.Tensor:
        return torch.sigmoid(self.b_logit)

    def pool(self, p_mean: torch.Tensor) -> torch.Tensor:
        """The noisy-AND formula on mean instance probabilities ``(B, C)``."""
        a, b = self.a, self.b
        lo = torch.sigmoid(-a * b)
        return (torch.sigmoid(a * (p_mean - b)) - lo) / (torch.sigmoid(a * (1 - b)) - lo)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        x, mask = _prepare(x, mask)
        p = torch.sigmoid(self.instance(self.proj(x)))  # (B, N, C)
        m = mask.unsqueeze(-1).to(p.dtype)
        p_mean = (p * m).sum(1) / m.sum(1)
        probs = self.pool(p_mean).clamp(0.0, 1.0)
        logits = torch.logit(probs, eps=1e-6)
        p = p * m
        return MILOutput(logits, probs, _score_class(p, probs), p, multilabel=True)


class _InstancePool(nn.Module):
    multilabel = False

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int | None = None,
        dropout: float = 0.0,
        proj_dim: int | None = None,
    ):
        super().__init__()
        self.proj, d = _projection(in_dim, proj_dim, dropout)
        if hidden:
            self.instance = nn.Sequential(
                nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
            )
        else:
            self.instance = nn.Linear(d, n_classes)
        self.n_classes = n_classes

    def _pool(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        x, mask = _prepare(x, mask)
        inst_logits = self.instance(self.proj(x))  # (B, N, C)
        logits = self._pool(inst_logits, mask)
        probs = torch.softmax(logits, dim=1)
        inst = torch.softmax(inst_logits, dim=-1) * mask.unsqueeze(-1)
        return MILOutput(logits, probs, _score_class(inst, probs), inst)


class MeanPool(_InstancePool):
    """Baseline: per-instance class logits averaged over the bag's unmasked instances."""

    def _pool(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(logits.dtype)
        return (logits * m).sum(1) / m.sum(1)


class MaxPool(_InstancePool):
    """Baseline: per-class maximum of per-instance logits over the bag's unmasked instances."""

    def _pool(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


HEADS: dict[str, type[nn.Module]] = {"abmil": ABMIL, "noisy_and": NoisyAND, "mean": MeanPool, "max": MaxPool}


def create_head(name: str, in_dim: int, n_classes: int, **kw) -> nn.Module:
    """Build a head by name: ``"abmil" | "noisy_and" | "mean" | "max"``; ``kw`` go to its constructor."""
    key = name.lower().replace("-", "_")
    if key not in HEADS:
        raise ValueError(f"unknown MIL head {name!r}; choose one of {sorted(HEADS)}")
    if n_classes < 2:
        raise ValueError(f"a MIL head needs n_classes >= 2 (binary tasks use 2), got {n_classes}")
    return HEADS[key](in_dim, n_classes, **kw)


def bag_loss(out: MILOutput, target: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of a batch: cross-entropy on ``logits`` for softmax heads; for one-vs-rest heads
    (NoisyAND) binary cross-entropy of ``probs`` against one-hot targets, summed over classes.
    ``class_weights (C,)`` weight each bag by the weight of its true class."""
    if not out.multilabel:
        return F.cross_entropy(out.logits, target, weight=class_weights)
    onehot = F.one_hot(target, out.probs.shape[1]).to(out.probs.dtype)
    p = out.probs.clamp(1e-6, 1 - 1e-6)
    per = -(onehot * torch.log(p) + (1 - onehot) * torch.log1p(-p)).sum(1)
    if class_weights is None:
        return per.mean()
    w = class_weights[target]
    return (per * w).sum() / w.sum()


class UncertaintyWeighting(nn.Module):
    """Multi-task loss with learned homoscedastic uncertainty (Kendall, Gal & Cipolla 2018):

    ``L = Σ_t L_t / (2 σ_t²) + log σ_t``, with ``s_t = log σ_t`` learned (initialised to 0).
    """

    def __init__(self, n_tasks: int):
        super().__init__()
        self.log_sigma = nn.Parameter(torch.zeros(n_tasks))

    def forward(self, losses: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        losses = torch.stack(list(losses)) if not isinstance(losses, torch.Tensor) else losses
        s = self.log_sigma
        return (losses * 0.5 * torch.exp(-2 * s) + s).sum()


def pad_bags(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags ``[(N_i, D)]`` into ``(B, max N, D)`` zeros-padded, with the mask ``(B, max N)``."""
    if not bags:
        raise ValueError("pad_bags needs at least one bag")
    n = max(b.shape[0] for b in bags)
    d = bags[0].shape[1]
    x = bags[0].new_zeros((len(bags), n, d))
    mask = torch.zeros((len(bags), n), dtype=torch.bool, device=bags[0].device)
    for i, b in enumerate(bags):
        x[i, : b.shape[0]] = b
        mask[i, : b.shape[0]] = True
    return x, mask
