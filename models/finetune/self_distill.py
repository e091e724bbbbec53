"""Data-distortion guided self-distillation (DDGSD; Xu & Liu, "Data-Distortion Guided
Self-Distillation for Deep Neural Networks", AAAI 2019).

Two differently distorted views ``x₁, x₂`` of each image go through *one* network, giving logits
``z₁, z₂`` (posteriors ``p_v = softmax(z_v)``) and, optionally, global features ``f₁, f₂`` (the
pooled embedding before the classifier). Each view is the other's teacher; the loss, summed over
both views as in the paper, is::

    L = CE(z₁, y) + CE(z₂, y)
        + λ·[KL(sg(p₂) ‖ p₁) + KL(sg(p₁) ‖ p₂)]
        + μ·MMD²(f₁, f₂)

- **Divergence between the posteriors: KL divergence in both directions**, each view's posterior
  distilled into the other's. ``sg`` (stop-gradient) on the target side is our reading, as in
  distillation from a teacher and in the Self-KD-Lib re-implementation of DDGSD: the gradient on
  ``z₁`` from its term is then ``λ·(p₁ − p₂)/N``. With ``stop_gradient=False`` the two terms are
  the symmetric (Jeffreys) divergence differentiated through both sides.
- **MMD of the global features** (the paper's consistency of global feature distributions across
  the distorted versions), here the linear-kernel (mean-embedding) estimate
  ``‖mean_i f₁ᵢ − mean_i f₂ᵢ‖²`` over the batch (:func:`linear_mmd`). The paper weighs it lightly
  (μ between 1e-4 and 5e-4 with λ = 1); ``μ = 0`` (default) leaves it out, and then features are
  not needed.

CE and KL are batch means. No temperature: the posteriors are the network's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distill import _upcast


def linear_mmd(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Squared MMD with a linear kernel between two batches of features (N, D): the squared
    distance between their means, ``‖mean(f₁) − mean(f₂)‖²``."""
    if f1.ndim != 2 or f1.shape[1:] != f2.shape[1:]:
        raise ValueError(f"features must be (N, D) with equal D; got {tuple(f1.shape)} and {tuple(f2.shape)}")
    d = _upcast(f1).mean(0) - _upcast(f2).mean(0)
    return (d * d).sum()


def _kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) ‖ softmax(logits))``, batch mean (both sides differentiable)."""
    return F.kl_div(
        F.log_softmax(logits, 1), F.log_softmax(target_logits, 1), reduction="batchmean", log_target=True
    )


def self_distillation_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: float = 1.0,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    mmd_weight: float = 0.0,
    stop_gradient: bool = True,
) -> torch.Tensor:
    """DDGSD loss of two views' logits (N, K) and class indices ``target`` (N,): CE on both views
    + ``weight``·(KL each way) + ``mmd_weight``·:func:`linear_mmd` of ``features = (f₁, f₂)``."""
    if logits1.shape != logits2.shape or logits1.ndim != 2:
        raise ValueError(
            f"the two views' logits must be (N, K) alike; got {tuple(logits1.shape)}, {tuple(logits2.shape)}"
        )
    if weight < 0 or mmd_weight < 0:
        raise ValueError(f"weights must be >= 0, got weight={weight}, mmd_weight={mmd_weight}")
    z1, z2 = _upcast(logits1), _upcast(logits2)
    loss = F.cross_entropy(z1, target) + F.cross_entropy(z2, target)
    t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
    loss = loss + weight * (_kl(t2, z1) + _kl(t1, z2))
    if mmd_weight > 0:
        if features is None:
            raise ValueError("mmd_weight > 0 needs features=(f1, f2), the two views' global features")
        loss = loss + mmd_weight * linear_mmd(*features)
    return loss
