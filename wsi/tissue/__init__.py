"""Tissue foreground masks: computed on thumbnails (Otsu or the shipped U-Net) or read from a user
mask image / QuPath GeoJSON, kept as a :class:`TissueMask` (boolean mask at a known downsample of
level 0) that samplers ask for tissue fractions.

Public API: :func:`tissue_mask`, :class:`TissueMask`, :func:`otsu_mask`, :func:`unet_mask`,
:func:`unet_probability`, :func:`load_user_mask`, :func:`resolve_method`, :func:`clean_mask`,
:func:`default_weights_path`, :data:`METHODS`, :data:`DEFAULT_METHOD` (the default of every job) (:mod:`wsi.tissue.detect`, :mod:`wsi.tissue.masks`).
:mod:`wsi.tissue.synth` builds training composites with exact labels for the U-Net (imported on
its own: ``from wsi.tissue import synth``).
"""

from .detect import (
    DEFAULT_METHOD,
    METHODS,
    clean_mask,
    default_weights_path,
    load_user_mask,
    otsu_mask,
    resolve_method,
    tissue_mask,
    unet_mask,
    unet_probability,
)
from .masks import TissueMask

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "TissueMask",
    "clean_mask",
    "default_weights_path",
    "load_user_mask",
    "otsu_mask",
    "resolve_method",
    "tissue_mask",
    "unet_mask",
    "unet_probability",
]
