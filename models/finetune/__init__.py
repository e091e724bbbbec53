"""Losses of supervised fine-tuning (the recipes of ``slidestream finetune``), each with its
formula and paper in its module's docstring:

- :mod:`.classification`: label smoothing (torch's ``label_smoothing=``), mixup / cutmix (timm's
  ``Mixup``) and their soft-target cross-entropy (timm's) — :class:`MixupConfig`,
  :func:`criterion`;
- :mod:`.distill`: Hinton knowledge distillation, Tf-KD-self and Tf-KD-reg (Yuan et al. CVPR
  2020), with the identities "KD with a uniform teacher = label smoothing" and "Tf-KD-reg at τ = 1
  = label smoothing" derived — :func:`kd_loss`, :class:`KDLoss`, :func:`soft_kl`,
  :func:`tfkd_reg_loss`, :func:`virtual_teacher_logits`, :func:`freeze_teacher`,
  :class:`TeacherLogitCache`;
- :mod:`.self_distill`: data-distortion guided self-distillation (Xu & Liu AAAI 2019) —
  :func:`self_distillation_loss`, :func:`linear_mmd`;
- :mod:`.supcon`: supervised contrastive loss (Khosla et al. 2020) — :func:`supcon_loss`,
  :class:`SupConLoss`;
- :mod:`.model`: the classifier (encoder + one linear head per task + optional projection head),
  which encoder parameters train (full / linear probe / last N blocks) and zero-γ initialisation
  of residual blocks (ResNets and ViTs) — :class:`Classifier`, :func:`set_trainable`,
  :func:`block_groups`, :func:`zero_init_residual`;
- multi-task uncertainty weighting (Kendall, Gal & Cipolla 2018) is the MIL heads'
  :class:`models.mil.UncertaintyWeighting`, re-exported here.
"""

from models.mil import UncertaintyWeighting

from .classification import MixupConfig, criterion
from .distill import (
    KDLoss,
    TeacherLogitCache,
    freeze_teacher,
    kd_loss,
    soft_kl,
    tfkd_reg_loss,
    virtual_teacher_logits,
)
from .model import Classifier, block_groups, set_trainable, zero_init_residual
from .self_distill import linear_mmd, self_distillation_loss
from .supcon import SupConLoss, supcon_loss

__all__ = [
    "Classifier",
    "KDLoss",
    "MixupConfig",
    "SupConLoss",
    "TeacherLogitCache",
    "UncertaintyWeighting",
    "block_groups",
    "criterion",
    "freeze_teacher",
    "kd_loss",
    "linear_mmd",
    "self_distillation_loss",
    "set_trainable",
    "soft_kl",
    "supcon_loss",
    "tfkd_reg_loss",
    "virtual_teacher_logits",
    "zero_init_residual",
]
