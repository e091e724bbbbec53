"""The typed config of ``slidestream embed`` (:class:`EmbedConfig`; ``pipelines/configs/embed/default.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wsi.tissue import DEFAULT_METHOD

from ..runtime import IsolationConfig


@dataclass(kw_only=True)
class EmbedConfig:
    #: dir | glob | URL prefix | manifest.csv | list of these
    slides: Any = None
    #: timm name, a .safetensors from `slidestream pretrain`, name=weights, or a preset
    #: (uni, kaiko-vits16, hf-hub:ORG/NAME; `slidestream models`)
    encoder: str = ""
    #: output directory (local or shared filesystem)
    out: str = ""
    #: target µm/px of the tiles
    mpp: float = 0.5
    #: tile side in pixels
    tile_size: int = 224
    #: tiles per forward pass
    batch_size: int = 64
    #: auto (the shipped U-Net, Otsu without its weights) | unet | otsu
    tissue_method: str = DEFAULT_METHOD
    #: minimum tissue fraction of a tile
    min_tissue: float = 0.4
    #: redo every slide, even those with valid files
    overwrite: bool = False
    #: retry slides the manifest records as failed
    retry_failed: bool = False
    #: µm/px assumed for slides without metadata
    mpp_override: float | None = None
    #: decode threads per batch read
    read_threads: int = 2
    #: cpu | gpu: where JPEG tiles are decoded (gpu: nvJPEG batches on the encoder's CUDA device)
    decode: str = "cpu"
    #: decode 2x/4x/8x reductions in the JPEG DCT domain (faster, pixels within a few levels of
    #: the exact box average); off by default: features should not depend on the decoder's shortcut
    scaled_decode: bool = False
    #: auto | cpu | cuda
    device: str = "auto"
    #: record each slide file's sha256 (reads every byte)
    hash_slides: bool = False
    #: fraction of a slide's tiles that may be unreadable
    max_failed_tiles: float = 0.05
    #: stain normalisation before the encoder: macenko:TARGET | reinhard:TARGET (TARGET an RGB
    #: image file, or demo: the shipped reference region); null: none
    stain_norm: str | None = None
    progress: bool = True
    #: fsspec options for remote slides (e.g. {anon: true})
    storage_options: dict | None = None
    #: how long ranks that finish early wait for the others at the barrier
    dist_timeout_s: int = 7 * 24 * 3600
    #: each slide read in a worker process with memory and time limits (pipelines.runtime)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
