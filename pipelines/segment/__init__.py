"""``slidestream segment``: segmentation on annotated slides — training under torchrun on tiles
streamed by the online loader, and whole-slide prediction by sliding windows to OME-Zarr labels,
QuPath GeoJSON and an overlay.

Public API: :class:`SegmentConfig` (and its sections), :class:`AnnotatedSlideConfig`,
:class:`SegmentPredictConfig`; :func:`run_training`, :func:`build_model`,
:func:`segment_param_groups`, :func:`validate`; :func:`tile_dataset`, :func:`tile_loader`,
:func:`augment_pairs`, :func:`to_batch`, :data:`IGNORE`; :func:`confusion_matrix`,
:func:`metrics_from_confusion`; :func:`predict_slide`, :func:`predict_slides`, :func:`sliding_window`,
:func:`ramp_profile`, :func:`label_polygons`, :func:`class_color`, :func:`load_model`,
:class:`LabelZarrWriter`, :func:`stitching_check`.
"""

from .config import (
    AnnotatedSlideConfig,
    SegmentConfig,
    SegmentDataConfig,
    SegmentModelConfig,
    SegmentPredictConfig,
    SegmentTrainConfig,
)
from .data import IGNORE, augment_pairs, class_labels, tile_dataset, tile_loader, to_batch
from .metrics import confusion_matrix, metrics_from_confusion
from .predict import (
    LabelZarrWriter,
    PredictResult,
    class_color,
    label_polygons,
    load_model,
    predict_slide,
    predict_slides,
    ramp_profile,
    receptive_radius,
    sliding_window,
    stitching_check,
)
from .train import build_model, check_annotations, run_training, segment_param_groups, validate

__all__ = [
    "IGNORE",
    "AnnotatedSlideConfig",
    "LabelZarrWriter",
    "PredictResult",
    "SegmentConfig",
    "SegmentDataConfig",
    "SegmentModelConfig",
    "SegmentPredictConfig",
    "SegmentTrainConfig",
    "augment_pairs",
    "build_model",
    "check_annotations",
    "class_color",
    "class_labels",
    "confusion_matrix",
    "label_polygons",
    "load_model",
    "metrics_from_confusion",
    "predict_slide",
    "predict_slides",
    "ramp_profile",
    "receptive_radius",
    "run_training",
    "segment_param_groups",
    "sliding_window",
    "stitching_check",
    "tile_dataset",
    "tile_loader",
    "to_batch",
    "validate",
]
