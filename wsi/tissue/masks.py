"""``TissueMask``: a boolean foreground mask at a known downsample of level 0.

Produced by :func:`wsi.tissue.tissue_mask` (Otsu or U-Net), loaded from a user mask image or
QuPath GeoJSON, saved as PNG + JSON sidecar. Samplers ask it for the tissue fraction of a level-0
box with :meth:`TissueMask.fraction`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, atomic_write_text


@dataclass(eq=False)
class TissueMask:
    mask: np.ndarray  # (h, w) bool
    downsample: float  # level-0 pixels per mask pixel
    method: str = "unknown"
    slide_dimensions: tuple[int, int] | None = None  # level-0 (w, h)
    mpp: float | None = None  # µm/px of the mask (level-0 mpp × downsample) when known
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask).astype(bool, copy=False)
        if self.mask.ndim != 2:
            raise ValueError(f"a tissue mask is 2-D, got shape {self.mask.shape}")
        if not self.downsample > 0:
            raise ValueError(f"downsample must be positive, got {self.downsample}")
        self._build_sat()

    def _build_sat(self) -> None:
        # summed-area table: fraction() is O(1) per box
        self._sat = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def __getstate__(self) -> dict:
        # the table is 8x the mask's size: rebuild it after unpickling (masks go to loader workers)
        state = self.__dict__.copy()
        state.pop("_sat", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build_sat()

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tissue_area_level0(self) -> float:
        """Tissue area in level-0 pixels²."""
        return float(self.mask.sum()) * self.downsample**2

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Fraction of the level-0 box (x, y, w, h) covered by tissue (mask pixels it overlaps,
        parts outside the mask count as background)."""
        d = self.downsample
        mh, mw = self.mask.shape
        x0, y0 = math.floor(x / d), math.floor(y / d)
        x1, y1 = math.ceil((x + w) / d), math.ceil((y + h) / d)
        total = max(1, (x1 - x0) * (y1 - y0))
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, mw), min(y1, mh)
        if cx1 <= cx0 or cy1 <= cy0:
            return 0.0
        s = self._sat
        inside = s[cy1, cx1] - s[cy0, cx1] - s[cy1, cx0] + s[cy0, cx0]
        return float(inside) / total

    def fractions(self, xs: np.ndarray, ys: np.ndarray, w: float, h: float) -> np.ndarray:
        """Vectorised :meth:`fraction` for many boxes of one size."""
        d = self.downsample
        mh, mw = self.mask.shape
        x0 = np.floor(np.asarray(xs) / d).astype(np.int64)
        y0 = np.floor(np.asarray(ys) / d).astype(np.int64)
        x1 = np.ceil((np.asarray(xs) + w) / d).astype(np.int64)
        y1 = np.ceil((np.asarray(ys) + h) / d).astype(np.int64)
        total = np.maximum(1, (x1 - x0) * (y1 - y0))
        cx0, cy0 = np.clip(x0, 0, mw), np.clip(y0, 0, mh)
        cx1, cy1 = np.clip(x1, 0, mw), np.clip(y1, 0, mh)
        s = self._sat
        inside = s[cy1, cx1] - s[cy0, cx1] - s[cy1, cx0] + s[cy0, cx0]
        return inside / total

    # --- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (PNG, 0/255) and ``path.json`` (downsample, method, dims, mpp)."""
        from PIL import Image

        path = Path(path)
        with atomic_path(path) as tmp:
            Image.fromarray(self.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        meta = {
            "downsample": self.downsample,
            "method": self.method,
            "slide_dimensions": list(self.slide_dimensions) if self.slide_dimensions else None,
            "mpp": self.mpp,
            "shape": list(self.mask.shape),
            "meta": self.meta,
        }
        atomic_write_text(path.with_name(path.name + ".json"), json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TissueMask:
        from PIL import Image

        path = Path(path)
        side = path.with_name(path.name + ".json")
        if not side.exists():
            raise FileNotFoundError(f"{side} missing: a saved TissueMask is a PNG plus its .json sidecar")
        meta = json.loads(side.read_text())
        arr = np.asarray(Image.open(path).convert("L")) > 127
        dims = meta.get("slide_dimensions")
        return cls(
            arr,
            float(meta["downsample"]),
            method=meta.get("method", "unknown"),
            slide_dimensions=tuple(dims) if dims else None,
            mpp=meta.get("mpp"),
            meta=meta.get("meta") or {},
        )
