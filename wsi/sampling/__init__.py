"""Tile sampling: which level-0 boxes to read, at which µm/px, in which order (pure numpy).

- over tissue (:mod:`wsi.sampling.tiles`): :func:`grid_coords`, :func:`grid_records`,
  :func:`iter_grid` (a grid cut into shards), :class:`RandomSampler` (endless, uniform over
  tissue, multi-magnification);
- inside annotated areas (:mod:`wsi.sampling.labels`, segmentation): :class:`LabelSampler`
  (class-balanced random stream), :func:`label_grid` / :func:`iter_label_grid` (validation grid);
- given tile lists (:mod:`wsi.sampling.lists`, labelled tile tables): :func:`iter_tile_list`,
  :func:`tile_list_order` (in order, or one permutation per epoch);
- shared: :class:`TileRecord`, :class:`SlideGeometry`, :class:`LabelMap`, :func:`shard_index`,
  :func:`footprint0`, :func:`usable_mpps`;
- tile-aligned placement (:mod:`wsi.sampling.aligned`): :class:`LevelGrid` / :func:`level_grids`
  (a slide's levels and encoded-tile sizes, carried by :class:`SlideGeometry`); ``RandomSampler(
  aligned=True)`` and the grids' ``levels=`` put boxes on the encoded-tile grid.

Shards are ``rank * num_workers + worker`` of ``world_size * num_workers``; the ``k``-th record
of a shard is a deterministic function of ``(seed, epoch, shard, k)``, which makes resume exact.
"""

from .aligned import LevelGrid, level_grids
from .labels import LabelSampler, coarse_downsample, iter_label_grid, label_grid
from .lists import iter_tile_list, tile_list_order
from .tiles import (
    DEFAULT_MPPS,
    IGNORE_LABEL,
    LabelMap,
    RandomSampler,
    SlideGeometry,
    TileRecord,
    footprint0,
    grid_coords,
    grid_records,
    iter_grid,
    shard_index,
    usable_mpps,
)

__all__ = [
    "DEFAULT_MPPS",
    "IGNORE_LABEL",
    "LabelMap",
    "LabelSampler",
    "LevelGrid",
    "RandomSampler",
    "SlideGeometry",
    "TileRecord",
    "coarse_downsample",
    "footprint0",
    "grid_coords",
    "grid_records",
    "iter_grid",
    "iter_label_grid",
    "iter_tile_list",
    "label_grid",
    "level_grids",
    "shard_index",
    "tile_list_order",
    "usable_mpps",
]
