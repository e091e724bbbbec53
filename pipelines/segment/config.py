"""The typed config of ``slidestream segment train`` (:class:`SegmentConfig`; YAML files in
``pipelines/configs/segment/`` map onto it) and of ``slidestream segment predict``
(:class:`SegmentPredictConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from wsi.tissue import DEFAULT_METHOD

from ..training.optim import OptimConfig
from ..training.precision import Amp


@dataclass(kw_only=True)
class AnnotatedSlideConfig:
    """One annotated slide: ``annotations`` is a QuPath GeoJSON, a label image or a Zarr array."""

    slide: str
    annotations: str
    #: level-0 px per label-mask px (inferred from the sizes when None)
    mask_downsample: float | None = None
    #: overrides the slide's µm/px metadata
    mpp: float | None = None


@dataclass(kw_only=True)
class SegmentDataConfig:
    train: list[AnnotatedSlideConfig] = field(default_factory=list)
    val: list[AnnotatedSlideConfig] = field(default_factory=list)
    #: class names in index order; GeoJSON class names map to these indices
    classes: list[str] = field(default_factory=lambda: ["background", "foreground"])
    #: extra GeoJSON names → class index
    class_map: dict[str, int] = field(default_factory=dict)
    unknown_classes: Literal["error", "ignore"] = "error"
    #: unannotated pixels are background (class 0) or do not count in the loss (ignore)
    unannotated: Literal["background", "ignore"] = "background"
    mpp: float = 1.0
    tile_size: int = 128
    class_balance: bool = True
    augment: bool = True
    #: colour-jitter strength (brightness, contrast, saturation ±)
    jitter: float = 0.1
    val_max_tiles: int = 256
    #: DataLoader worker processes (0: read in the training process)
    num_workers: int = 0
    #: decode threads per reading process
    read_threads: int = 2

    def name_map(self) -> dict[str, int]:
        m = {name: i for i, name in enumerate(self.classes)}
        m.update(self.class_map)
        return m


@dataclass(kw_only=True)
class SegmentModelConfig:
    kind: Literal["unet", "segformer", "linear"] = "unet"
    #: timm name (segformer / linear)
    backbone: str | None = None
    #: local encoder weights (.safetensors or tensor-only checkpoint)
    weights: str | None = None
    #: ViT position-embedding grid
    img_size: int | None = None
    embed_dim: int = 128
    dropout: float = 0.0
    scales: Literal["last", "all"] = "last"
    unet_depth: int = 4
    unet_width: int = 16
    unet_norm: Literal["batch", "group"] = "batch"
    freeze_encoder: bool = False


@dataclass(kw_only=True)
class SegmentTrainConfig:
    steps: int = 1000
    #: tiles per process and step
    batch_size: int = 16
    #: extra learning-rate factor on a fine-tuned encoder (times optim.layer_decay per ViT block)
    encoder_lr_scale: float = 1.0
    loss: dict[str, Any] = field(default_factory=lambda: {"ce": 1.0, "dice": 1.0})
    #: auto: bf16 on GPU, none on CPU
    amp: Amp = "auto"
    val_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "auto"
    #: torch CPU threads (None: torch's default)
    threads: int | None = None
    progress: bool = True


def _segment_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=50, weight_decay=1e-4, clip_grad=1.0)


@dataclass(kw_only=True)
class SegmentConfig:
    #: output directory (config.yaml, checkpoint.pt, metrics.*)
    out: str = "runs/segment"
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    data: SegmentDataConfig = field(default_factory=SegmentDataConfig)
    optim: OptimConfig = field(default_factory=_segment_optim)
    train: SegmentTrainConfig = field(default_factory=SegmentTrainConfig)


@dataclass(kw_only=True)
class SegmentPredictConfig:
    """``slidestream segment predict``: one slide, a checkpoint of ``segment train``."""

    slide: str = ""
    checkpoint: str = ""
    out: str = ""
    #: µm/px to predict at (None: the training mpp)
    mpp: float | None = None
    #: window size in px (None: the training tile size)
    tile_size: int | None = None
    #: window overlap in px (None: tile_size / 4)
    overlap: int | None = None
    #: px dropped at inner window edges (None: overlap / 4)
    margin: int | None = None
    batch_size: int = 8
    device: str = "auto"
    #: tissue detection that restricts the windows (none: everywhere)
    tissue_method: Literal["otsu", "unet", "auto", "none"] = DEFAULT_METHOD
    #: µm/px of level 0 when the slide lacks it
    slide_mpp: float | None = None
    progress: bool = True
