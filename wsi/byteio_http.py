"""The HTTP(S) transport of the I/O core (:mod:`wsi.byteio`): ranged GETs on the aiohttp session of
fsspec's ``HTTPFileSystem``, issued concurrently on fsspec's event loop, each answer verified and
each transient failure retried under a :class:`wsi.byteio.RetryPolicy`.

Verified: the status (404/410: missing; 416: the range starts past the end; 401/403 and other 4xx:
refused, not retried), ``Content-Range`` against the range asked for, the body against both
``Content-Range`` and ``Content-Length``, and the size against the caller's limit. Retried with
back-off and full jitter: 429 and 5xx (``Retry-After`` honoured), resets, bodies cut short,
mismatched ranges, silence longer than the read timeout. Whatever cannot be read becomes a
:class:`~wsi.errors.RemoteIOError` naming the URL.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
from typing import TYPE_CHECKING, Any

from .errors import DecodeLimitError, RemoteIOError, SlideError

if TYPE_CHECKING:
    from .byteio import RetryPolicy

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class _Transient(Exception):
    """Internal: a failed attempt worth retrying."""

    def __init__(self, why: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(why)
        self.retry_after, self.status = retry_after, status


class _Permanent(Exception):
    """Internal: a failed request that retrying cannot fix (HTTP 401/403/416, ...)."""

    def __init__(self, why: str, status: int | None = None):
        super().__init__(why)
        self.status = status


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _check_status(r) -> None:
    s = r.status
    if s == 429 or s >= 500:
        raise _Transient(f"HTTP {s} {r.reason or ''}".strip(), _retry_after(r.headers.get("Retry-After")), s)
    if s in (401, 403):
        raise _Permanent(f"HTTP {s} {r.reason or ''}: access denied; pass credentials in storage_options", s)
    if s >= 400 or s < 200 or s >= 300:
        raise _Permanent(f"HTTP {s} {r.reason or ''}".strip(), s)


def _too_big(url: str, path: str, n: int, limit: int) -> SlideError:
    from .errors import DecodeLimitError

    return DecodeLimitError(
        f"{url}: {path} has {n} bytes, more than the {limit} it may have; the file or store is damaged",
        url,
    )


def too_big(url: str, path: str, n: int, limit: int) -> SlideError:
    return DecodeLimitError(
        f"{url}: {path} has {n} bytes, more than the {limit} it may have; the file or store is damaged",
        url,
    )


def remote_error(
    url: str, what: str, attempts: int, err: BaseException, status: int | None = None
) -> RemoteIOError:
    """The error for a remote read of ``what`` (under slide ``url``) that failed for good."""
    e = RemoteIOError(
        f"{url}: reading {what} failed after {attempts} attempt(s) ({type(err).__name__}: {err}); the "
        f"server or network kept failing — retry later or allow more with open_slide(retry=RetryPolicy(...))",
        url,
        status=status,
    )
    e.__cause__ = err
    return e


class HttpRanges:
    """Byte ranges and sizes of HTTP(S) objects for one slide ``url`` (see the module docstring)."""

    def __init__(self, url: str, fs: Any, retry: RetryPolicy, rng: random.Random):
        self.url, self._fs, self.retry, self._rng = url, fs, retry, rng
        self._sem: asyncio.Semaphore | None = None

    def size(self, url: str) -> int | None:
        """Size of the object at ``url`` (HEAD, or a 1-byte range); None when the server does not
        say; FileNotFoundError when missing."""
        return self._run(self._size(url))

    def gather(self, reqs: list[tuple[str, int | None, int | None]], limit: int) -> list[bytes | None]:
        """``[(url, start, end)]`` (start None: the whole object) → bytes, None when missing, all
        at once; each body at most ``limit`` bytes."""
        return self._run(self._gather(reqs, limit))

    def _run(self, coro):
        """Run a coroutine on fsspec's event loop; whatever escapes becomes a RemoteIOError."""
        import fsspec.asyn

        try:
            return fsspec.asyn.sync(self._fs.loop, lambda: coro)
        except (SlideError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - aiohttp/yarl/fsspec errors outside a request: wrapped
            raise remote_error(self.url, self.url, 1, e) from e

    async def _session(self):
        session = await self._fs.set_session()
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.retry.concurrency)
        return session

    def _request_kwargs(self, rng: str | None) -> dict:
        import aiohttp

        kw = dict(self._fs.kwargs)
        headers = dict(kw.pop("headers", None) or {})
        if rng is not None:
            headers["Range"] = rng
        headers.setdefault("Accept-Encoding", "identity")  # byte ranges of the stored bytes
        kw["headers"] = headers
        kw["timeout"] = aiohttp.ClientTimeout(
            total=None, sock_connect=self.retry.connect_timeout, sock_read=self.retry.read_timeout
        )
        return kw

    async def _size(self, url: str) -> int | None:
        async def once(session):
            kw = self._request_kwargs(None)
            async with session.head(self._fs.encode_url(url), allow_redirects=True, **kw) as r:
                if r.status in (404, 410):
                    return False
                if r.status == 405:  # HEAD not allowed: ask with a 1-byte range below
                    return None
                _check_status(r)
                n = r.headers.get("Content-Length")
                return (
                    int(n) if n is not None and n.isdigit() and "Content-Encoding" not in r.headers else None
                )

        size = await self._retrying(url, once)
        if size is None:  # some servers omit the length on HEAD: a 1-byte range tells the total
            size = await self._retrying(url, lambda s: self._get_once(s, url, 0, 1, 1 << 20, total=True))
        if size is False:
            raise FileNotFoundError(f"slide not found: {url}")
        return size

    async def _gather(self, reqs, limit: int) -> list[bytes | None]:
        async def one(url, start, end):
            async with self._sem:
                return await self._retrying(url, lambda s: self._get_once(s, url, start, end, limit))

        await self._session()
        res = await asyncio.gather(*(one(*r) for r in reqs), return_exceptions=True)
        for r in res:
            if isinstance(r, BaseException):
                raise r
        return [None if r is False else r for r in res]

    async def _retrying(self, url: str, attempt_fn):
        """Run ``attempt_fn(session)`` under the retry policy; transient failures are retried,
        anything else becomes a RemoteIOError naming the URL."""
        import aiohttp

        policy = self.retry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.total
        for attempt in range(1, policy.attempts + 1):
            retry_after = status = None
            try:
                session = await self._session()
                return await asyncio.wait_for(attempt_fn(session), max(0.001, deadline - loop.time()))
            except SlideError:
                raise
            except _Permanent as e:
                raise RemoteIOError(f"{self.url}: {url}: {e}", self.url, status=e.status) from None
            except _Transient as e:
                last: BaseException = e
                retry_after, status = e.retry_after, e.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                # resets, refused connections, bodies cut short (ClientPayloadError), read timeouts
                last = e
            wait = policy.delay(attempt, retry_after, self._rng)
            if attempt == policy.attempts or loop.time() + wait > deadline:
                break
            await asyncio.sleep(wait)
        raise remote_error(self.url, url, attempt, last, status)

    async def _get_once(self, session, url: str, start, end, limit: int, total: bool = False):
        """One GET: bytes, False when the object is missing; with ``total`` the object's size from
        ``Content-Range`` instead. Raises _Transient / _Permanent."""
        if start is None or (start == 0 and end is None):
            rng = None
        elif start < 0:
            rng = f"bytes={start}"
        elif end is None:
            rng = f"bytes={start}-"
        else:
            rng = f"bytes={start}-{end - 1}"
        async with session.get(self._fs.encode_url(url), **self._request_kwargs(rng)) as r:
            if r.status in (404, 410):
                return False
            if r.status == 416:  # the range starts past the end: the object is shorter than that
                return 0 if total else b""
            _check_status(r)
            n = r.headers.get("Content-Length")
            if n is not None and n.isdigit() and int(n) > limit:
                raise _too_big(self.url, url, int(n), limit)
            if n is not None and n.isdigit():
                body = await r.read()
            else:  # no length announced (chunked): read at most limit + 1 bytes
                parts, got = [], 0
                while got <= limit:
                    chunk = await r.content.readany()
                    if not chunk:
                        break
                    parts.append(chunk)
                    got += len(chunk)
                body = b"".join(parts)
            if len(body) > limit:
                raise _too_big(self.url, url, len(body), limit)
            if n is not None and n.isdigit() and len(body) != int(n):
                raise _Transient(f"body of {len(body)} bytes, Content-Length {n}")
            if r.status == 200:
                if rng is None:
                    return body
                # the server ignored Range and sent the whole object
                size = len(body)
                if total:
                    return size
                s = max(0, size + start) if start < 0 else start
                e = size if start < 0 or end is None else min(end, size)
                return body[s:e]
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if m is None:
                raise _Transient(f"206 without a valid Content-Range ({r.headers.get('Content-Range')!r})")
            a, b = int(m.group(1)), int(m.group(2))
            size = int(m.group(3)) if m.group(3) != "*" else None
            if b - a + 1 != len(body):
                raise _Transient(f"Content-Range {a}-{b} but {len(body)} body bytes")
            if total:
                if size is None:
                    raise _Transient("Content-Range without the total size")
                return size
            if start < 0 or end is None:
                want_a = (max(0, size + start) if start < 0 else start) if size is not None else a
                want_b = size - 1 if size is not None else b
            else:
                want_a = start
                want_b = min(end - 1, size - 1) if size is not None else end - 1
            if a != want_a or b != want_b:
                raise _Transient(f"asked for bytes {start}-{None if end is None else end - 1}, got {a}-{b}")
            return body
