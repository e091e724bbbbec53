"""A small U-Net (Ronneberger et al. 2015) for any input size.

``UNet(in_channels=3, n_classes=1, depth=4, width=16, norm="batch"|"group", dropout=0.0)``:
``depth`` down-sampling stages, channels ``width * 2**i`` at stage ``i``; each stage is two
3×3 conv → norm → ReLU blocks; down-sampling by 2×2 max-pooling, up-sampling by 2×2 transposed
convolution, skip connections by concatenation. ``forward(x)`` takes float (B, C, H, W) for any
H, W: the input is padded (reflect) to a multiple of ``2**depth`` and the logits
(B, n_classes, H, W) are cropped back. With the defaults it has about 1.9 M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class ConvBlock(nn.Sequential):
    """Two (3×3 conv → norm → ReLU), optional dropout at the end."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float = 0.0):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net returning per-pixel logits at the input resolution (see the module docstring)."""

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 1,
        depth: int = 4,
        width: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth} width={width}")
        _norm(norm, width)  # validate early
        self.depth = depth
        self.config = {
            "in_channels": in_channels,
            "n_classes": n_classes,
            "depth": depth,
            "width": width,
            "norm": norm,
            "dropout": dropout,
        }
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for i in range(depth):
            self.down.append(ConvBlock(cin, chans[i], norm))
            cin = chans[i]
        self.bottleneck = ConvBlock(chans[depth - 1], chans[depth], norm, dropout)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2))
            self.dec.append(ConvBlock(2 * chans[i], chans[i], norm))
        self.head = nn.Conv2d(chans[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            # reflect needs pad < size; fall back to replicate for tiny inputs
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :h, :w]
