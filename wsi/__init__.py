"""slidestream's slide layer: open any slide (local or remote), read regions at levels or µm/px,
convert to OME-Zarr, tissue masks, tile sampling and the online tile loader.

``wsi`` never imports ``pipelines``. Importing ``wsi`` does not import ``torch``: :mod:`wsi.loader`
needs it, and :mod:`wsi.tissue` imports it (through ``models.seg.tissue_net``) when the U-Net
computes a mask — the default method, so a default :func:`tissue_mask` call imports torch while an
Otsu or user mask does not.
"""

from .byteio import RetryPolicy
from .errors import (
    AnnotationError,
    CorruptSlideError,
    DecodeLimitError,
    MissingMppError,
    RegionOutOfBoundsError,
    RemoteIOError,
    SlideError,
    UnreadableTileError,
    UnsupportedSlideError,
    WsiError,
)
from .slide import Slide, open_slide
from .tissue import TissueMask, tissue_mask

__all__ = [
    "AnnotationError",
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
    "WsiError",
    "open_slide",
    "tissue_mask",
]
