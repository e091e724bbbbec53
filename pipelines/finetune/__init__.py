"""``slidestream finetune`` (issue 14): supervised fine-tuning of an encoder with a linear head on
labelled tiles — ImageFolders, CSV tables of slide tiles streamed online, or tiles sampled inside
QuPath annotations — with the recipes of ``pipelines/configs/finetune/`` (cross-entropy, label smoothing,
mixup/cutmix, knowledge distillation, Tf-KD-self, Tf-KD-reg, data-distortion self-distillation,
SupCon) and several label columns at once (multi-task). The losses live in
:mod:`models.finetune`.

Public API:

- the job: :class:`FinetuneConfig` (and its sections), :func:`run_training`, :func:`load_data`,
  :class:`FinetuneData`, :func:`build_model`, :func:`save_classifier`, :func:`load_classifier`;
- classification metrics and figures (:mod:`.metrics`): :func:`classification_metrics`,
  :func:`top_k_accuracy`, :func:`top1`, :func:`top5`, :func:`balanced_accuracy`,
  :func:`macro_f1`, :func:`ece`, :func:`per_class`, :func:`reliability_bins`, :data:`ECE_BINS`,
  :func:`plot_confusion_matrix`, :func:`plot_reliability_diagram`;
- group-aware splits (:mod:`.splits`): :func:`group_split`, :func:`check_group_leaks`,
  :class:`GroupMove`, :class:`SplitLeakError`, :func:`split_summary`, :data:`SPLITS`.
"""

from .config import (
    FinetuneAugmentConfig,
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneLossConfig,
    FinetuneModelConfig,
    FinetuneSlideConfig,
    FinetuneTrainConfig,
    KDConfig,
    SelfDistillConfig,
    SourceConfig,
    SplitConfig,
    SupConConfig,
    TfKDRegConfig,
)
from .data import MISSING, FinetuneData, SplitData, load_data
from .metrics import (
    ECE_BINS,
    ReliabilityBins,
    balanced_accuracy,
    classification_metrics,
    ece,
    macro_f1,
    per_class,
    plot_confusion_matrix,
    plot_reliability_diagram,
    reliability_bins,
    top1,
    top5,
    top_k_accuracy,
)
from .model_io import LoadedClassifier, build_model, load_classifier, save_classifier
from .splits import SPLITS, GroupMove, SplitLeakError, check_group_leaks, group_split, split_summary
from .train import run_training

__all__ = [
    "ECE_BINS",
    "MISSING",
    "SPLITS",
    "FinetuneAugmentConfig",
    "FinetuneConfig",
    "FinetuneData",
    "FinetuneDataConfig",
    "FinetuneLossConfig",
    "FinetuneModelConfig",
    "FinetuneSlideConfig",
    "FinetuneTrainConfig",
    "GroupMove",
    "KDConfig",
    "LoadedClassifier",
    "ReliabilityBins",
    "SelfDistillConfig",
    "SourceConfig",
    "SplitConfig",
    "SplitData",
    "SplitLeakError",
    "SupConConfig",
    "TfKDRegConfig",
    "balanced_accuracy",
    "build_model",
    "check_group_leaks",
    "classification_metrics",
    "ece",
    "group_split",
    "load_classifier",
    "load_data",
    "macro_f1",
    "per_class",
    "plot_confusion_matrix",
    "plot_reliability_diagram",
    "reliability_bins",
    "run_training",
    "save_classifier",
    "split_summary",
    "top1",
    "top5",
    "top_k_accuracy",
]
