"""Pathology augmentations on batched tensors, applied on the training side.

Input is a ``(B, 3, H, W)`` uint8 batch straight from the tile loader; every function draws
per-sample parameters from a ``torch.Generator`` (on the CPU, so results are the same on any
device) and works on the whole batch at once. Colours are floats in [0, 1] until
:func:`normalize`.

- :func:`random_resized_crop`: per-sample box (area ``scale``, aspect ``ratio``) resampled to a
  square ``size`` with one bilinear ``grid_sample``;
- :func:`flip_rot90`: horizontal flip and k·90° rotations (exact pixel permutations — tissue has
  no canonical orientation);
- :func:`color_jitter` (brightness, contrast, saturation, hue as a rotation in YIQ space),
  :func:`hed_jitter` (Tellez et al. 2018: scale and shift of the haematoxylin / eosin / DAB
  optical densities from Ruifrok & Johnston's colour deconvolution, :func:`rgb_to_hed` /
  :func:`hed_to_rgb`, the same matrix and convention as ``skimage.color.rgb2hed``),
  :func:`gaussian_blur`, :func:`solarize`, :func:`grayscale`.

:class:`MultiCropAugment` makes DINO's 2 global + N local views; :class:`TwoViewAugment` makes
SimCLR's two views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = math.log(1e-6)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _coin(n: int, p: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [0, 1]; float input is returned as float32 unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop of relative area ``scale`` and aspect ``ratio``, resized to ``size``²."""
    b, _, h, w = x.shape
    area = _uniform(b, scale[0], scale[1], generator)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(max=1.0)  # fraction of the width
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = _uniform(b, 0, 1, generator) * (1 - cw) + cw / 2  # centre, fraction of the width
    cy = _uniform(b, 0, 1, generator) * (1 - ch) + ch / 2
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cw
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = 2 * cy - 1
    xf = to_float(x)
    grid = F.affine_grid(theta.to(xf.device), [b, 3, size, size], align_corners=False)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flip_rot90(
    x: torch.Tensor, generator: torch.Generator | None = None, p_flip: float = 0.5
) -> torch.Tensor:
    """Random horizontal flip then a random multiple of 90° per sample (square images)."""
    b, _, h, w = x.shape
    if h != w:
        raise ValueError(f"flip_rot90 needs square images, got {h}x{w}")
    flip = _coin(b, p_flip, generator)
    k = torch.randint(0, 4, (b,), generator=generator)
    out = x.clone()
    if flip.any():
        out[flip] = out[flip].flip(-1)
    for r in (1, 2, 3):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(out[sel], r, dims=(-2, -1))
    return out


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def grayscale(x: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    sel = _coin(x.shape[0], p, generator).to(x.device).view(-1, 1, 1, 1)
    return torch.where(sel, _luma(x).expand_as(x), x)


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Brightness, contrast, saturation factors in [1-s, 1+s]; hue shift in [-hue, hue] turns."""
    b = x.shape[0]
    dev = x.device
    apply = _coin(b, p, generator).to(dev).view(-1, 1, 1, 1)
    bf = _uniform(b, 1 - brightness, 1 + brightness, generator).to(dev).view(-1, 1, 1, 1)
    cf = _uniform(b, 1 - contrast, 1 + contrast, generator).to(dev).view(-1, 1, 1, 1)
    sf = _uniform(b, 1 - saturation, 1 + saturation, generator).to(dev).view(-1, 1, 1, 1)
    hf = _uniform(b, -hue, hue, generator).to(dev) * 2 * math.pi
    y = (x * bf).clamp(0, 1)
    mean = _luma(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * cf + mean).clamp(0, 1)
    gray = _luma(y)
    y = ((y - gray) * sf + gray).clamp(0, 1)
    # hue: rotate the chroma plane of YIQ
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev
    )
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(hf), torch.sin(hf)
    rot = torch.zeros(b, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = from_yiq @ rot @ to_yiq  # (b, 3, 3)
    y = torch.einsum("bij,bjhw->bihw", m, y).clamp(0, 1)
    return torch.where(apply, y, x)


def rgb_to_hed(x: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """RGB in [0, 1] → HED stain concentrations (skimage ``rgb2hed`` convention)."""
    m = HED_FROM_RGB.to(x.device, torch.float32)
    od = torch.log(x.clamp(min=1e-6)) / _LOG_ADJUST
    hed = torch.einsum("bchw,cd->bdhw", od, m)
    return hed.clamp(min=0) if clip else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """HED stain concentrations → RGB in [0, 1] (skimage ``hed2rgb`` convention)."""
    m = RGB_FROM_HED.to(hed.device, torch.float32)
    log_rgb = torch.einsum("bdhw,dc->bchw", hed * _LOG_ADJUST, m)
    return torch.exp(log_rgb).clamp(0, 1)


def hed_jitter(
    x: torch.Tensor,
    sigma: float = 0.05,
    bias: float = 0.01,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample, per-stain ``hed * U(1-sigma, 1+sigma) + U(-bias, bias)``, back to RGB."""
    b = x.shape[0]
    dev = x.device
    apply = _coin(b, p, generator).to(dev).view(-1, 1, 1, 1)
    alpha = _uniform(b * 3, 1 - sigma, 1 + sigma, generator).to(dev).view(b, 3, 1, 1)
    beta = _uniform(b * 3, -bias, bias, generator).to(dev).view(b, 3, 1, 1)
    y = hed_to_rgb(rgb_to_hed(x, clip=False) * alpha + beta)
    return torch.where(apply, y, x)


def gaussian_blur(
    x: torch.Tensor,
    p: float = 0.5,
    sigma: Sequence[float] = (0.1, 2.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample Gaussian blur (σ in pixels), separable, one grouped convolution per axis."""
    b, c, h, w = x.shape
    apply = _coin(b, p, generator)
    s = _uniform(b, sigma[0], sigma[1], generator)
    if not apply.any():
        return x
    radius = max(1, min(int(math.ceil(3 * float(s[apply].max()))), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    delta = (t == 0).float().expand(b, -1)
    k = torch.where(apply[:, None], k, delta).to(x.device)  # (b, K)
    kern = k.repeat_interleave(c, 0)  # (b*c, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kern.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kern.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def solarize(
    x: torch.Tensor, p: float = 0.2, threshold: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    sel = _coin(x.shape[0], p, generator).to(x.device).view(-1, 1, 1, 1)
    return torch.where(sel & (x >= threshold), 1 - x, x)


def normalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass(kw_only=True)
class ViewRecipe:
    """One kind of view: crop size and scale, then the photometric chain with its probabilities."""

    size: int
    scale: tuple[float, float]
    p_blur: float = 0.5
    p_solarize: float = 0.0
    p_color: float = 0.8
    p_gray: float = 0.2
    p_hed: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    hed_sigma: float = 0.05
    hed_bias: float = 0.01

    def __call__(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        y = random_resized_crop(x, self.size, self.scale, generator=g)
        y = flip_rot90(y, generator=g)
        y = hed_jitter(y, self.hed_sigma, self.hed_bias, p=self.p_hed, generator=g)
        y = color_jitter(
            y, self.brightness, self.contrast, self.saturation, self.hue, p=self.p_color, generator=g
        )
        y = grayscale(y, p=self.p_gray, generator=g)
        y = gaussian_blur(y, p=self.p_blur, generator=g)
        y = solarize(y, p=self.p_solarize, generator=g)
        return normalize(y)


class MultiCropAugment:
    """DINO multi-crop: 2 global views (blur 1.0; blur 0.1 + solarise 0.2) and ``n_local`` local views."""

    def __init__(
        self,
        *,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: Sequence[float] = (0.32, 1.0),
        local_scale: Sequence[float] = (0.05, 0.32),
        **photometric: float,
    ) -> None:
        gs, ls = (
            (float(global_scale[0]), float(global_scale[1])),
            (float(local_scale[0]), float(local_scale[1])),
        )
        self.global1 = ViewRecipe(size=global_size, scale=gs, p_blur=1.0, **photometric)
        self.global2 = ViewRecipe(size=global_size, scale=gs, p_blur=0.1, p_solarize=0.2, **photometric)
        self.local = ViewRecipe(size=local_size, scale=ls, p_blur=0.5, **photometric)
        self.n_local = n_local
        self.n_global = 2

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        views = [self.global1(x, generator), self.global2(x, generator)]
        views += [self.local(x, generator) for _ in range(self.n_local)]
        return views


class TwoViewAugment:
    """SimCLR: two views of the same recipe (blur 0.5 each, solarise on the second as in BYOL)."""

    def __init__(self, *, size: int = 224, scale: Sequence[float] = (0.2, 1.0), **photometric: float) -> None:
        sc = (float(scale[0]), float(scale[1]))
        self.view1 = ViewRecipe(size=size, scale=sc, p_blur=0.5, **photometric)
        self.view2 = ViewRecipe(size=size, scale=sc, p_blur=0.5, p_solarize=0.2, **photometric)
        self.n_global = 2

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [self.view1(x, generator), self.view2(x, generator)]
