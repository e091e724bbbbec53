"""Supervised contrastive loss (SupCon; Khosla et al., "Supervised Contrastive Learning",
NeurIPS 2020) in its ``L^sup_out`` form (the one the paper recommends), with the temperature and
base temperature of the authors' code.

Input: ``features`` (B, V, D), V ≥ 1 views of B samples (projections; L2-normalised here), and
class labels (B,). The B·V rows ``z_i`` are all anchors; for anchor ``i``, ``A(i)`` is every other
row and ``P(i) ⊂ A(i)`` the rows with the same label (its other views included)::

    ℓ_i = −1/|P(i)| · Σ_{p ∈ P(i)} log[ exp(z_i·z_p/τ) / Σ_{a ∈ A(i)} exp(z_i·z_a/τ) ]
    L   = (τ / τ_base) · mean_{i : |P(i)| > 0} ℓ_i

The paper writes a sum over anchors; the mean (as the authors' code does) keeps the scale
independent of the batch. ``τ / τ_base`` only rescales the loss (both 0.07 in the paper's code, so
the factor is 1 by default). Anchors with no positive (a single view of a class seen once) are left
out of the mean; if no anchor has one the loss is undefined and an error is raised.

Without labels every sample is its own class: with V = 2 each anchor's only positive is its other
view and the loss is InfoNCE / NT-Xent (SimCLR; :func:`models.ssl.simclr.nt_xent`) times
``τ / τ_base``. Negatives are the rows of the local batch (no all-gather across ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distill import _upcast


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """SupCon ``L^sup_out`` of ``features`` (B, V, D) with ``labels`` (B,) (None: each sample its
    own class, i.e. SimCLR's loss). See the module docstring for the formula."""
    if features.ndim != 3:
        raise ValueError(f"features must be (batch, views, dim), got shape {tuple(features.shape)}")
    if temperature <= 0 or base_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {temperature} and {base_temperature}")
    b, v, _ = features.shape
    if labels is None:
        labels = torch.arange(b, device=features.device)
    elif labels.shape != (b,):
        raise ValueError(f"labels must be ({b},) for {b} samples, got {tuple(labels.shape)}")
    # rows ordered view-major: row v·B + n is view v of sample n (as torch.cat(features.unbind(1)))
    z = F.normalize(_upcast(features), dim=2).transpose(0, 1).reshape(v * b, -1)
    lab = labels.repeat(v)
    self_mask = torch.eye(v * b, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (lab[:, None] == lab[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        raise ValueError(
            "SupCon: no anchor has a positive (every class appears once with one view); "
            "use two or more views, or batches holding several samples per class"
        )
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has]
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


class SupConLoss(nn.Module):
    """:func:`supcon_loss` with fixed temperatures: ``forward(features (B, V, D), labels (B,))``."""

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07) -> None:
        super().__init__()
        if temperature <= 0 or base_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {temperature} and {base_temperature}")
        self.temperature = temperature
        self.base_temperature = base_temperature

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return supcon_loss(
            features, labels, temperature=self.temperature, base_temperature=self.base_temperature
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, base_temperature={self.base_temperature}"
