"""An endless, resumable stream of batches over a loader's epochs (the training side of
:class:`wsi.loader.TileLoader` or any loader with the same protocol)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch


class BatchLoader(Protocol):
    """What a training loop needs from a loader (``wsi.loader.TileLoader`` is one)."""

    def __iter__(self) -> Iterator[dict]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, sd: dict) -> None: ...


class EpochPosition:
    """The resumable state of a loader that counts batches within epochs (an in-memory or
    map-style loader): ``epoch`` and ``position`` (batches yielded so far in it). A different
    epoch starts at position 0, the same epoch keeps it; ``state_dict`` / ``load_state_dict``
    carry both (the :class:`BatchLoader` protocol). Subclasses advance ``position`` as they yield
    and reset it to 0 at the end of an epoch."""

    epoch: int = 0
    position: int = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.position = 0
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])


class Stream:
    """Endless iteration over a loader's epochs, with a state that resumes mid-epoch (the
    sampler position: epoch plus the loader's per-shard position).

    Batches are drawn inside ``torch.random.fork_rng``: a DataLoader draws its workers' base seed
    from the global torch RNG when an iteration starts, which would otherwise shift the training
    RNG (drop-path, dropout) of a resumed run against an uninterrupted one."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.epoch = 0
        self._it: Iterator[dict] | None = None

    def next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                with torch.random.fork_rng(devices=[]):
                    return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
        raise RuntimeError("the tile loader yields no batches: check the slide list and the tissue settings")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.close()
        self.epoch = int(sd["epoch"])
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(sd["loader"])

    def close(self) -> None:
        """Stop the loader's workers (an endless epoch never ends on its own)."""
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if callable(close):
            close()
