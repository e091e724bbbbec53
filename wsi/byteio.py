"""The I/O core of the byte-range backends (TIFF and Zarr): where a slide's bytes live, byte ranges
of its objects with verified lengths, retries and timeouts for remote reads, the decode thread pool,
and what survives a fork.

A :class:`ByteSource` is rooted at a local path or an fsspec URL (a TIFF file, or a Zarr store whose
objects are addressed by key). Three transports, one contract:

- **local** (a path without ``://``, or ``file://``): ``os.pread`` on cached file descriptors
  (thread-safe, no Python file object). A local path is a path: ``#``, ``?``, ``::`` and non-ASCII
  letters are file-name characters, never URL syntax.
- **HTTP(S)** (:mod:`wsi.byteio_http`): ranged GETs on the aiohttp session of fsspec's ``HTTPFileSystem`` (so
  ``storage_options`` such as ``headers`` or ``client_kwargs`` keep their fsspec meaning), issued
  concurrently on fsspec's event loop. Every answer is verified: status, ``Content-Range`` against
  the range asked for, body length against both. Transient failures — 429, 5xx, connection resets,
  bodies cut short, mismatched ranges, a server silent for longer than the read timeout — are
  retried with exponential back-off and full jitter, honouring ``Retry-After``, bounded in attempts
  and in total time (:class:`RetryPolicy`).
- **any other fsspec filesystem** (``s3://``, ``memory://``, ...): ``fs.cat_ranges``; exceptions
  other than "not found"/"permission denied" are retried under the same policy.

What cannot be read after the retries raises :class:`~wsi.errors.RemoteIOError` naming the URL; no
fsspec or aiohttp exception leaves this module. A range that runs past the end of its object comes
back short (the caller reports the truncation); a missing object is ``None``.

Fork safety: fsspec's async filesystems, aiohttp sessions and thread pools do not survive
``fork()``. Every entry point checks the process id and, in a child, drops what the parent owned
(file descriptors are reopened, the filesystem and the pool are made anew).
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .byteio_http import HttpRanges, remote_error, too_big
from .errors import RemoteIOError, SlideError
from .limits import MAX_METADATA_BYTES

MAX_OPEN_FILES = 128  # file descriptors kept open per source (LRU)
MAX_RANGE_BYTES = 1 << 30  # one ranged read never asks for more (a tile or chunk is far smaller)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How remote reads survive the network. Times are seconds.

    A request is tried at most ``attempts`` times; before retry *k* (1, 2, ...) it waits a random
    time in ``[0, min(max_backoff, backoff * 2**(k-1))]`` ("full jitter"), or the server's
    ``Retry-After`` when that is longer (up to ``max_retry_after``). No request, waits included,
    lasts longer than ``total``. ``connect_timeout`` bounds opening a connection and
    ``read_timeout`` the silence between bytes, so a stalled server is abandoned and retried."""

    attempts: int = 6
    backoff: float = 0.25
    max_backoff: float = 8.0
    total: float = 120.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_retry_after: float = 60.0
    concurrency: int = 32  # ranged GETs in flight per source

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.total <= 0 or self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError(f"RetryPolicy needs attempts >= 1 and positive times, got {self}")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        wait = rng.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


DEFAULT_RETRY = RetryPolicy()


def local_path(url: str | os.PathLike) -> str | None:
    """The file-system path of a local ``url`` (a plain path or ``file://``), else None. A plain
    path is taken literally: no query, fragment or ``::`` chaining is parsed out of it."""
    s = os.fspath(url)
    if s.startswith("file://"):
        return s[len("file://") :]
    if "://" in s:
        return None
    return s


class DecodePool:
    """A thread pool for decoding, created on first use, grown on demand, and made anew in a
    forked child (a pool inherited through ``fork()`` has no threads)."""

    def __init__(self, name: str):
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def get(self, workers: int) -> ThreadPoolExecutor:
        if self._pid != os.getpid():  # forked: the parent's pool and lock are not ours
            self._pool, self._pid, self._lock = None, os.getpid(), threading.Lock()
        with self._lock:
            if self._pool is None or self._pool._max_workers < workers:
                old, self._pool = (
                    self._pool,
                    ThreadPoolExecutor(max(workers, 2), thread_name_prefix=self._name),
                )
                if old is not None:
                    old.shutdown(wait=False)
            return self._pool

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.shutdown(wait=True)
            self._pool = None


class ByteSource:
    """Byte ranges of the objects under one root (see the module docstring). ``key`` "" is the root
    itself (a TIFF file); other keys are paths below it (Zarr objects)."""

    def __init__(
        self, url: str | os.PathLike, storage_options: dict | None = None, *, retry: RetryPolicy | None = None
    ):
        self.url = os.fspath(url)
        self.retry = retry or DEFAULT_RETRY
        self._so = dict(storage_options or {})
        self._rng = random.Random()
        path = local_path(self.url)
        self.local = path is not None
        self.http = False
        self._fs: Any = None
        if self.local:
            self.root = path.rstrip("/") or "/"
        else:
            self._connect()
        self._fds: OrderedDict[str, list] = OrderedDict()  # key -> [fd, users, evicted, pinned]
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    def _connect(self) -> None:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self._so)
        except (ValueError, ImportError, TypeError) as e:
            raise SlideError(f"{self.url}: cannot open this URL ({e})", self.url) from e
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._fs, self.root = fs, root.rstrip("/")
        self.http = protocol in ("http", "https")
        self._http_ranges = HttpRanges(self.url, fs, self.retry, self._rng) if self.http else None

    # --- paths and fork safety ----------------------------------------------------------------
    def path(self, key: str = "") -> str:
        return f"{self.root}/{key}" if key else self.root

    def _check_fork(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid, self._lock = os.getpid(), threading.Lock()
        for ent in self._fds.values():  # the child's copies of the parent's descriptors
            os.close(ent[0])
        self._fds = OrderedDict()
        if not self.local:
            self._connect()  # fsspec's instance cache is per process: a fresh filesystem

    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"{self.url}: slide is closed", self.url)

    # --- local descriptors ----------------------------------------------------------------------
    def _acquire(self, key: str) -> list | None:
        """An open fd entry [fd, users, evicted, pinned] for ``key`` (None when the object is missing).
        At most MAX_OPEN_FILES stay cached; an evicted fd is closed by its last user."""
        with self._lock:
            ent = self._fds.get(key)
            if ent is not None:
                ent[1] += 1
                self._fds.move_to_end(key)
                return ent
        try:
            fd = os.open(self.path(key), os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        with self._lock:
            ent = self._fds.get(key)
            if ent is not None:  # another thread opened it meanwhile
                os.close(fd)
                ent[1] += 1
                return ent
            ent = self._fds[key] = [fd, 1, False, False]
            while len(self._fds) > MAX_OPEN_FILES:
                _, old = self._fds.popitem(last=False)
                old[2] = True
                if old[1] == 0:
                    os.close(old[0])
        return ent

    def _release(self, ent: list) -> None:
        with self._lock:
            ent[1] -= 1
            if ent[1] == 0 and ent[2]:
                os.close(ent[0])

    def fd(self, key: str = "") -> int | None:
        """A descriptor kept open for the life of the source (local sources; None otherwise or when
        the object is missing): the TIFF backend's single-tile fast path ``pread``s it directly."""
        if not self.local:
            return None
        self._check_fork()
        ent = self._acquire(key)
        if ent is None:
            return None
        with self._lock:
            if ent[3]:
                ent[1] -= 1  # pinned already: one reference for the pin is enough
            ent[3] = True
        return ent[0]

    # --- metadata -------------------------------------------------------------------------------
    def size(self, key: str = "") -> int | None:
        """Size of an object in bytes; None when a server does not say. FileNotFoundError when
        missing."""
        self._check_fork()
        if self.local:
            return os.path.getsize(self.path(key))
        if self.http:
            return self._http_ranges.size(self.path(key))
        info = self._fs_call(lambda: self._fs.info(self.path(key)), key)
        if info.get("type") == "directory":
            raise IsADirectoryError(self.path(key))
        return info.get("size")

    def exists(self, key: str) -> bool:
        self._check_fork()
        if self.local:
            return os.path.exists(self.path(key))
        if self.http:
            return self.ranges([(key, 0, 1)])[0] is not None
        return bool(self._fs_call(lambda: self._fs.exists(self.path(key)), key))

    def isdir(self, key: str = "") -> bool:
        """True for a local directory or a remote prefix fsspec lists as one (never asked of HTTP,
        where it would download the object)."""
        self._check_fork()
        if self.local:
            return os.path.isdir(self.path(key))
        if self.http:
            return False
        try:
            return bool(self._fs_call(lambda: self._fs.isdir(self.path(key)), key))
        except FileNotFoundError:
            return False

    def read_all(self, key: str, limit: int = MAX_METADATA_BYTES) -> bytes | None:
        """The whole object (None when missing); one larger than ``limit`` bytes raises
        ``DecodeLimitError`` before it is read (when its size is known) or once ``limit`` is passed."""
        return self.objects([key], limit)[0]

    def objects(self, keys: Sequence[str], limit: int) -> list[bytes | None]:
        """Whole objects at once (None for a missing one), each at most ``limit`` bytes."""
        self._check_fork()
        self._check_open()
        if self.local:
            return [self._read_local(k, limit) for k in keys]
        if self.http:
            return self._http_ranges.gather([(self.path(k), None, None) for k in keys], limit)
        return [self._read_fs(k, limit) for k in keys]

    def _read_local(self, key: str, limit: int) -> bytes | None:
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                n = os.fstat(f.fileno()).st_size
                if n > limit:
                    raise too_big(self.url, p, n, limit)
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except SlideError:
            raise
        except OSError as e:
            raise SlideError(f"{self.url}: reading {p} failed ({e})", self.url) from e

    def _read_fs(self, key: str, limit: int) -> bytes | None:
        p = self.path(key)
        try:
            size = self._fs_call(lambda: self._fs.size(p), key)
            if size is not None and size > limit:
                raise too_big(self.url, p, size, limit)
            data = self._fs_call(lambda: self._fs.cat_file(p), key)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        if len(data) > limit:
            raise too_big(self.url, p, len(data), limit)
        return bytes(data)

    # --- byte ranges ------------------------------------------------------------------------------
    def ranges(self, reqs: Sequence[tuple[str, int, int | None]]) -> list[bytes | None]:
        """``[(key, start, end)]`` → bytes (None for a missing object), all requests at once.
        ``start < 0`` with ``end`` None is a suffix of ``-start`` bytes, ``start >= 0`` with ``end``
        None runs to the end of the object. The result has exactly ``end - start`` bytes unless the
        object ends first. No range may exceed :data:`MAX_RANGE_BYTES`."""
        self._check_fork()
        self._check_open()
        for _, s, e in reqs:
            n = (e if e is not None else 0) - s
            if n > MAX_RANGE_BYTES:
                raise SlideError(
                    f"{self.url}: a read of {n} bytes was asked for; the file is damaged", self.url
                )
        if not reqs:
            return []
        if self.local:
            return [self._pread(*r) for r in reqs]
        if self.http:
            return self._http_ranges.gather([(self.path(k), s, e) for k, s, e in reqs], MAX_RANGE_BYTES)
        return self._fs_ranges(reqs)

    def _pread(self, key: str, start: int, end: int | None) -> bytes | None:
        ent = self._acquire(key)
        if ent is None:
            return None
        try:
            if end is None:
                size = os.fstat(ent[0]).st_size
                start, end = (max(0, size + start), size) if start < 0 else (start, size)
                if end - start > MAX_RANGE_BYTES:
                    raise SlideError(f"{self.url}: {self.path(key)} is too large to read whole", self.url)
            return os.pread(ent[0], max(0, end - start), start)
        except OSError as e:
            raise SlideError(f"{self.url}: reading {self.path(key)} failed ({e})", self.url) from e
        finally:
            self._release(ent)

    def open(self, key: str = "", *, size: int | None = None, block: int = 1 << 16):
        """A read-only binary file object on one object (for parsers such as tifffile): the plain
        file locally, a block-caching :class:`RangeFile` over :meth:`ranges` remotely."""
        self._check_fork()
        if self.local:
            return open(self.path(key), "rb")  # noqa: SIM115 - the caller closes it
        return RangeFile(self, key, self.size(key) if size is None else size, block)

    # --- generic fsspec -----------------------------------------------------------------------------
    def _fs_call(self, fn, key: str):
        """Call ``fn`` (a blocking fsspec call) under the retry policy."""
        deadline = time.monotonic() + self.retry.total
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
                raise
            except Exception as e:  # noqa: BLE001 - any fsspec backend's error: classified, then retried or wrapped
                last = e
            wait = self.retry.delay(attempt, None, self._rng)
            if attempt == self.retry.attempts or time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
        raise remote_error(self.url, self.path(key), attempt, last)

    def _fs_ranges(self, reqs) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(reqs)
        todo = list(range(len(reqs)))
        deadline = time.monotonic() + self.retry.total
        for attempt in range(1, self.retry.attempts + 1):
            sub = [reqs[i] for i in todo]
            try:
                res = self._fs.cat_ranges(
                    [self.path(k) for k, _, _ in sub],
                    [s for _, s, _ in sub],
                    [e for _, _, e in sub],
                    on_error="return",
                )
            except Exception as e:  # noqa: BLE001 - the whole batch failed: retried, then wrapped
                res = [e] * len(sub)
            failed = []
            for i, r in zip(todo, res):
                if isinstance(r, FileNotFoundError):
                    out[i] = None
                elif isinstance(r, PermissionError):
                    raise RemoteIOError(f"{self.path(reqs[i][0])}: permission denied ({r})", self.url) from r
                elif isinstance(r, BaseException):
                    failed.append((i, r))
                else:
                    out[i] = bytes(r)
            if not failed:
                return out
            todo = [i for i, _ in failed]
            wait = self.retry.delay(attempt, None, self._rng)
            if attempt == self.retry.attempts or time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
        i, err = failed[0]
        raise remote_error(self.url, self.path(reqs[i][0]), attempt, err)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for ent in self._fds.values():
                ent[2] = True  # a read still in flight closes it when done
                if ent[3]:
                    ent[1] -= 1  # the pin of fd() ends with the source
                if ent[1] == 0 and self._pid == os.getpid():
                    os.close(ent[0])
            self._fds.clear()


class RangeFile(io.RawIOBase):
    """A seekable read-only file over one object of a :class:`ByteSource`, reading aligned blocks
    through :meth:`ByteSource.ranges` (retried, verified) and keeping the last few: a directory
    parser's small scattered reads cost one request per block. Reads of a block or more go
    straight through."""

    def __init__(self, src: ByteSource, key: str, size: int | None, block: int = 1 << 16, keep: int = 32):
        super().__init__()
        self._src, self._key, self._size, self._block, self._keep = src, key, size, block, keep
        self._pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self._pos + offset
        else:
            if self._size is None:
                raise OSError(f"{self._src.url}: the server does not report the file size")
            pos = self._size + offset
        if pos < 0:
            raise OSError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def _get(self, start: int, end: int) -> bytes:
        data = self._src.ranges([(self._key, start, end)])[0]
        if data is None:
            raise FileNotFoundError(f"slide not found: {self._src.path(self._key)}")
        return data

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else self._pos + n
        if end is None:
            raise OSError(f"{self._src.url}: the server does not report the file size")
        if self._size is not None:
            end = min(end, self._size)
        start = self._pos
        if end <= start:
            return b""
        if end - start >= self._block:
            data = self._get(start, end)
        else:
            b0, b1 = start // self._block, (end - 1) // self._block
            data = b"".join(self._block_bytes(b) for b in range(b0, b1 + 1))
            data = data[start - b0 * self._block : end - b0 * self._block]
        self._pos = start + len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def _block_bytes(self, b: int) -> bytes:
        data = self._blocks.get(b)
        if data is None:
            start = b * self._block
            end = start + self._block
            if self._size is not None:
                end = min(end, self._size)
            data = self._blocks[b] = self._get(start, end)
            while len(self._blocks) > self._keep:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(b)
        return data
