"""Stain normalisation as batched torch transforms (CPU or GPU): Macenko and Reinhard.

Both are ``nn.Module`` s: ``fit(target)`` once on a target image or a reference region's pixels
(the caller reads the region; ``models`` does not import ``wsi``), then ``norm(batch)`` maps a
``(B, 3, H, W)`` RGB batch (``uint8`` 0..255, or float 0..1) to the same shape, dtype and range,
on the batch's device. The fitted target is a pair of buffers, so it moves with ``.to(device)`` and
is saved in ``state_dict``; :meth:`StainNormalizer.describe` gives it as JSON for provenance.

- :class:`Macenko` (Macenko et al., ISBI 2009): optical density ``OD = -log((I + 1) / Io)``; pixels
  with any channel below ``beta`` are background; the plane of the two largest eigenvectors of the
  foreground OD covariance; the stain vectors are the ``alpha`` / ``100 - alpha`` percentile angles
  in that plane (haematoxylin first: larger red OD); concentrations by least squares; each stain's
  concentrations scaled so its 99th percentile matches the target's; the image rebuilt with the
  target's stain vectors. Each image of a batch gets its own stain matrix (one batched eigh, sort and
  solve for the whole batch). Same algorithm and defaults (``Io=240, alpha=1, beta=0.15``) as
  torchstain's torch backend, with three deliberate differences: eigenvectors are given a positive
  orientation (an eigensolver may flip their signs, which moves the percentile angles across the
  ±π cut); the rebuilt image is ``Io * exp(-OD) - 1``, the exact inverse of the OD transform (so a
  fit to an image leaves that image unchanged); the result is rounded, not truncated.
- :class:`Reinhard` (Reinhard et al. 2001, in CIELAB as torchstain and StainTools do): per image and
  channel, standardise the LAB values and rescale them to the target's mean and standard deviation.

HED jitter (:mod:`models.augment`) remains the augmentation; these are normalisations.
``stain_normalizer("macenko", target)`` is the one call a loader or embedding job needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: sRGB (D65) -> XYZ, and the D65 white point (the constants torchstain and OpenCV use)
_RGB2XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def _as_float255(batch: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(B, 3, H, W) or (3, H, W) uint8/float -> float32 (B, 3, H, W) in 0..255, and whether the
    input was a float 0..1 image."""
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected an RGB batch (B, 3, H, W), got shape {tuple(batch.shape)}")
    if batch.dtype == torch.uint8:
        return batch.float(), False
    if not batch.is_floating_point():
        raise ValueError(f"expected uint8 or float pixels, got {batch.dtype}")
    return batch.float() * 255.0, True


def _back(x255: torch.Tensor, was_float: bool) -> torch.Tensor:
    x = x255.clamp(0, 255)
    return x / 255.0 if was_float else x.round().to(torch.uint8)


def _kth(values: torch.Tensor, q: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-rank ``q``-th percentile along the last dim (numpy's ``'nearest'``, as torchstain).

    With ``valid`` (same shape, bool) only the valid entries of each row count. Selection, not a
    full sort: ``kthvalue`` when every row counts all its entries, else ``topk`` from the nearer end
    (``q`` near 0 or 100 needs only about 1% of each row)."""
    n = values.shape[-1]
    if valid is None:
        k = int(round(0.01 * q * (n - 1)))
        return values.kthvalue(k + 1, dim=-1).values
    counts = valid.sum(-1)
    rank = torch.round(0.01 * q * (counts.to(values.dtype) - 1)).long()  # from the bottom
    if q <= 50:
        pick, largest, fill = rank, False, float("inf")
    else:
        pick, largest, fill = counts - 1 - rank, True, float("-inf")
    k = int(pick.max()) + 1
    top = values.masked_fill(~valid, fill).topk(k, dim=-1, largest=largest, sorted=True).values
    return top.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


class StainNormalizer(nn.Module):
    """Common interface: :meth:`fit` to a target, then call on batches."""

    method = ""

    def fit(self, target: torch.Tensor) -> StainNormalizer:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The method and fitted target as JSON-able values (for a feature file's attributes)."""
        return {"method": self.method, **{k: v.tolist() for k, v in self.state_dict().items()}}

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call .fit(target_pixels) first")


class Macenko(StainNormalizer):
    """Batched Macenko stain normalisation (see the module docstring)."""

    method = "macenko"

    def __init__(self, *, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15):
        super().__init__()
        self.io, self.alpha, self.beta = float(io), float(alpha), float(beta)
        self.register_buffer("stain_matrix", torch.zeros(3, 2))
        self.register_buffer("max_conc", torch.zeros(2))
        self.register_buffer("fitted", torch.tensor(False))

    def optical_density(self, x255: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) 0..255 -> (B, H*W, 3) optical density."""
        return -torch.log((x255.flatten(2).transpose(1, 2) + 1.0) / self.io)

    def estimate(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: stain matrix (B, 3, 2) with unit columns (H, E) and the 99th-percentile
        concentrations (B, 2)."""
        x, _ = _as_float255(batch)
        return self._estimate(x)

    def _estimate(self, x255: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        od = self.optical_density(x255)
        he = self._stain_vectors(od)
        return he, _kth(self._concentrations(od, he), 99.0)

    def _stain_vectors(self, od: torch.Tensor) -> torch.Tensor:
        fg = (od >= self.beta).all(dim=-1)  # (B, N)
        n = fg.sum(dim=1)
        if int(n.min()) < 3:
            raise ValueError(
                "an image has fewer than 3 stained pixels (optical density >= beta in every channel); "
                "Macenko needs tissue, not background"
            )
        w = fg.to(od.dtype).unsqueeze(-1)
        mean = (od * w).sum(1, keepdim=True) / n.view(-1, 1, 1)
        centred = (od - mean) * w
        cov = centred.transpose(1, 2) @ centred / (n.view(-1, 1, 1) - 1)
        _, vecs = torch.linalg.eigh(cov.double())
        vecs = vecs[:, :, 1:].to(od.dtype)  # the two largest
        vecs = vecs * torch.where(vecs.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)  # point into OD > 0
        proj = od @ vecs  # (B, N, 2)
        phi = torch.atan2(proj[..., 1], proj[..., 0])
        lo, hi = _kth(phi, self.alpha, fg), _kth(phi, 100.0 - self.alpha, fg)
        v_lo = (vecs @ torch.stack([torch.cos(lo), torch.sin(lo)], -1).unsqueeze(-1)).squeeze(-1)
        v_hi = (vecs @ torch.stack([torch.cos(hi), torch.sin(hi)], -1).unsqueeze(-1)).squeeze(-1)
        first = (v_lo[:, :1] > v_hi[:, :1]).unsqueeze(-1)  # haematoxylin: the larger red OD
        return torch.where(first, torch.stack([v_lo, v_hi], -1), torch.stack([v_hi, v_lo], -1))

    @staticmethod
    def _concentrations(od: torch.Tensor, he: torch.Tensor) -> torch.Tensor:
        """Least-squares concentrations (B, 2, N) of ``od`` (B, N, 3) in the stains ``he`` (B, 3, 2)."""
        return torch.linalg.pinv(he) @ od.transpose(1, 2)

    def fit(self, target: torch.Tensor) -> Macenko:
        """Fit to a target image (3, H, W) or several target tiles (B, 3, H, W), pooled as one image."""
        x, _ = _as_float255(target)
        pooled = x.permute(1, 0, 2, 3).reshape(1, 3, x.shape[0] * x.shape[2], x.shape[3])
        he, max_conc = self._estimate(pooled)
        self.stain_matrix.copy_(he[0])
        self.max_conc.copy_(max_conc[0])
        self.fitted.fill_(True)
        return self

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch normalised; an image with fewer than 3 stained pixels (background, a blank
        tile: no stain matrix to estimate) is returned unchanged, so one such tile never fails a
        batch in a loader."""
        self._check_fitted()
        x, was_float = _as_float255(batch)
        stained = (self.optical_density(x) >= self.beta).all(dim=-1).sum(dim=1) >= 3
        if bool(stained.all()):
            return _back(self._normalise(x), was_float)
        out = x.clone()
        if bool(stained.any()):
            out[stained] = self._normalise(x[stained])
        return _back(out, was_float)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        od = self.optical_density(x)
        he = self._stain_vectors(od)
        conc = self._concentrations(od, he)
        conc = conc * (self.max_conc.view(1, 2, 1) / _kth(conc, 99.0).unsqueeze(-1))
        rebuilt = self.io * torch.exp(-(self.stain_matrix @ conc)) - 1.0  # (B, 3, N)
        return rebuilt.view(b, 3, h, w)


def rgb_to_lab(x255: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB 0..255 -> CIELAB (L 0..100, a, b), D65."""
    rgb = x255 / 255.0
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = _RGB2XYZ.to(x255)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin) / _WHITE.to(x255).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`: CIELAB -> sRGB 0..255 (not clipped)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([lab[:, 1] / 500 + fy, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _WHITE.to(lab).view(1, 3, 1, 1)
    lin = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB2XYZ).to(lab), xyz)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055, lin * 12.92)
    return rgb * 255.0


class Reinhard(StainNormalizer):
    """Batched Reinhard colour transfer in CIELAB (see the module docstring)."""

    method = "reinhard"

    def __init__(self):
        super().__init__()
        self.register_buffer("target_mean", torch.zeros(3))
        self.register_buffer("target_std", torch.ones(3))
        self.register_buffer("fitted", torch.tensor(False))

    @staticmethod
    def lab_stats(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image LAB channel means and (unbiased) standard deviations, (B, 3) each."""
        x, _ = _as_float255(batch)
        lab = rgb_to_lab(x).flatten(2)
        return lab.mean(-1), lab.std(-1)

    def fit(self, target: torch.Tensor) -> Reinhard:
        """Fit to a target image (3, H, W) or several target tiles (B, 3, H, W), pooled."""
        x, _ = _as_float255(target)
        lab = rgb_to_lab(x).transpose(0, 1).flatten(1)
        self.target_mean.copy_(lab.mean(-1))
        self.target_std.copy_(lab.std(-1))
        self.fitted.fill_(True)
        return self

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        x, was_float = _as_float255(batch)
        lab = rgb_to_lab(x)
        mean = lab.mean(dim=(2, 3), keepdim=True)
        std = lab.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        out = (lab - mean) / std * self.target_std.view(1, 3, 1, 1) + self.target_mean.view(1, 3, 1, 1)
        return _back(lab_to_rgb(out), was_float)


METHODS: dict[str, type[StainNormalizer]] = {"macenko": Macenko, "reinhard": Reinhard}


def stain_normalizer(method: str, target: Any, **options: Any) -> StainNormalizer:
    """A fitted normaliser: ``method`` ``"macenko"`` or ``"reinhard"``; ``target`` an RGB image as a
    (H, W, 3) uint8 array (what ``Slide.read_region`` returns) or a (3, H, W)/(B, 3, H, W) tensor."""
    try:
        cls = METHODS[method.lower()]
    except KeyError:
        raise ValueError(f"unknown stain normalisation {method!r}; choose one of {sorted(METHODS)}") from None
    t = target if isinstance(target, torch.Tensor) else torch.as_tensor(target).permute(2, 0, 1)
    return cls(**options).fit(t)
