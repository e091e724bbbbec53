"""Given tile lists: the order in which a fixed list of tiles (a CSV of ``slide, x, y``, a
labelled tile table) is read, cut into shards like every other sampler.

:func:`iter_tile_list` yields positions into a list of ``n`` tiles for one shard (one DDP rank
and DataLoader worker, :func:`~wsi.sampling.tiles.shard_index`):

- ``shuffle=False`` (evaluation): the list in its order, tile ``g`` owned by shard
  ``g % num_shards`` — every tile exactly once across shards;
- ``shuffle=True`` (training epochs): a permutation of the list drawn from
  ``np.random.default_rng((seed, epoch))``, the same on every shard, cut into shards the same way;
  its last ``n % num_shards`` positions are dropped so that every shard holds the same number of
  tiles (ranks of a DDP run take the same number of steps per epoch; the dropped tiles change
  from epoch to epoch), as ``torch.utils.data.DistributedSampler(drop_last=True)`` does.

The ``k``-th position of a shard is a function of ``(seed, epoch, shard, k)``; ``start`` skips
the first ``start`` (exact resume).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def tile_list_order(
    n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, num_shards: int = 1
) -> np.ndarray:
    """Positions (into a list of ``n`` tiles) in reading order over all shards (see the module
    docstring): ``arange(n)``, or this epoch's permutation cut to a multiple of ``num_shards``."""
    if n < 0 or num_shards < 1:
        raise ValueError(f"need n >= 0 and num_shards >= 1, got {n} and {num_shards}")
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    order = np.random.default_rng((int(seed), int(epoch))).permutation(n).astype(np.int64)
    return order[: n - n % num_shards]


def iter_tile_list(
    n: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    shard: int = 0,
    num_shards: int = 1,
    start: int = 0,
) -> Iterator[tuple[int, int]]:
    """``(k, position)`` for shard ``shard``: its ``k``-th tile is ``position`` in the list."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} not in 0..{num_shards - 1}")
    mine = tile_list_order(n, shuffle=shuffle, seed=seed, epoch=epoch, num_shards=num_shards)[
        shard::num_shards
    ]
    for k in range(max(0, int(start)), len(mine)):
        yield k, int(mine[k])
