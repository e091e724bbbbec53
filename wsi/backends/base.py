"""The contract every backend implements.

A backend knows a pyramid: level sizes, properties, mpp, and how to read a rectangle of one level
that lies *inside* that level. Bounds, clipping, white padding, level-0 → level coordinate mapping
and µm/px logic live once in :class:`wsi.slide.Slide`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

DEFAULT_DECODE_LIMIT = 1 << 30  # bytes: a single declared tile/chunk above this raises


class Backend(ABC):
    #: short name shown by ``slidestream info`` ("tiff", "openslide", "zarr")
    name: str = "?"

    def __init__(self, url: str):
        self.url = url

    # --- metadata (set by subclasses in __init__) -------------------------------------------
    level_dimensions: list[tuple[int, int]]  # (width, height) per level, level 0 first
    level_downsamples: list[float]
    properties: Mapping[str, str]
    vendor: str | None = None
    mpp: float | None = None  # µm/px at level 0 from metadata, None when absent
    #: native tile size (width, height) per level, used by readers that want aligned reads
    level_tile_sizes: list[tuple[int, int]] | None = None

    @property
    def associated_image_names(self) -> list[str]:
        return []

    def read_associated(self, name: str) -> np.ndarray:  # pragma: no cover - overridden
        raise KeyError(name)

    # --- pixels --------------------------------------------------------------------------------
    @abstractmethod
    def _read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Return an (h, w, 3) uint8 RGB array of level ``level`` at level pixel (x, y).

        The rectangle is guaranteed to lie inside the level. Areas with no data (sparse tiles,
        transparency) are white. A tile that cannot be read raises ``UnreadableTileError``.
        """

    def _read_regions(
        self, level: int, boxes: list[tuple[int, int, int, int]], threads: int
    ) -> list[np.ndarray]:
        """Many in-bounds rectangles at once; backends override to batch I/O and decode."""
        return [self._read_region(level, *b) for b in boxes]

    def close(self) -> None:  # noqa: B027 - optional hook: backends without handles need nothing
        """Release file handles and thread pools (called once by ``Slide.close``)."""
