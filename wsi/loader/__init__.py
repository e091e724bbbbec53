"""The online tile loader: tiles read straight from slides, as a torch ``IterableDataset``.

Public API (everything a job or a notebook uses; the modules below are the implementation):

- :class:`TileDataset`, :func:`make_loader` / :class:`TileLoader`, :func:`collate_tiles`
  (:mod:`wsi.loader.dataset`): random or grid tiles over tissue at several µm/px, sharded over
  DDP ranks and DataLoader workers, with exact mid-epoch resume;
- :class:`SlideSpec`, :func:`resolve_slides`, :func:`dedupe_slide_ids`, :func:`check_unique_ids` (:mod:`wsi.loader.sources`):
  where slides come from (directories, globs, URL prefixes, CSV manifests);
- :class:`SlidePool`, :class:`TileReader`, :class:`ErrorCounts`, :func:`load_spec_mask`
  (:mod:`wsi.loader.reader`, no torch): the per-process read engine — lazily opened slides,
  batched reads decoded in threads, bounded prefetch, error counts and quarantine;
- :func:`mosaic`, :func:`save_mosaic_per_mpp` (:mod:`wsi.loader.mosaic`): pictures of tiles;
- :func:`parse_stain_norm`, :func:`stain_normalizer_from_spec`, :data:`DEMO_REFERENCE`
  (:mod:`wsi.loader.stain`): ``stain_norm="macenko:TARGET"`` for the loader and embedding.
- :class:`RawTile`, :func:`decode_raw_tiles` (:mod:`wsi.loader.gpu`): encoded tiles read in the
  workers and decoded in batches on the GPU (``decode="gpu"``).
"""

from .dataset import TileDataset
from .gpu import RawTile, decode_raw_tiles
from .loader import TileLoader, collate_tiles, make_loader
from .mosaic import mosaic, save_mosaic_per_mpp
from .reader import ErrorCounts, SlidePool, TileReader, load_spec_mask
from .sources import SLIDE_SUFFIXES, SlideSpec, check_unique_ids, dedupe_slide_ids, resolve_slides
from .stain import DEMO_REFERENCE, parse_stain_norm, stain_normalizer_from_spec

__all__ = [
    "DEMO_REFERENCE",
    "SLIDE_SUFFIXES",
    "ErrorCounts",
    "RawTile",
    "SlidePool",
    "SlideSpec",
    "TileDataset",
    "TileLoader",
    "TileReader",
    "check_unique_ids",
    "dedupe_slide_ids",
    "collate_tiles",
    "decode_raw_tiles",
    "load_spec_mask",
    "make_loader",
    "mosaic",
    "parse_stain_norm",
    "resolve_slides",
    "save_mosaic_per_mpp",
    "stain_normalizer_from_spec",
]
