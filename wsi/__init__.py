"""slidestream's slide layer: open any slide (local or remote), read regions at levels or µm/px,
convert to OME-Zarr, tissue masks, tile sampling and the online tile loader.

``wsi`` never imports ``pipelines``; ``torch`` is imported only by :mod:`wsi.loader`.
"""

from .byteio import RetryPolicy
from .errors import (
    CorruptSlideError,
    DecodeLimitError,
    MissingMppError,
    RegionOutOfBoundsError,
    RemoteIOError,
    SlideError,
    UnreadableTileError,
    UnsupportedSlideError,
)
from .masks import TissueMask
from .slide import Slide, open_slide
from .tissue import tissue_mask

__all__ = [
    "CorruptSlideError",
    "DecodeLimitError",
    "MissingMppError",
    "RegionOutOfBoundsError",
    "RemoteIOError",
    "RetryPolicy",
    "Slide",
    "TissueMask",
    "SlideError",
    "UnreadableTileError",
    "UnsupportedSlideError",
    "open_slide",
    "tissue_mask",
]
