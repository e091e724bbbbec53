"""Shared-memory image buffers that DataLoader workers fill and reuse (used by
:class:`wsi.loader.TileLoader` with persistent workers).

Why. A torch DataLoader worker sends each batch through a *new* shared-memory segment: the batch
is stacked, then copied into fresh shared memory whose pages are allocated, zeroed and faulted in
on every batch, and the receiving process maps it again. For a 64 × 3 × 224 × 224 uint8 batch that
costs about 8 ms of worker CPU (measured here: ~0.1 ms per tile, as much as decoding a tenth of a
JPEG tile) and scales with the pixels, not with the work.

How. The loader's process allocates ``slots`` image buffers per worker once, before the workers
start (they inherit them). A worker stacks a batch's images straight into one of its free slots and
sends only ``(worker, slot, n)``; the loader's process copies the images out into ordinary memory
(one memcpy of warm pages) and hands the slot back through a pipe. Nothing is shared with the
batches the user holds, so a batch can be kept, modified or sent elsewhere without affecting the
stream. When no slot is free (the consumer is slow to take batches) a worker falls back to the
ordinary path for that batch, so the buffers never block the stream.

Epochs. A worker starts each iteration with every slot free (the loader's process has copied out
every batch it received before it yields it, and batches a new iteration discards were never
copied), and slots handed back late from the previous iteration are drained first.
"""

from __future__ import annotations

from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch

__all__ = ["BatchBuffers"]


class BatchBuffers:
    """``slots`` shared uint8 buffers of ``shape`` (B, C, H, W) for each of ``num_workers`` workers."""

    def __init__(self, ctx: Any, num_workers: int, slots: int, shape: tuple[int, ...]):
        if num_workers < 1 or not 1 <= slots <= 255:
            raise ValueError(f"need at least one worker and 1..255 slots, got {num_workers} and {slots}")
        self.shape = tuple(int(s) for s in shape)
        self.slots = int(slots)
        self.bufs = [
            torch.empty((self.slots, *self.shape), dtype=torch.uint8).share_memory_()
            for _ in range(num_workers)
        ]
        pipes = [ctx.Pipe(duplex=False) for _ in range(num_workers)]
        self._recv = [r for r, _ in pipes]  # read by worker w: slots handed back
        self._send = [s for _, s in pipes]  # written by the loader's process
        self._free: list[int] | None = None  # this worker's free slots (worker side only)

    def __getstate__(self) -> dict:
        if get_spawning_popen() is None:
            raise TypeError(
                "BatchBuffers travel only to the DataLoader workers a TileLoader starts; they cannot be "
                "pickled otherwise"
            )
        state = self.__dict__.copy()
        state["_free"] = None
        return state

    # --- worker side ------------------------------------------------------------------------
    def reset(self, worker: int) -> None:
        """Every slot of ``worker`` free (the start of an iteration); slots handed back late are
        drained first so they are not counted twice."""
        conn = self._recv[worker]
        while conn.poll():
            conn.recv_bytes()
        self._free = list(range(self.slots))

    def fits(self, images: list[np.ndarray]) -> bool:
        """Whether these images (C, H, W uint8 each) fit a slot."""
        return 0 < len(images) <= self.shape[0] and all(
            a.dtype == np.uint8 and a.shape == self.shape[1:] for a in images
        )

    def put(self, worker: int, images: list[np.ndarray]) -> tuple[int, int, int] | None:
        """Stack ``images`` into a free slot of ``worker``; ``(worker, slot, n)`` for the loader's
        process, or None (nothing written) when no slot is free or they do not fit."""
        if not self.fits(images):
            return None
        if self._free is None:
            self.reset(worker)
        conn = self._recv[worker]
        while conn.poll():
            self._free.append(conn.recv_bytes()[0])
        if not self._free:
            return None
        slot = self._free.pop()
        n = len(images)
        np.stack(images, out=self.bufs[worker][slot, :n].numpy())
        return worker, slot, n

    # --- the loader's process -----------------------------------------------------------------
    def take(self, ref: Any, *, pin_memory: bool = False) -> torch.Tensor:
        """The images of ``ref = (worker, slot, n)`` copied into a new tensor (pinned when asked),
        and the slot handed back to its worker."""
        worker, slot, n = (int(v) for v in ref)
        out = torch.empty((n, *self.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
        # numpy's copy runs on this thread; torch's copy_ may wake intra-op threads
        np.copyto(out.numpy(), self.bufs[worker][slot, :n].numpy())
        self._send[worker].send_bytes(bytes([slot]))
        return out
