"""``slidestream pretrain``: self-supervised pretraining (DINO, SimCLR) of timm backbones on tiles
streamed from whole slides, on one process or under torchrun, resumable.

Public API: :class:`PretrainConfig` (and its sections), :func:`run` (the loop),
:func:`build_method`, :func:`forward_backward`, :func:`schedules`, :func:`export`;
:func:`build_loader`, :func:`build_augment`, :class:`TensorLoader` (in-memory tiles with the
loader's protocol); :func:`build_probe`, :func:`probe_views`, :func:`rankme`.
"""

from .config import (
    AugmentConfig,
    PretrainConfig,
    PretrainDataConfig,
    PretrainModelConfig,
    PretrainTrainConfig,
    SSLConfig,
)
from .data import TensorLoader, build_augment, build_loader, make_dataset
from .probe import build_probe, probe_rankme, probe_views, rankme
from .train import build_method, export, forward_backward, run, schedules

__all__ = [
    "AugmentConfig",
    "PretrainConfig",
    "PretrainDataConfig",
    "PretrainModelConfig",
    "PretrainTrainConfig",
    "SSLConfig",
    "TensorLoader",
    "build_augment",
    "build_loader",
    "build_method",
    "build_probe",
    "export",
    "forward_backward",
    "make_dataset",
    "probe_rankme",
    "probe_views",
    "rankme",
    "run",
    "schedules",
]
