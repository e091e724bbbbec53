"""A read-only zarr-python store over the I/O core (:class:`wsi.byteio.ByteSource`).

The Zarr backend reads layouts its fast path does not handle through zarr-python. With this store,
those reads take the same path to the bytes as every other read: retries and timeouts for remote
objects, verified range lengths, whole objects bounded in size, errors wrapped as ``SlideError``s
naming the store. Writing, deleting and listing are not supported.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype

from ..byteio import ByteSource


class SourceStore(Store):
    """Read-only store over ``src``; a whole object larger than ``limit`` bytes is refused."""

    def __init__(self, src: ByteSource, limit: int):
        super().__init__(read_only=True)
        self._src, self._limit = src, limit

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SourceStore) and other._src is self._src

    __hash__ = object.__hash__

    @property
    def supports_writes(self) -> bool:
        return False

    @property
    def supports_deletes(self) -> bool:
        return False

    @property
    def supports_listing(self) -> bool:
        return False

    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        if byte_range is None:
            return self._src.read_all(key, self._limit)
        if isinstance(byte_range, RangeByteRequest):
            req = (key, byte_range.start, byte_range.end)
        elif isinstance(byte_range, OffsetByteRequest):
            req = (key, byte_range.offset, None)
        elif isinstance(byte_range, SuffixByteRequest):
            req = (key, -byte_range.suffix, None)
        else:  # pragma: no cover - zarr's ByteRequest is one of the three
            raise TypeError(f"unknown byte request {byte_range!r}")
        return self._src.ranges([req])[0]

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        data = await asyncio.to_thread(self._read, key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._src.exists, key)

    async def set(self, key: str, value: Buffer) -> None:
        raise NotImplementedError("SourceStore is read-only")

    async def delete(self, key: str) -> None:
        raise NotImplementedError("SourceStore is read-only")

    async def list(self) -> AsyncIterator[str]:
        raise NotImplementedError("SourceStore does not list")
        yield ""  # pragma: no cover - makes this an async generator

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        raise NotImplementedError("SourceStore does not list")
        yield ""  # pragma: no cover

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        raise NotImplementedError("SourceStore does not list")
        yield ""  # pragma: no cover
