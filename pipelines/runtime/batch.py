"""The loop of a batch job over slides with containment: :func:`each_slide`.

``embed`` has its own loop (it also skips valid files and keeps failed slides failed across reruns);
``tissue qc``, ``segment predict`` and ``mil heatmap`` over many slides share this one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .failures import IsolationConfig, error_class
from .isolation import SlideWorker
from .journal import INTERRUPTED, InFlight, interrupted_reason
from .pool import maybe_isolated


@dataclass
class Outcome:
    """One slide's outcome: ``result`` of the work, or ``error_class`` and ``error`` (the message)."""

    slide_id: str
    url: str
    result: Any = None
    error_class: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error_class


def each_slide(
    slides: Iterable[tuple[str, str]],
    work: Callable[[SlideWorker | None, str, str], Any],
    *,
    out_dir: str | Path,
    job: str,
    isolation: IsolationConfig,
    preload: tuple[str, ...] = (),
    catch: tuple[type[BaseException], ...] = (Exception,),
) -> Iterator[Outcome]:
    """Run ``work(worker, slide_id, url)`` for each ``(slide_id, url)`` and yield its
    :class:`Outcome`. ``worker`` is the job's :class:`SlideWorker` (None with isolation off): the
    work runs its slide reading there (``run_call``/``run_stream``). Each slide is marked in flight
    (``out_dir/.inflight/<job>/``) from before its work starts until the caller has recorded its
    outcome (the generator resumes); a slide an earlier run left in flight is yielded as failed
    (``Interrupted``) without being started — the run after this one tries it again. Exceptions
    of the ``catch`` types are outcomes; others (bugs) propagate."""
    journal = InFlight(out_dir, job)
    stale = journal.stale()
    with maybe_isolated(isolation, preload=preload) as worker:
        for sid, url in slides:
            if sid in stale:
                hint = "the next run tries it again"
                yield Outcome(sid, url, error_class=INTERRUPTED, error=interrupted_reason(stale[sid], hint))
                journal.end(sid)
                continue
            journal.begin(sid, url)
            t0 = time.perf_counter()
            try:
                out = Outcome(sid, url, result=work(worker, sid, url))
            except KeyboardInterrupt:
                journal.end(sid)  # stopped on purpose: not a slide that takes the job down
                raise
            except catch as e:
                out = Outcome(sid, url, error_class=error_class(e), error=str(e) or type(e).__name__)
            out.seconds = time.perf_counter() - t0
            yield out
            journal.end(sid)
    journal.tidy()
