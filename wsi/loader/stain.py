"""Stain normalisation in the tile path: ``stain_norm="METHOD:TARGET"``.

``METHOD`` is ``macenko`` or ``reinhard`` (:mod:`models.stain`, batched torch transforms); ``TARGET``
an RGB image file (PNG, JPEG, TIFF: what PIL reads) or ``demo``, the built-in reference region of
the shipped demo slide (:data:`DEMO_REFERENCE`, level-0 pixels of :data:`wsi.data.DEMO_SLIDE`).
:func:`stain_normalizer_from_spec` fits the normaliser once; :class:`wsi.loader.TileDataset` applies
it to each decoded chunk of tiles (in the process that reads them), ``slidestream embed`` to each
batch on the encoder's device. A spec that cannot be honoured is a ``ValueError`` naming it and
the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: (x, y, width, height) at level 0 of the demo slide: H&E tissue (about 3/4 of the pixels)
DEMO_REFERENCE = (1000, 1400, 512, 512)
METHODS = ("macenko", "reinhard")


def parse_stain_norm(spec: str) -> tuple[str, str]:
    """``"macenko:demo"`` -> ("macenko", "demo"); a ``ValueError`` naming the spec and the fix."""
    method, sep, target = str(spec).partition(":")
    method = method.strip().lower()
    if not sep or method not in METHODS or not target.strip():
        raise ValueError(
            f"stain_norm={spec!r}: expected METHOD:TARGET with METHOD one of {', '.join(METHODS)} and TARGET "
            f"an RGB image file or 'demo' (e.g. stain_norm=macenko:demo)"
        )
    return method, target.strip()


def reference_pixels(target: str) -> np.ndarray:
    """The (H, W, 3) uint8 RGB pixels of a stain target: an image file, or ``demo``."""
    if target == "demo":
        from ..data import DEMO_SLIDE
        from ..slide import open_slide

        x, y, w, h = DEMO_REFERENCE
        with open_slide(DEMO_SLIDE) as slide:
            return np.array(np.asarray(slide.read_region((x, y), 0, (w, h)))[..., :3])
    path = Path(target)
    if not path.is_file():
        raise ValueError(
            f"stain_norm target {target}: no such image file; pass an RGB image (PNG, JPEG, TIFF) of "
            f"well-stained tissue, or 'demo' for the shipped reference region"
        )
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"stain_norm target {target}: not an image PIL can read ({e})") from None


def stain_normalizer_from_spec(spec: str) -> Any:
    """The fitted :class:`models.stain.StainNormalizer` of ``spec`` (on the CPU; ``.to(device)``
    moves it). A target without enough stained tissue to fit is a ``ValueError`` too."""
    from models.stain import stain_normalizer

    method, target = parse_stain_norm(spec)
    pixels = reference_pixels(target)
    try:
        return stain_normalizer(method, pixels)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"stain_norm={spec!r}: cannot fit {method} to {target} ({e})") from None
