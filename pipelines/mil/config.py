"""Typed configs of ``slidestream mil``: :class:`MILConfig` (``mil train``; YAML files in
``pipelines/configs/mil/``), :class:`MILPredictConfig` (``mil predict``), :class:`MILHeatmapConfig`
(``mil heatmap``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..runtime import IsolationConfig
from ..training.optim import OptimConfig


@dataclass(kw_only=True)
class MILHeadConfig:
    name: Literal["abmil", "noisy_and", "mean", "max"] = "abmil"
    #: ABMIL attention width / instance-classifier hidden layer (None: linear)
    hidden: int | None = 128
    #: ABMIL only; defaults to hidden
    attn_dim: int | None = None
    #: optional Linear+ReLU input projection
    proj_dim: int | None = None
    dropout: float = 0.0
    #: noisy-AND: initial slope (learned per class unless learn_slope is false)
    a: float = 30.0
    #: noisy-AND: learn the slope (false: the paper's fixed slope a)
    learn_slope: bool = True
    #: noisy-AND: initial threshold b in (0, 1)
    b_init: float = 0.05
    #: noisy-AND: initial instance probability (last bias = logit(prior)); null: PyTorch's default init
    prior: float | None = 0.05


@dataclass(kw_only=True)
class MILTrainConfig:
    epochs: int = 40
    #: linear warm-up of the learning rate, in epochs (added to optim.warmup_steps)
    warmup_epochs: int = 2
    #: bags per optimiser step
    batch_size: int = 8
    #: early stopping: epochs without a better validation loss
    patience: int = 10


def _mil_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=1e-4)


@dataclass(kw_only=True)
class MILConfig:
    #: run directory (model, metrics, plots)
    out: str = ""
    #: directory of <slide_id>.h5 feature files (from `slidestream embed`)
    features: str = ""
    #: CSV: slide_id, label[, patient_id][, split]
    labels: str = ""
    head: MILHeadConfig = field(default_factory=MILHeadConfig)
    optim: OptimConfig = field(default_factory=_mil_optim)
    train: MILTrainConfig = field(default_factory=MILTrainConfig)
    label_columns: list[str] = field(default_factory=lambda: ["label"])
    #: task -> fixed class names (optional)
    classes: dict = field(default_factory=dict)
    folds: int = 5
    #: validation split carved from each training fold
    val_fraction: float = 0.2
    balance: Literal["weights", "sampler", "none"] = "weights"
    multitask_weighting: Literal["uncertainty", "sum"] = "uncertainty"
    #: random subsample of larger bags while training
    max_instances: int | None = 4096
    #: z-score features with the training instances' mean/sd (kept in the model)
    standardize: bool = True
    #: bootstrap resamples for the 95% intervals
    bootstrap: int = 1000
    on_missing: Literal["skip", "error"] = "skip"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass(kw_only=True)
class MILPredictConfig:
    #: model directory written by `slidestream mil train`
    model: str = ""
    #: feature files or directories
    features: list[str] = field(default_factory=list)
    #: CSV of predictions
    out: str = ""
    #: one fold's model (None: the mean of all folds)
    fold: int | None = None
    #: optional labels CSV: adds the true label and writes metrics JSON
    labels: str | None = None


@dataclass(kw_only=True)
class MILHeatmapConfig:
    model: str = ""
    #: one feature file (.h5), or a directory of them (one heatmap per slide, in out/<slide_id>/)
    features: str = ""
    #: the slide (None: the slide_url stored in the feature file)
    slide: str | None = None
    #: output directory
    out: str = ""
    fold: int | None = None
    #: task (label column) to map; None: the first
    task: str | None = None
    #: thumbnail longest side in pixels
    size: int = 1024
    #: auto: log-minmax for ABMIL attention weights, none for instance probabilities
    normalize: Literal["auto", "minmax", "log-minmax", "none"] = "auto"
    #: level-0 tile size when the file lacks tile_size_level0
    tile_size: float | None = None
    cmap: str = "jet"
    #: also write tiles.geojson (QuPath)
    geojson: bool = False
    #: also write mask.png (+ .json sidecar)
    mask: bool = False
    #: mask = pixels at or above this position (0..1) on the colour bar
    mask_threshold: float = 0.5
    progress: bool = True
    #: each slide read in a worker process with memory and time limits (pipelines.runtime)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
