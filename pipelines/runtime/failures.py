"""The vocabulary of containment: :class:`IsolationConfig` (the ``isolation`` section of every batch
job and its flags, :data:`ISOLATION_FLAGS`), :class:`WorkerFailure` and :func:`error_class` (what a
manifest records), :func:`last_words` (what a crashed worker said)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from wsi.errors import SlideError

from ..config import Flag
from ..errors import ConfigError

#: worker output lines worth quoting when it dies (native error messages, the innermost frame)
_LAST_WORDS = re.compile(
    r"(GLib-ERROR.*|.*failed to allocate.*|Fatal Python error: .*|terminate called.*|.*Assertion.*failed.*"
    r"|.*double free.*|.*corrupted.*|malloc\(\): .*)"
)
_FRAME = re.compile(r'\s*File "([^"]+)", line (\d+) in (\S+)')


@dataclass(kw_only=True)
class IsolationConfig:
    """How a batch job contains what it cannot prevent (see :mod:`pipelines.runtime`)."""

    #: read each slide in a worker process with the limits below (false: in the job's own
    #: process, where a native crash ends the job)
    enabled: bool = True
    #: the worker's memory limit in GiB (heap and private mappings, RLIMIT_DATA)
    memory_gb: float = 8.0
    #: seconds the job may wait for one slide's reading in total
    slide_timeout_s: float = 3600.0
    #: seconds without any progress from the worker before a slide is abandoned
    stall_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not (self.memory_gb > 0 and self.slide_timeout_s > 0 and self.stall_timeout_s > 0):
            raise ConfigError(
                f"isolation.memory_gb ({self.memory_gb}), slide_timeout_s ({self.slide_timeout_s}) and "
                f"stall_timeout_s ({self.stall_timeout_s}) must be positive"
            )


#: the named flags of the ``isolation`` section, the same in every batch job
ISOLATION_FLAGS = (
    Flag(
        "isolation.enabled",
        "read slides in this process, not in a worker with memory and time limits",
        name="--no-isolation",
        action="store_false",
    ),
    Flag(
        "isolation.memory_gb",
        "memory limit of the slide worker in GiB (default 8)",
        name="--worker-memory-gb",
        type=float,
    ),
    Flag(
        "isolation.slide_timeout_s",
        "seconds one slide's reading may take in all (default 3600)",
        name="--slide-timeout",
        type=float,
    ),
    Flag(
        "isolation.stall_timeout_s",
        "seconds without progress before a slide is abandoned (default 600)",
        name="--stall-timeout",
        type=float,
    ),
)


class WorkerFailure(SlideError):
    """A slide's work failed with its worker: ``error_class`` is ``Crashed(<signal>)``,
    ``Crashed(exit N)``, ``MemoryLimit``, ``Timeout``, or the class name of an exception that
    could not be sent back as itself. The message names the slide and what to do."""

    def __init__(self, message: str, url: str | None = None, *, error_class: str = "Crashed"):
        super().__init__(message, url)
        self.error_class = error_class

    def __reduce__(self):
        return (_rebuild_failure, (str(self), self.url, self.error_class))


def _rebuild_failure(message: str, url: str | None, error_class: str) -> WorkerFailure:
    return WorkerFailure(message, url, error_class=error_class)


def error_class(e: BaseException) -> str:
    """The manifest's error class of an exception: ``WorkerFailure.error_class``, ``MemoryLimit``
    for a ``MemoryError``, else the exception's class name (``CorruptSlideError``, ...)."""
    if isinstance(e, WorkerFailure):
        return e.error_class
    if isinstance(e, MemoryError):
        return "MemoryLimit"
    return type(e).__name__


def last_words(output: str) -> str:
    """The worker output worth quoting after a crash: native error lines and the innermost Python
    frame (``faulthandler`` prints the most recent call first)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    said = [m.group(1).strip() for ln in lines if (m := _LAST_WORDS.match(ln))]
    start = next((i for i, ln in enumerate(lines) if ln.startswith(("Current thread", "Stack ("))), 0)
    frame = next(
        (f"{m.group(1)}:{m.group(2)} in {m.group(3)}" for ln in lines[start:] if (m := _FRAME.match(ln))), ""
    )
    parts = list(dict.fromkeys(said))[:3] + ([f"at {frame}"] if frame else [])
    if not parts and lines:
        parts = lines[-2:]
    return "; ".join(parts)[:600]
