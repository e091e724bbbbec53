"""``slidestream tissue``: tissue masks with QC overlays for slides (``tissue qc``), and the
reproducible training recipe of the shipped tissue U-Net (``tissue train``).

Public API: :class:`TissueQCConfig`, :func:`run_qc`, :func:`qc_slide`, :func:`draw_qc`;
:class:`TissueTrainConfig`, :func:`train`, :func:`load_pairs`, :func:`evaluate`, :func:`iou`,
:data:`SHIPPED`.
"""

from .config import SHIPPED, TissueQCConfig, TissueTrainConfig
from .qc import draw_qc, qc_slide, run_qc
from .train import command_line, evaluate, iou, load_pairs, train

__all__ = [
    "SHIPPED",
    "TissueQCConfig",
    "TissueTrainConfig",
    "command_line",
    "draw_qc",
    "evaluate",
    "iou",
    "load_pairs",
    "qc_slide",
    "run_qc",
    "train",
]
