"""Supervised fine-tuning (``slidestream finetune``, issue 14): so far the parts that do not
depend on the training loop — classification metrics and figures (:mod:`.metrics`) and
group-aware splits with leak checking (:mod:`.splits`). The losses live in
:mod:`models.finetune`.

Public API: :func:`classification_metrics`, :func:`top_k_accuracy`, :func:`top1`, :func:`top5`,
:func:`balanced_accuracy`, :func:`macro_f1`, :func:`ece`, :func:`per_class`,
:func:`reliability_bins`, :data:`ECE_BINS`, :func:`plot_confusion_matrix`,
:func:`plot_reliability_diagram`; :func:`group_split`, :func:`check_group_leaks`,
:class:`GroupMove`, :class:`SplitLeakError`, :func:`split_summary`, :data:`SPLITS`.
"""

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
from .splits import SPLITS, GroupMove, SplitLeakError, check_group_leaks, group_split, split_summary

__all__ = [
    "ECE_BINS",
    "SPLITS",
    "GroupMove",
    "ReliabilityBins",
    "SplitLeakError",
    "balanced_accuracy",
    "check_group_leaks",
    "classification_metrics",
    "ece",
    "group_split",
    "macro_f1",
    "per_class",
    "plot_confusion_matrix",
    "plot_reliability_diagram",
    "reliability_bins",
    "split_summary",
    "top1",
    "top5",
    "top_k_accuracy",
]
