"""Errors raised by the slide layer.

Every error is an :class:`OSError` (a slide is a file) and its message names the file and, where
there is one, the fix. Batch jobs catch :class:`SlideError`, record the message and go on.
"""

from __future__ import annotations


class SlideError(OSError):
    """Base class of all slide errors. ``url`` is the slide the error is about."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


class UnsupportedSlideError(SlideError):
    """No backend can open this file (not a slide, unknown format or compression)."""


class CorruptSlideError(SlideError):
    """The file looks like a slide but its structure is broken (truncated, bad directory)."""


class UnreadableTileError(SlideError):
    """One tile's bytes could not be fetched or decoded. Never replaced by blank pixels."""


class MissingMppError(SlideError):
    """The slide carries no µm/px metadata and the caller asked for a µm/px-based operation."""


class RegionOutOfBoundsError(SlideError, ValueError):
    """A requested region or level lies outside the slide."""


class DecodeLimitError(SlideError):
    """A declared tile/chunk/image would decode to more memory than the configured limit."""


def missing_mpp(url: str) -> MissingMppError:
    return MissingMppError(
        f"slide {url} has no mpp (µm/px) metadata; pass mpp=0.25 (the real value) to open_slide, "
        f"or --mpp on the command line",
        url,
    )


class RemoteIOError(SlideError):
    """A remote read failed for good: the server kept answering 429/5xx, resetting connections,
    sending short or mismatched bodies or stalling past the timeouts for every retry allowed, or it
    refused the request (``status`` 401/403/...). Names the URL."""

    def __init__(self, message: str, url: str | None = None, *, status: int | None = None):
        super().__init__(message, url)
        self.status = status
