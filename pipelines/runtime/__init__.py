"""What every batch job (``embed``, ``tissue qc``, ``segment predict``, ``mil heatmap``) and
``convert`` share to survive hostile slides: a native abort or segfault in a decoder or OpenSlide,
a hang or runaway memory in one slide becomes a recorded failure of that slide and the job goes on.

- :class:`SlideWorker`: slide work in a worker process with a memory limit and time limits,
  restarted when it dies; :func:`worker_for` / :func:`maybe_isolated` hand one out (kept idle for
  the next job of the process), :func:`run_call` / :func:`run_stream` run work in it or, with
  isolation off, in this process;
- :class:`IsolationConfig`: the ``isolation`` section of every batch job's config (on by default;
  ``--no-isolation`` turns it off);
- :class:`WorkerFailure` and :func:`error_class`: the error class a manifest records
  (``CorruptSlideError``, ``DecodeLimitError``, ``RemoteIOError``, ``Timeout``,
  ``Crashed(SIGABRT)``, ``Crashed(SIGSEGV)``, ``MemoryLimit``, ``Interrupted``, ...);
- :class:`InFlight`: slides marked in flight before their work starts, so a rerun after the whole
  job crashed records that slide as failed (``Interrupted``) instead of crashing again;
- :func:`each_slide`: the contained loop of a batch job (used by ``tissue qc``, ``segment
  predict`` and ``mil heatmap``; ``embed`` has its own, which also resumes).
"""

from .batch import Outcome, each_slide
from .failures import ISOLATION_FLAGS, IsolationConfig, WorkerFailure, error_class, last_words
from .isolation import SlideWorker
from .journal import INTERRUPTED, InFlight, interrupted_reason
from .pool import close_idle_workers, maybe_isolated, run_call, run_stream, worker_for

__all__ = [
    "INTERRUPTED",
    "ISOLATION_FLAGS",
    "InFlight",
    "IsolationConfig",
    "SlideWorker",
    "Outcome",
    "WorkerFailure",
    "close_idle_workers",
    "each_slide",
    "error_class",
    "interrupted_reason",
    "last_words",
    "maybe_isolated",
    "run_call",
    "run_stream",
    "worker_for",
]
