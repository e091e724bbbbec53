"""Classification losses of supervised fine-tuning ("Bag of Tricks", He et al. CVPR 2019): label
smoothing, and mixup / cutmix with their soft targets. No loss is written here: both come from
torch and timm, this module fixes how they fit together.

**Label smoothing** is torch's own ``F.cross_entropy(..., label_smoothing=ε)`` (Szegedy et al.
2016). The target becomes ``q_ε = (1 − ε)·onehot(y) + ε·u`` with ``u = 1/K`` over *all* K classes
(the true one included), so with ``p = softmax(z)``::

    LS_ε(z, y) = H(q_ε, p) = (1 − ε)·(−log p_y) + ε·(1/K)·Σ_k (−log p_k)

averaged over the batch. ``ε = 0`` is plain cross-entropy.

**Mixup** (Zhang et al. ICLR 2018) and **CutMix** (Yun et al. ICCV 2019) are timm's
``timm.data.Mixup``; :class:`MixupConfig` maps a config onto it. It mixes a batch in place,
``x ← λ·x + (1 − λ)·x.flip(0)`` (or pastes a box of the flipped batch, λ = kept area), and returns
soft targets ``t = λ·q_ε(y) + (1 − λ)·q_ε(y.flip(0))`` with the same ε convention as torch
(timm: ``off = ε/K``, ``on = 1 − ε + ε/K``). Label smoothing is then already inside the targets
and the criterion must not smooth again: :func:`criterion` returns timm's
``SoftTargetCrossEntropy`` (``mean_n Σ_k −t_nk·log p_nk``) for soft targets and torch's
cross-entropy with ``label_smoothing`` for class indices.

For the training loop: timm's Mixup draws λ, the cutmix boxes and the mix/no-mix coin from numpy's
*global* RNG (seed it per rank, and save/restore it on resume, for reproducible runs); the
``"batch"`` and ``"pair"`` modes need an even batch size (drop the last incomplete batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

MIX_MODES = ("batch", "pair", "elem")


@dataclass(kw_only=True, slots=True)
class MixupConfig:
    """Mixup / CutMix settings (timm's names). Both alphas 0 (the default) means no mixing.

    ``mixup_alpha``, ``cutmix_alpha``: λ ~ Beta(α, α) for each method (0 disables it);
    ``prob``: probability that a batch (or element, in ``"elem"`` mode) is mixed at all (λ = 1
    otherwise); ``switch_prob``: with both methods on, probability of cutmix rather than mixup;
    ``mode``: ``"batch"`` (one λ per batch), ``"pair"`` or ``"elem"`` (one λ per pair/element).
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(
                f"mixup_alpha and cutmix_alpha must be >= 0 (0 disables), got "
                f"{self.mixup_alpha} and {self.cutmix_alpha}"
            )
        for name in ("prob", "switch_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"mixup {name} must be in [0, 1], got {v}")
        if self.mode not in MIX_MODES:
            raise ValueError(f"mixup mode must be one of {MIX_MODES}, got {self.mode!r}")

    @property
    def enabled(self) -> bool:
        """True when either method has a positive alpha (a Mixup object will be built)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def build(self, n_classes: int, label_smoothing: float = 0.0) -> Mixup | None:
        """timm's ``Mixup`` for ``n_classes`` with smoothing ``label_smoothing`` folded into its
        targets, or ``None`` when disabled (train on class indices with :func:`criterion`)."""
        _check_smoothing(label_smoothing)
        if n_classes < 2:
            raise ValueError(f"mixup needs n_classes >= 2, got {n_classes}")
        if not self.enabled:
            return None
        return Mixup(
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            prob=self.prob,
            switch_prob=self.switch_prob,
            mode=self.mode,
            label_smoothing=label_smoothing,
            num_classes=n_classes,
        )


def _check_smoothing(eps: float) -> None:
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps}")


def criterion(label_smoothing: float = 0.0, *, soft_targets: bool = False) -> nn.Module:
    """The classification loss: ``SoftTargetCrossEntropy`` when the targets are soft rows from
    :meth:`MixupConfig.build` (which already hold the smoothing, so ``label_smoothing`` must then
    be 0 here), otherwise ``nn.CrossEntropyLoss(label_smoothing=ε)`` on class indices."""
    _check_smoothing(label_smoothing)
    if soft_targets:
        if label_smoothing:
            raise ValueError(
                "soft (mixup) targets already carry label smoothing; pass label_smoothing to "
                "MixupConfig.build, not to criterion"
            )
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
