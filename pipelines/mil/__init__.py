"""``slidestream mil``: slide-level multiple-instance learning on feature files — gated-attention
MIL (ABMIL), noisy-AND, mean and max pooling; cross-validated over patients (under torchrun: folds
across ranks), with bootstrap intervals, ROC curves, prediction and attention heatmaps.

Public API: :class:`MILConfig` (:class:`MILHeadConfig`, :class:`MILTrainConfig`),
:class:`MILPredictConfig`, :class:`MILHeatmapConfig`; :func:`load_dataset`, :class:`MILDataset`,
:class:`MILDataError`, :func:`read_labels`, :func:`collect_feature_files`; :func:`fit`,
:func:`make_folds`, :func:`train_cv`, :func:`run_train`; :class:`MultiTaskMIL`,
:func:`predict_bags`, :func:`ensemble_predict`, :func:`save_model_dir`, :func:`load_model_dir`;
:func:`predict`, :func:`predict_files`, :func:`heatmap`; :func:`metrics_with_ci`.
"""

from .cli import run_train
from .config import MILConfig, MILHeadConfig, MILHeatmapConfig, MILPredictConfig, MILTrainConfig
from .cv import train_cv
from .data import (
    MILDataError,
    MILDataset,
    Skip,
    collect_feature_files,
    load_dataset,
    read_labels,
    report_skips,
)
from .metrics import metrics_with_ci, plot_roc, summarize_folds, write_metrics
from .model import MultiTaskMIL, ensemble_predict, head_kwargs, load_model_dir, predict_bags, save_model_dir
from .predict import heatmap, heatmap_from_config, predict, predict_files
from .train import FitResult, fit, make_folds

__all__ = [
    "FitResult",
    "MILConfig",
    "MILDataError",
    "MILDataset",
    "MILHeadConfig",
    "MILHeatmapConfig",
    "MILPredictConfig",
    "MILTrainConfig",
    "MultiTaskMIL",
    "Skip",
    "collect_feature_files",
    "ensemble_predict",
    "fit",
    "head_kwargs",
    "heatmap",
    "heatmap_from_config",
    "load_dataset",
    "load_model_dir",
    "make_folds",
    "metrics_with_ci",
    "plot_roc",
    "predict",
    "predict_bags",
    "predict_files",
    "read_labels",
    "report_skips",
    "run_train",
    "save_model_dir",
    "summarize_folds",
    "train_cv",
    "write_metrics",
]
