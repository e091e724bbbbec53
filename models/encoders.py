"""Encoders for inference: one loader and one input preparation for every job that embeds tiles
(``slidestream embed``, ``slidestream eval``, segmentation on a pretrained encoder, RankMe probes).

An encoder is named by a string (:func:`parse_encoder`):

- a timm model name (``vit_small_patch16_224``): nothing is downloaded, so it is initialised
  from a fixed seed (0 unless ``seed=`` says otherwise) — reproducible features, useful for
  tests and as a random-init baseline;
- a ``.safetensors`` file written by ``slidestream pretrain`` (its metadata names the timm
  architecture, image size and the normalisation the encoder was trained with);
- ``name=path``: a timm name with weights from a local file (``.safetensors`` or a tensor-only
  checkpoint);

or given as an ``nn.Module`` already built. :func:`load_encoder` returns an :class:`Encoder`:
the model in eval mode on its device, its name and weights hash (recorded in feature files), its
feature width, the side its inputs are resized to (``input_size``; None keeps the tiles' size)
and its normalisation (``mean``/``std``). The normalisation is the one recorded with the weights
when there is one (``slidestream pretrain`` records what its augmentation used), else timm's data
config for the architecture.

:meth:`Encoder.preprocess` turns uint8 tiles (B, 3, H, W) into the model's input (float, resized
with antialiasing when asked, normalised); :meth:`Encoder.features` runs the forward pass under
``torch.inference_mode`` (bf16/fp16 autocast and channels-last on GPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import backbones

log = logging.getLogger(__name__)

#: weights-file metadata keys of the normalisation an encoder was trained with
META_MEAN, META_STD = "norm_mean", "norm_std"
#: weights-file metadata key of the tile side an encoder was trained on
META_INPUT = "train_crop_size"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder string: ``label`` (for tables), timm ``name`` and/or ``weights`` path."""

    label: str
    name: str | None
    weights: str | None


def parse_encoder(spec: str | os.PathLike) -> EncoderSpec:
    """``vit_tiny_patch16_224`` | ``path/backbone.safetensors`` | ``vit_small_patch16_224=path``."""
    spec = os.fspath(spec)
    if "=" in spec:
        name, weights = spec.split("=", 1)
        return EncoderSpec(f"{name}={Path(weights).name}", name, weights)
    if spec.endswith(WEIGHT_SUFFIXES) or Path(spec).is_file():
        if not Path(spec).is_file():
            raise FileNotFoundError(
                f"encoder weights {spec} not found; pass a timm model name or the .safetensors file "
                f"written by `slidestream pretrain`"
            )
        p = Path(spec)  # pretraining runs all export backbone.safetensors: keep the run's folder
        return EncoderSpec(f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem, None, spec)
    return EncoderSpec(spec, spec, None)


@dataclass
class Encoder:
    """A feature extractor ready for inference (see the module docstring)."""

    model: nn.Module
    name: str
    weights_sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    input_size: int | None
    device: torch.device
    label: str = ""

    def preprocess(self, images: torch.Tensor, *, resize: bool = False) -> torch.Tensor:
        """uint8 (B, 3, H, W) → normalised float32 on this encoder's device; with ``resize``
        the tiles are first resized to ``input_size`` (bilinear, antialiased)."""
        return preprocess(
            images.to(self.device, non_blocking=True),
            self.mean,
            self.std,
            size=self.input_size if resize else None,
        )

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) float32 of an already preprocessed batch."""
        if self.device.type == "cuda":
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                y = self.model(x)
        else:
            y = self.model(x.to(self.device))
        if y.ndim != 2:
            raise RuntimeError(
                f"encoder {self.name} returned features of shape {tuple(y.shape)}; "
                f"expected (batch, dim) — build it with num_classes=0"
            )
        return y.float()

    def features(self, images: torch.Tensor, *, resize: bool = False) -> torch.Tensor:
        """Features (B, D) of uint8 tiles (B, 3, H, W): :meth:`preprocess` then :meth:`forward`."""
        return self.forward(self.preprocess(images, resize=resize))


def preprocess(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    size: int | None = None,
) -> torch.Tensor:
    """uint8 [0, 255] (or float [0, 1]) (B, 3, H, W) → float32, resized to ``size`` × ``size``
    (bilinear with antialiasing) when given and different, normalised with ``mean``/``std``."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def module_sha256(model: nn.Module) -> str:
    """sha256 over a module's state dict (names and bytes), for encoders given as modules."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _floats(meta: dict[str, str], key: str) -> tuple[float, float, float] | None:
    if key not in meta:
        return None
    v = json.loads(meta[key]) if isinstance(meta[key], str) else meta[key]
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def load_encoder(
    encoder: str | os.PathLike | EncoderSpec | nn.Module,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    **timm_kwargs,
) -> Encoder:
    """The :class:`Encoder` of ``encoder`` (see the module docstring) on ``device``.

    ``seed``: the random initialisation of an encoder named without weights. ``timm_kwargs``:
    further ``timm.create_model`` options of the architecture (``drop_path_rate``,
    ``zero_init_last``, …; options an architecture does not take are dropped as in
    :func:`models.backbones.create`) — for training an encoder (``slidestream finetune``); not
    used when ``encoder`` is a module."""
    from timm.data import resolve_data_config

    device = torch.device(device)
    meta: dict[str, str] = {}
    if isinstance(encoder, nn.Module):
        model, name, sha, label = (
            encoder,
            type(encoder).__name__,
            module_sha256(encoder),
            type(encoder).__name__,
        )
    else:
        spec = encoder if isinstance(encoder, EncoderSpec) else parse_encoder(encoder)
        label = spec.label
        if spec.weights is not None:
            model = backbones.create(spec.name, weights=spec.weights, num_classes=0, **timm_kwargs)
            meta = backbones.read_metadata(spec.weights)
            name = spec.name or meta.get(backbones.META_ARCH) or backbones.architecture(model) or "unknown"
            sha = backbones.weights_sha256(spec.weights)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                model = backbones.create(spec.name, num_classes=0, **timm_kwargs)
            name, sha = str(spec.name), f"random-init-seed{int(seed)}"
            log.warning(
                "encoder %s has no weights (none are downloaded): using a seed-%d random "
                "initialisation; pass the .safetensors from `slidestream pretrain` for real features",
                spec.name,
                int(seed),
            )
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    data_cfg = resolve_data_config({}, model=model)
    mean = _floats(meta, META_MEAN) or tuple(float(v) for v in data_cfg["mean"])
    std = _floats(meta, META_STD) or tuple(float(v) for v in data_cfg["std"])
    size = int(meta[META_INPUT]) if META_INPUT in meta else int(data_cfg["input_size"][-1])
    return Encoder(
        model=model,
        name=name,
        weights_sha256=sha,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        dim=int(backbones.feature_dim(model)),
        input_size=size,
        device=device,
        label=label,
    )


__all__ = [
    "META_INPUT",
    "META_MEAN",
    "META_STD",
    "Encoder",
    "EncoderSpec",
    "load_encoder",
    "module_sha256",
    "parse_encoder",
    "preprocess",
]
