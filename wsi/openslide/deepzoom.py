"""openslide-python's own Deep Zoom generator, re-exported: it works on :class:`wsi.openslide.OpenSlide`
objects unchanged (``from wsi.openslide.deepzoom import DeepZoomGenerator``)."""

from openslide.deepzoom import DeepZoomGenerator

__all__ = ["DeepZoomGenerator"]
