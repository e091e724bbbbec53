"""``slidestream eval``: eva-style evaluation of encoders side by side — patch tasks (linear probe,
kNN, few-shot), slide tasks (embedding + MIL cross-validation) and segmentation tasks (frozen
encoder + 1×1 decoder).

Public API: :class:`EvalConfig`, :class:`SlideTaskConfig`, :class:`SegTaskConfig`;
:func:`run_eval`, :func:`extract_features`, :func:`evaluate_patch_task`, :func:`write_results`;
:class:`PatchTask`, :func:`load_patch_task`, :func:`save_patch_task_h5`; :func:`linear_probe`,
:func:`knn`, :func:`few_shot`, :func:`metrics_from_scores`, :func:`summarise`, :func:`stat`,
:class:`Stat` (a figure with its measured spread and n);
:func:`parse_slide_task`, :func:`parse_seg_task`, :func:`run_slide_task`, :func:`run_seg_task`.
"""

from .config import EvalConfig, SegTaskConfig, SlideTaskConfig
from .patch_tasks import PatchTask, load_patch_task, save_patch_task_h5
from .probes import ProbeResult, Stat, few_shot, knn, linear_probe, metrics_from_scores, stat, summarise
from .run import evaluate_patch_task, extract_features, run_eval, write_results
from .tasks import parse_seg_task, parse_slide_task, run_seg_task, run_slide_task

__all__ = [
    "EvalConfig",
    "PatchTask",
    "ProbeResult",
    "SegTaskConfig",
    "SlideTaskConfig",
    "Stat",
    "evaluate_patch_task",
    "extract_features",
    "few_shot",
    "knn",
    "linear_probe",
    "load_patch_task",
    "metrics_from_scores",
    "parse_seg_task",
    "parse_slide_task",
    "run_eval",
    "run_seg_task",
    "run_slide_task",
    "save_patch_task_h5",
    "stat",
    "summarise",
    "write_results",
]
