"""SegFormer-style all-MLP decoder (Xie et al. 2021) on any timm backbone.

:class:`MultiScaleEncoder` turns a timm model into four feature maps at strides 4, 8, 16, 32:
hierarchical backbones (CNNs, Swin, ConvNeXt, ...) through ``timm.create_model(name,
features_only=True)``; plain ViTs, whose blocks all run at one stride, through a *simple feature
pyramid* (Li et al. 2022, ViTDet) built on four evenly spaced intermediate blocks
(``forward_intermediates``): 2× transposed conv twice (stride 4), once (stride 8), identity
(stride 16), 2× max-pool (stride 32). Which path is taken is read from ``feature_info`` (all
reductions equal → plain ViT), never from the model name.

:class:`SegFormerHead`: each map → linear layer (1×1 conv) to ``embed_dim`` channels → bilinear
upsampling to the stride-4 grid → concatenation → linear fusion (1×1 conv + BN + ReLU) → dropout →
linear classifier. :class:`models.seg.decoders.SegModel` upsamples the logits to the input size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _create_timm(
    name: str, weights: str | None, state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any
) -> nn.Module:
    """A ``features_only`` timm model through ``models.backbones.create`` (never a download), with
    ``weights`` (a local file of the plain backbone) or ``state_dict`` (a preset's tensors, timm
    keys: :func:`models.zoo.preset_weights`) loaded into the wrapped network: timm's feature
    wrappers either keep the original parameter names (``FeatureListNet``) or hold the model as
    ``.model`` (``FeatureGetterNet``). Every encoder parameter must be in the file."""
    from models import backbones

    net = backbones.create(name, **kwargs)
    if state_dict is not None:
        from models.zoo import load_into

        load_into(
            getattr(net, "model", net), dict(state_dict), f"{name} preset weights", allow_unexpected=True
        )
    elif weights is not None:
        target = getattr(net, "model", net)
        report = backbones.load_weights(target, weights)
        if report.missing:
            raise backbones.WeightsError(
                f"{weights}: {len(report.missing)} encoder parameter(s) are not in the file "
                f"({report.missing[:5]}); is it a {name} backbone?"
            )
        net.load_report = report
    return net


class MultiScaleEncoder(nn.Module):
    """Four feature maps (B, C_i, H/s_i, W/s_i) with strides ``(4, 8, 16, 32)`` from a timm backbone.

    ``channels`` lists C_i, ``strides`` lists s_i. For a plain ViT, ``img_size`` sets the position
    embedding grid (inputs of other sizes are accepted: ``dynamic_img_size``)."""

    def __init__(
        self,
        name: str,
        *,
        weights: str | None = None,
        img_size: int | None = None,
        in_chans: int = 3,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        self.name = name
        opts = dict(kwargs, features_only=True, in_chans=in_chans)
        if img_size is not None:
            opts["img_size"] = img_size
        probe = _create_timm(name, None, out_indices=4, **opts)
        reductions = list(probe.feature_info.reduction())
        self.plain = len(set(reductions)) == 1
        if not self.plain:
            loaded = weights is not None or state_dict is not None
            self.body = _create_timm(name, weights, state_dict, out_indices=4, **opts) if loaded else probe
            self.channels = list(probe.feature_info.channels())
            self.strides = reductions
            self.pyramid = None
            return
        # plain ViT: four evenly spaced blocks, then a simple feature pyramid
        n_blocks = len(probe.feature_info.info)
        idx = tuple(sorted({max(0, round((i + 1) * n_blocks / 4) - 1) for i in range(4)}))
        if len(idx) < 4:
            raise ValueError(
                f"{name}: a plain ViT needs at least 4 blocks for a feature pyramid, has {n_blocks}"
            )
        self.body = _create_timm(name, weights, state_dict, out_indices=idx, **opts)
        dim = self.body.feature_info.channels()[-1]
        patch = reductions[0]
        if patch & (patch - 1):
            raise ValueError(
                f"{name}: patch size {patch} is not a power of two; the simple pyramid needs one"
            )
        self.pyramid = nn.ModuleList(self._rescale(dim, patch, s) for s in (4, 8, 16, 32))
        self.channels = [dim] * 4
        self.strides = [4, 8, 16, 32]

    @staticmethod
    def _rescale(dim: int, patch: int, stride: int) -> nn.Module:
        layers: list[nn.Module] = []
        s = patch
        while s > stride:
            layers += (
                [nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.GELU()]
                if s // 2 > stride
                else [nn.ConvTranspose2d(dim, dim, 2, stride=2)]
            )
            s //= 2
        while s < stride:
            layers.append(nn.MaxPool2d(2))
            s *= 2
        return nn.Sequential(*layers) if layers else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = list(self.body(x))
        if self.pyramid is None:
            return feats
        return [p(f) for p, f in zip(self.pyramid, feats)]


class SegFormerHead(nn.Module):
    """All-MLP decoder: per-scale linear projection, upsample to the finest map, fuse, classify."""

    def __init__(self, in_channels: list[int], n_classes: int, embed_dim: int = 128, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(in_channels), embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(embed_dim, n_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        ups = [
            F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
            if f.shape[-2:] != size
            else p(f)
            for p, f in zip(self.proj, feats)
        ]
        return self.classify(self.dropout(self.fuse(torch.cat(ups, dim=1))))
