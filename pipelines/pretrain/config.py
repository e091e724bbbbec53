"""The typed config of ``slidestream pretrain`` (:class:`PretrainConfig`; YAML files in
``pipelines/configs/pretrain/`` map onto it).

Steps are optimiser steps. ``train.batch_size`` is per process and per micro-step; the global
batch is ``batch_size × accum_steps × world_size`` and sets the learning rate
(``optim.lr × global_batch / 256``: ``optim.lr_scaling`` is ``linear`` here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from wsi.data import DEMO_SLIDE
from wsi.tissue import DEFAULT_METHOD

from ..training.optim import OptimConfig
from ..training.precision import Amp


@dataclass(kw_only=True)
class PretrainDataConfig:
    #: a directory, glob, URL prefix, list of files/URLs, or CSV manifest (see wsi.loader.resolve_slides);
    #: default: the shipped CC0 demo slide (package data, so the default works from any directory)
    slides: str | list[str] = str(DEMO_SLIDE)
    mpps: list[float] = field(default_factory=lambda: [0.5, 1.0])
    mpp_weights: list[float] | None = None
    tile_size: int = 224
    min_tissue: float = 0.4
    #: auto (the shipped U-Net, Otsu without its weights) | unet | otsu
    tissue_method: str = DEFAULT_METHOD
    slide_weighting: str = "uniform"
    upsample: bool = False
    #: tiles per epoch over all ranks (None: the loader's default)
    samples_per_epoch: int | None = None
    #: DataLoader worker processes (0: read in the training process)
    num_workers: int = 2
    #: decode threads per reading process
    read_threads: int = 2
    #: samples on the encoded-tile grid, random offset inside the tile (one decode per tile instead
    #: of ~4; the random crop inside a tile is an augmentation anyway)
    aligned: bool = True
    #: 2x/4x/8x reductions decoded in the JPEG DCT domain (within a few levels of the exact box
    #: average; faster). Set false for exact pixels
    scaled_decode: bool = True
    #: batches in torch.channels_last memory format (the decoded HWC pixels, no per-tile CHW copy;
    #: the augmentations and backbones take either layout). Set false for contiguous (B, 3, S, S)
    channels_last: bool = True
    #: cpu | gpu (encoded tiles decoded in batches by nvJPEG on the training GPU)
    decode: str = "cpu"
    seed: int = 0
    #: tiles of a fixed probe set (drawn once, same seed) for RankMe
    probe_tiles: int = 128


@dataclass(kw_only=True)
class PretrainModelConfig:
    arch: str = "vit_small_patch16_224"
    #: image size the backbone is built for (ViTs take other multiples of the patch size too)
    img_size: int = 224
    #: initialise the backbone from this local file (.safetensors or a tensor-only checkpoint)
    weights: str | None = None
    drop_path_rate: float = 0.1
    #: zero-γ initialisation of the last BN in each ResNet block (timm's zero_init_last)
    zero_init_residual: bool = False
    #: extra keyword arguments for timm.create_model (e.g. {patch_size: 8} for small tiles)
    timm_kwargs: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class AugmentConfig:
    global_size: int = 224
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_size: int = 96
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    n_local: int = 8
    #: SimCLR view crop scale
    simclr_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hed_sigma: float = 0.05
    hed_bias: float = 0.01
    p_hed: float = 0.8
    p_color: float = 0.8
    p_gray: float = 0.2
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1


@dataclass(kw_only=True)
class SSLConfig:
    method: Literal["dino", "simclr"] = "dino"
    # DINO
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    #: the prototypes (last layer) get no update during these first steps
    freeze_last_layer_steps: int = 0
    # SimCLR
    temperature: float = 0.1
    proj_dim: int = 128
    gather_negatives: bool = True


@dataclass(kw_only=True)
class PretrainTrainConfig:
    steps: int = 1000
    batch_size: int = 64
    accum_steps: int = 1
    #: auto: bf16 on GPU, none on CPU; fp16 uses a GradScaler
    amp: Amp = "auto"
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 1
    rankme_every: int = 100
    #: torch intra-op threads per process (None: torch's default)
    threads: int | None = None
    progress: bool = True


def _pretrain_optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, lr_scaling="linear", weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0)


@dataclass(kw_only=True)
class PretrainConfig:
    #: output directory (config.yaml, checkpoint.pt, metrics, plots, backbone.safetensors)
    out: str = "runs/pretrain"
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=_pretrain_optim)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
