"""Errors raised by the slide layer, in one small hierarchy under :class:`WsiError`.

- :class:`SlideError` and its subclasses: a slide cannot be opened or read. Every one is an
  :class:`OSError` (a slide is a file) and its message names the file and, where there is one, the
  fix. Batch jobs catch :class:`SlideError`, record the message and go on.
- :class:`AnnotationError`: an annotation file (QuPath GeoJSON, label image) is invalid; it is a
  :class:`ValueError` and lists every problem found, by feature.

``slidestream`` catches :class:`WsiError` once and prints its message as one line.
"""

from __future__ import annotations


class WsiError(Exception):
    """Base class of the slide layer's user-facing errors."""


class SlideError(WsiError, OSError):
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


class AnnotationError(WsiError, ValueError):
    """Bad annotations: ``problems`` lists ``(feature index or None, message)``; the message
    names the file and every problem (the first 50)."""

    def __init__(self, source: str, problems: list[tuple[int | None, str]]):
        self.source = source
        self.problems = problems
        lines = [f"  feature {i}: {m}" if i is not None else f"  {m}" for i, m in problems[:50]]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{source}: {len(problems)} bad annotation(s):\n" + "\n".join(lines) + more)

    def __reduce__(self):  # picklable (DataLoader workers re-raise errors in the main process)
        return (type(self), (self.source, self.problems))
