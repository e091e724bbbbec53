"""Segmentation models: an encoder + a decoder behind one interface, and the factory.

``create_segmenter(kind, backbone=..., n_classes=...)`` builds a :class:`SegModel`:

- ``"unet"``: the U-Net of :mod:`models.seg.unet` (no separate encoder; ``backbone`` unused).
- ``"segformer"``: :class:`~models.seg.segformer.MultiScaleEncoder` on a timm backbone +
  :class:`~models.seg.segformer.SegFormerHead`.
- ``"linear"``: the same encoder + :class:`LinearDecoder`, a 1×1 convolution (a per-pixel linear
  classifier) on the stride-32 map (``scales="last"``) or on all four maps upsampled to stride 4
  and concatenated (``scales="all"``); for probing a frozen encoder.

:class:`SegModel` takes float images in [0, 1] (B, 3, H, W), normalises them (ImageNet mean/std by
default) and returns logits (B, n_classes, H, W) at the input size (bilinear upsampling of the
decoder output). ``freeze_encoder()`` stops gradients into the encoder and keeps its
normalisation statistics fixed (the encoder stays in eval mode). ``model.config`` is the keyword
dict that rebuilds the architecture: ``create_segmenter(**model.config)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .segformer import MultiScaleEncoder, SegFormerHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("unet", "segformer", "linear")


class LinearDecoder(nn.Module):
    """BatchNorm (no affine) + 1×1 conv on the last feature map or on all maps at stride 4."""

    def __init__(self, in_channels: list[int], n_classes: int, scales: str = "last"):
        super().__init__()
        if scales not in ("last", "all"):
            raise ValueError(f"scales must be 'last' or 'all', got {scales!r}")
        self.scales = scales
        c = in_channels[-1] if scales == "last" else sum(in_channels)
        self.norm = nn.BatchNorm2d(c, affine=False)
        self.classify = nn.Conv2d(c, n_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.scales == "last":
            x = feats[-1]
        else:
            size = feats[0].shape[-2:]
            x = torch.cat(
                [
                    F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                    if f.shape[-2:] != size
                    else f
                    for f in feats
                ],
                dim=1,
            )
        return self.classify(self.norm(x))


class SegModel(nn.Module):
    """``decoder(encoder(normalise(x)))`` upsampled to the input size; ``encoder`` may be None."""

    def __init__(
        self,
        encoder: nn.Module | None,
        decoder: nn.Module,
        *,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.config = dict(config or {})
        self.encoder_frozen = False

    def freeze_encoder(self, frozen: bool = True) -> SegModel:
        """Freeze (or unfreeze) the encoder: no gradients, eval-mode normalisation layers."""
        if self.encoder is None:
            raise ValueError("this model has no separate encoder to freeze (kind='unet')")
        self.encoder_frozen = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.encoder.train(self.training and not frozen)
        return self

    def train(self, mode: bool = True) -> SegModel:
        super().train(mode)
        if self.encoder is not None and self.encoder_frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.encoder is None:
            out = self.decoder(x)
        else:
            feats = self.encoder(x)
            out = self.decoder(feats)
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out


#: keys of a :class:`SegModel` config (``model.config``, saved in ``segment train`` checkpoints)
#: besides the timm architecture keys of its backbone (:data:`models.backbones.ARCH_KEYS`)
SEG_KEYS = frozenset(
    {
        "kind",
        "n_classes",
        "dropout",
        "unet_depth",
        "unet_width",
        "unet_norm",
        "embed_dim",
        "scales",
        "backbone",
        "img_size",
    }
)


def segmenter_from_config(config: Any, source: str) -> SegModel:
    """Rebuild a :class:`SegModel` from a config read from ``source`` (a checkpoint's
    ``model_config``): architecture keys only (:data:`SEG_KEYS` and the backbone's
    :data:`models.backbones.ARCH_KEYS`, plain values, a plain timm name); anything else — a
    ``weights`` or ``checkpoint_path`` above all — is a :class:`models.backbones.WeightsError`."""
    from ..backbones import ARCH_KEYS, check_arch_kwargs, check_arch_name

    cfg = check_arch_kwargs(config, source, allowed=SEG_KEYS | ARCH_KEYS)
    if cfg.get("backbone") is not None:
        check_arch_name(cfg["backbone"], source)
    return create_segmenter(cfg.pop("kind", "unet"), **cfg)


def create_segmenter(
    kind: str = "unet",
    *,
    n_classes: int,
    backbone: str | None = None,
    weights: str | None = None,
    img_size: int | None = None,
    embed_dim: int = 128,
    dropout: float = 0.1,
    scales: str = "last",
    unet_depth: int = 4,
    unet_width: int = 16,
    unet_norm: str = "batch",
    **backbone_kwargs: Any,
) -> SegModel:
    """Build a :class:`SegModel` (see the module docstring). ``weights`` is a local encoder
    weights file (safetensors or a tensor-only checkpoint) loaded by ``models.backbones``."""
    if kind not in KINDS:
        raise ValueError(f"unknown segmenter kind {kind!r}; valid: {list(KINDS)}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    config: dict[str, Any] = {"kind": kind, "n_classes": n_classes}
    if kind == "unet":
        from .unet import UNet

        decoder = UNet(
            in_channels=3,
            n_classes=n_classes,
            depth=unet_depth,
            width=unet_width,
            norm=unet_norm,
            dropout=dropout,
        )
        config.update(unet_depth=unet_depth, unet_width=unet_width, unet_norm=unet_norm, dropout=dropout)
        return SegModel(None, decoder, config=config)
    if not backbone:
        raise ValueError(f"kind={kind!r} needs backbone= (a timm model name, e.g. 'resnet18')")
    encoder = MultiScaleEncoder(backbone, weights=weights, img_size=img_size, **backbone_kwargs)
    if kind == "segformer":
        decoder: nn.Module = SegFormerHead(encoder.channels, n_classes, embed_dim=embed_dim, dropout=dropout)
        config.update(embed_dim=embed_dim, dropout=dropout)
    else:
        decoder = LinearDecoder(encoder.channels, n_classes, scales=scales)
        config.update(scales=scales)
    # weights are not part of the architecture: a checkpoint holds the trained encoder itself
    config.update(backbone=backbone, img_size=img_size, **backbone_kwargs)
    return SegModel(encoder, decoder, config=config)
