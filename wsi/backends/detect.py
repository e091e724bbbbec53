"""Which backend opens a URL (``open_slide(..., backend="auto")``): probes through the I/O core,
nothing listed remotely and no whole object downloaded."""

from __future__ import annotations

import os

from ..byteio import ByteSource, RetryPolicy
from ..errors import RemoteIOError, UnsupportedSlideError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# formats OpenSlide reads that are not TIFF-mappable (or that we do not map yet)
_OPENSLIDE_ONLY_SUFFIXES = (".mrxs", ".vms", ".vmu", ".scn", ".bif", ".ndpi", ".dcm", ".svslide")


def _strip_url(url: str) -> str:
    return url.rstrip("/")


_ZARR_MARKERS = ("zarr.json", ".zattrs", ".zgroup", ".zarray")


def _probe(src: ByteSource, key: str) -> bool:
    """Whether a remote store has ``key``; a refusal (4xx) counts as "no": the request for the
    object itself, which comes next, reports the real error."""
    try:
        return src.exists(key)
    except RemoteIOError as e:
        if e.status is not None and 400 <= e.status < 500:
            return False
        raise


def candidates(url: str, storage_options: dict | None, retry: RetryPolicy | None) -> list[str]:
    """Backends to try, fastest first, for ``backend='auto'``. Probes go through the I/O core
    (retried, errors wrapped); remotely nothing is listed and no whole object is downloaded: the
    Zarr metadata documents are asked for, then the first 4 bytes."""
    import urllib.parse

    src = ByteSource(url, storage_options, retry=retry)
    try:
        name = src.root if src.local else urllib.parse.urlsplit(url).path
        if _strip_url(url).lower().endswith(".zarr"):
            return ["zarr"]
        if src.local:
            if not os.path.exists(src.root):
                raise FileNotFoundError(f"slide not found: {url}")
            if os.path.isdir(src.root):
                if any(src.exists(k) for k in _ZARR_MARKERS):
                    return ["zarr"]
                raise UnsupportedSlideError(
                    f"{url} is a directory but not a Zarr store (no zarr.json/.zattrs); pass a slide file",
                    url,
                )
        elif not urllib.parse.urlsplit(url).query:  # a URL with a query (presigned) names one object
            if _probe(src, "zarr.json") or _probe(src, ".zattrs"):
                return ["zarr"]
            if src.isdir():
                raise UnsupportedSlideError(
                    f"{url} is a directory but not a Zarr store (no zarr.json/.zattrs); pass a slide file",
                    url,
                )
        if name.lower().rstrip("/").endswith(_OPENSLIDE_ONLY_SUFFIXES):
            return ["openslide"] if src.local else []
        magic = src.ranges([("", 0, 4)])[0]
        if magic is None:
            raise FileNotFoundError(f"slide not found: {url}")
        if magic in _TIFF_MAGIC:
            return ["tiff", "openslide"] if src.local else ["tiff"]
        return ["openslide"] if src.local else []
    finally:
        src.close()
