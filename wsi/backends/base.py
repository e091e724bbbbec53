"""The contract every backend implements.

A backend knows a pyramid: level sizes, properties, mpp, and how to read a rectangle of one level
that lies *inside* that level. Bounds, clipping, white padding, level-0 → level coordinate mapping
and µm/px logic live once in :class:`wsi.slide.Slide`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from ..decode import DecodeStats, TileCache

DEFAULT_DECODE_LIMIT = 1 << 30  # bytes: a single declared tile/chunk above this raises


class Backend(ABC):
    #: short name shown by ``slidestream info`` ("tiff", "openslide", "zarr")
    name: str = "?"

    #: whether this backend counts its decodes in :attr:`stats` (the TIFF backend does)
    counts_decodes: bool = False

    def __init__(self, url: str):
        self.url = url
        #: decoded tiles/pixels and cache hits of this backend (``Slide.decode_stats``; a loader
        #: replaces it with one shared by all the slides it opens)
        self.stats = DecodeStats()
        #: decoded-tile cache used by backends that decode tiles themselves (None: no cache)
        self.tile_cache: TileCache | None = None

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

    @property
    def associated_image_sizes(self) -> dict[str, tuple[int, int]]:
        """(width, height) of each associated image from metadata, without decoding it."""
        return {}

    def read_associated(self, name: str) -> np.ndarray:  # pragma: no cover - overridden
        """The image, bounded: one declaring more than the decode limit raises DecodeLimitError."""
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

    def _read_regions_scaled(
        self, level: int, boxes: list[tuple[int, int, int, int]], factor: int, threads: int
    ) -> list[np.ndarray] | None:
        """Boxes (all multiples of ``factor``) read at ``1/factor`` of their size by decoding at
        that scale (JPEG DCT-domain scaling); None when this backend or level cannot, and the caller
        reads them exactly and resizes."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook: backends without handles need nothing
        """Release file handles and thread pools (called once by ``Slide.close``)."""


@runtime_checkable
class RawTiles(Protocol):
    """Optional capability: a backend that hands out a level's encoded tiles as stored.

    ``convert`` asks ``isinstance(backend, RawTiles)`` (through :attr:`wsi.slide.Slide.raw_tiles`)
    and copies JPEG tiles without decoding them when the tile grid matches; backends without it
    are read pixel by pixel. The TIFF backend implements it."""

    def tile_grid(self, level: int) -> tuple[int, int, int, int]:
        """(tile_w, tile_h, n_tiles_x, n_tiles_y) of a level."""
        ...

    def compression(self, level: int) -> str:
        """The codec of a level's tiles ("jpeg", "jpeg2000", "deflate", ...)."""
        ...

    def raw_tile(self, level: int, tx: int, ty: int) -> bytes:
        """The tile's bytes exactly as stored (b"" for a sparse tile)."""
        ...

    def raw_jpeg_tile(self, level: int, tx: int, ty: int) -> bytes:
        """A standalone JPEG stream of one tile of a JPEG level (tables merged in)."""
        ...
