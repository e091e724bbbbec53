"""The typed config of ``slidestream finetune`` (:class:`FinetuneConfig`; the recipes in
``pipelines/configs/finetune/`` map onto it).

Sections: ``data`` (one source per split — a CSV of tiles, an ImageFolder or annotated slides —
and how items are split by group), ``model`` (the encoder, as :func:`models.encoders.load_encoder`
names it, and which part of it trains), ``loss`` (the recipe: cross-entropy with label smoothing
and mixup/cutmix, KD, Tf-KD-self, Tf-KD-reg, self-distillation, SupCon; multi-task weighting),
``augment``, ``optim`` (:class:`~pipelines.training.OptimConfig`; ``lr`` is the peak for a global
batch of 256, scaled linearly) and ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.finetune import MixupConfig

from ..training.optim import OptimConfig
from ..training.precision import Amp


@dataclass(kw_only=True)
class FinetuneSlideConfig:
    """One slide with QuPath GeoJSON annotations (classified regions); tiles are sampled inside them."""

    slide: str
    annotations: str
    #: overrides the slide's µm/px metadata
    mpp: float | None = None
    #: patient/slide group (default: the slide's id)
    group: str | None = None


@dataclass(kw_only=True)
class SourceConfig:
    """Where one split's items come from: exactly one of ``csv``, ``imagefolder``, ``slides``
    (or none: the split is empty, or cut from the training source by ``data.split``).

    - ``csv``: a table with columns ``slide, x, y`` (level-0 top-left), one column per task
      (``data.label_columns``), optionally ``mpp`` (else ``data.mpp``), ``group`` (else
      ``slide``) and ``split`` (train/val/test); slide paths are relative to the CSV's folder;
    - ``imagefolder``: ``ROOT/CLASS/*.png|jpg|jpeg|tif|tiff``;
    - ``slides``: annotated slides (:class:`FinetuneSlideConfig`)."""

    csv: str | None = None
    imagefolder: str | None = None
    slides: list[FinetuneSlideConfig] = field(default_factory=list)

    def kind(self) -> str | None:
        given = [k for k in ("csv", "imagefolder", "slides") if getattr(self, k)]
        if len(given) > 1:
            from ..errors import ConfigError

            raise ConfigError(f"a split has one data source; got {given} (give csv, imagefolder or slides)")
        return given[0] if given else None


@dataclass(kw_only=True)
class SplitConfig:
    """Splitting by group (patient or slide): items of one group never straddle splits.

    Without a ``val``/``test`` source and without a ``split`` column, the training source is cut by
    :func:`pipelines.finetune.group_split` (``val_fraction``, ``test_fraction``, ``seed``). Splits
    that are given (sources, a ``split`` column) are checked; a group found in two splits stops
    the job (``on_leak: error``) or is moved wholly to the split holding most of its items
    (``fix``). ``splits.json`` in the output reports items, groups and labels per split."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    on_leak: Literal["error", "fix"] = "error"


@dataclass(kw_only=True)
class FinetuneDataConfig:
    train: SourceConfig = field(default_factory=SourceConfig)
    val: SourceConfig = field(default_factory=SourceConfig)
    test: SourceConfig = field(default_factory=SourceConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    #: CSV label columns, one task each (several: multi-task); ImageFolder/slides have one task
    label_columns: list[str] = field(default_factory=lambda: ["label"])
    #: CSV group column (patient or slide); absent from the CSV: the slide column
    group_column: str = "group"
    #: ImageFolder groups: a regex whose first group, searched in the file name, is the group
    #: (e.g. "^(P\\d+)_"); None: every image is its own group
    group_pattern: str | None = None
    #: class names per task (label column) in index order; a task left out: its labels, sorted
    classes: dict[str, list[str]] = field(default_factory=dict)
    #: µm/px of tiles read from slides (CSV rows without an mpp column, annotated slides)
    mpp: float = 0.5
    #: model input side in px (tiles are read at this size; ImageFolder images are resized to it)
    tile_size: int = 224
    #: annotated slides: validation/test tiles on a grid inside the annotations, at most this many
    eval_max_tiles: int = 512
    #: annotated slides: class-balanced training stream
    class_balance: bool = True
    #: DataLoader worker processes (0: read in the training process)
    num_workers: int = 0
    #: decode threads per reading process
    read_threads: int = 2


@dataclass(kw_only=True)
class FinetuneModelConfig:
    #: a timm name (random init), a .safetensors from `slidestream pretrain`/`finetune`, or
    #: name=weights (models.encoders.load_encoder)
    encoder: str = "resnet18"
    #: full: everything trains; linear: a linear probe on the frozen encoder; last_n: the last
    #: `last_n` blocks (timm's block groups) and the norm after them train
    mode: Literal["full", "linear", "last_n"] = "full"
    last_n: int = 1
    #: zero-γ initialisation of each residual block (random-init encoders only; see
    #: models.finetune.zero_init_residual)
    zero_init: bool = True
    drop_path_rate: float = 0.0
    head_dropout: float = 0.0


@dataclass(kw_only=True)
class KDConfig:
    """Hinton KD / Tf-KD-self: ``(1 − alpha)·CE + alpha·τ²·KL(p_teacher^τ ‖ p^τ)``."""

    #: output folder (or its head.safetensors) of a `slidestream finetune` run
    teacher: str | None = None
    alpha: float = 0.9
    temperature: float = 4.0
    #: keep the teacher's logits per sample when its input is the same every time (no
    #: augmentation, no mixup, a fixed list of items)
    cache: bool = True


@dataclass(kw_only=True)
class TfKDRegConfig:
    """Tf-KD-reg: KD from a virtual teacher with probability ``correct_prob`` on the true class."""

    alpha: float = 0.1
    temperature: float = 20.0
    correct_prob: float = 0.99


@dataclass(kw_only=True)
class SelfDistillConfig:
    """Data-distortion guided self-distillation: CE on two views + ``weight``·KL both ways +
    ``mmd_weight``·MMD of their features."""

    weight: float = 1.0
    mmd_weight: float = 0.0


@dataclass(kw_only=True)
class SupConConfig:
    """SupCon: ``steps`` steps of the supervised contrastive loss on two views (encoder and a
    projection head), then ``train.steps`` steps of a linear classifier on the frozen encoder."""

    steps: int = 500
    temperature: float = 0.1
    proj_dim: int = 128
    #: peak learning rate of the linear classifier (for a global batch of 256 with linear scaling)
    linear_lr: float = 0.1


@dataclass(kw_only=True)
class FinetuneLossConfig:
    name: Literal["ce", "kd", "tfkd_self", "tfkd_reg", "self_distill", "supcon"] = "ce"
    label_smoothing: float = 0.0
    mixup: MixupConfig = field(default_factory=MixupConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    tfkd_reg: TfKDRegConfig = field(default_factory=TfKDRegConfig)
    self_distill: SelfDistillConfig = field(default_factory=SelfDistillConfig)
    supcon: SupConConfig = field(default_factory=SupConConfig)
    #: several label columns: learned uncertainty weighting (Kendall et al.) or a plain sum
    multitask: Literal["uncertainty", "sum"] = "uncertainty"


@dataclass(kw_only=True)
class FinetuneAugmentConfig:
    """Training augmentation on batched tiles (:mod:`models.augment`); ``enabled: false`` feeds
    the tiles as read (then a teacher's logits can be cached)."""

    enabled: bool = True
    flip_rot90: bool = True
    #: random resized crop: area fraction range ([1, 1]: no crop)
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    #: brightness, contrast, saturation strength (0: off) and hue
    color: float = 0.2
    hue: float = 0.05
    #: haematoxylin/eosin jitter σ (0: off)
    hed_sigma: float = 0.03


@dataclass(kw_only=True)
class FinetuneTrainConfig:
    #: optimiser steps (SupCon: of the linear classifier, after loss.supcon.steps)
    steps: int = 1000
    #: tiles per process and micro-step
    batch_size: int = 64
    #: micro-steps per optimiser step (exact gradient accumulation)
    accum_steps: int = 1
    #: auto: bf16 on GPU, none on CPU
    amp: Amp = "auto"
    val_every: int = 200
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    #: torch CPU threads (None: torch's default)
    threads: int | None = None
    progress: bool = True
    #: tiles per forward pass when evaluating (None: batch_size)
    eval_batch_size: int | None = None


def _finetune_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, lr_scaling="linear", min_lr=1e-6, warmup_steps=50, weight_decay=0.05)


@dataclass(kw_only=True)
class FinetuneConfig:
    #: output directory (config.yaml, checkpoint.pt, encoder/head.safetensors, metrics, figures)
    out: str = "runs/finetune"
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    loss: FinetuneLossConfig = field(default_factory=FinetuneLossConfig)
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
