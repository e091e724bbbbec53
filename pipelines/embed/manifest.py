"""The manifest of an embedding job: ``DIR/manifest.csv``, one row per slide.

Columns: ``slide_id, url, status, error, reason, n_tiles, seconds, rank``; ``status`` is ``done``
(embedded in this run), ``skipped`` (a valid feature file for this configuration already existed)
or ``failed`` (``reason`` says why and what to do; ``error`` is the error class:
``CorruptSlideError``, ``DecodeLimitError``, ``RemoteIOError``, ``UnreadableTileError``,
``MissingMppError``, ``SlideFailed`` (no tissue, level 0 too coarse), ``Timeout``,
``Crashed(SIGABRT)``, ``Crashed(SIGSEGV)``, ``MemoryLimit``, ``Interrupted`` (the job ended while
the slide was in flight), ...; see :func:`pipelines.runtime.error_class`).

Each rank rewrites its own part file ``DIR/.manifest-part-<run>-rank<r>.csv`` atomically after
every slide, so a job killed at any point loses at most the slide in flight. Rank 0 merges the
previous manifest, parts left behind by killed runs and this run's parts into ``manifest.csv``
(written atomically) and removes the merged parts.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from wsi.atomic import atomic_write_text

MANIFEST = "manifest.csv"
STATUSES = ("done", "skipped", "failed")
_PART = re.compile(r"^\.manifest-part-(?P<run>[0-9a-f]+)-rank(?P<rank>\d+)\.csv$")


@dataclass
class Row:
    """One slide's outcome."""

    slide_id: str
    url: str
    status: str
    reason: str = ""
    n_tiles: int = 0
    seconds: float = 0.0
    rank: int = 0
    error: str = ""  # error class of a failed slide

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"manifest status must be one of {STATUSES}, got {self.status!r}")
        self.n_tiles = int(self.n_tiles or 0)
        self.seconds = float(self.seconds or 0.0)
        self.rank = int(self.rank or 0)


#: CSV columns, in order (manifests written before the ``error`` column read with it empty)
FIELDS = ("slide_id", "url", "status", "error", "reason", "n_tiles", "seconds", "rank")


def format_rows(rows: Iterable[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = asdict(r)
        d["seconds"] = f"{r.seconds:.3f}"
        d["reason"] = " ".join(r.reason.split())  # one line per row
        w.writerow(d)
    return buf.getvalue()


def write_rows(path: str | os.PathLike, rows: Iterable[Row]) -> None:
    """Write rows as CSV, atomically (temp file + rename)."""
    atomic_write_text(path, format_rows(rows))


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Rows of a manifest (or part) file; a missing file has none. Rows that do not parse (a
    hand-edited file) raise ValueError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(FIELDS[:3]) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: not an embedding manifest (missing columns {sorted(missing)}); "
                f"move it away and rerun"
            )
        for i, d in enumerate(reader, start=2):
            try:
                out.append(Row(**{k: d.get(k) or "" for k in FIELDS}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {i}: {e}; fix or delete the line and rerun") from None
    return out


def part_path(out_dir: str | os.PathLike, run: str, rank: int) -> Path:
    return Path(out_dir) / f".manifest-part-{run}-rank{rank:05d}.csv"


def part_files(out_dir: str | os.PathLike) -> list[Path]:
    """All part files in ``out_dir``, oldest first (by mtime, then name)."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    parts = [p for p in d.iterdir() if _PART.match(p.name)]
    return sorted(parts, key=lambda p: (p.stat().st_mtime, p.name))


def previous_rows(out_dir: str | os.PathLike) -> dict[str, Row]:
    """What earlier runs recorded, by slide id: the manifest, then parts left behind by runs that
    were killed before they merged (a later record of a slide replaces an earlier one)."""
    rows: dict[str, Row] = {}
    for r in read_rows(Path(out_dir) / MANIFEST):
        rows[r.slide_id] = r
    for p in part_files(out_dir):
        for r in read_rows(p):
            rows[r.slide_id] = r
    return rows


def merge(out_dir: str | os.PathLike, base: dict[str, Row], current: Iterable[Row]) -> list[Row]:
    """Write ``manifest.csv``: ``base`` (earlier records) updated with ``current`` (this run's
    rows); rows are sorted by slide id. Then remove every part file that existed before the
    write (their rows are in ``base`` or ``current``) and the temporary files of killed writers.
    Call it when no rank writes any more. Returns the merged rows."""
    stale = part_files(out_dir)
    rows = dict(base)
    for r in current:
        rows[r.slide_id] = r
    merged = [rows[k] for k in sorted(rows)]
    write_rows(Path(out_dir) / MANIFEST, merged)
    for p in stale:
        p.unlink(missing_ok=True)
    for p in Path(out_dir).glob(".*manifest*.tmp-*"):  # left by writers killed mid-write
        p.unlink(missing_ok=True)
    return merged


def summary_table(rows: Iterable[Row], *, max_failed: int = 50) -> str:
    """A plain-text summary: counts by status, tiles, time, and the failed slides with reasons."""
    rows = list(rows)
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    done = [r for r in rows if r.status == "done"]
    tiles = sum(r.n_tiles for r in done)
    secs = sum(r.seconds for r in done)
    lines = [
        f"{'status':<8} {'slides':>7}",
        *(f"{s:<8} {counts[s]:>7}" for s in STATUSES),
        f"{'total':<8} {len(rows):>7}",
        f"embedded {tiles} tiles in {secs:.1f} s of slide time"
        + (f" ({tiles / secs:.1f} tiles/s)" if secs > 0 else ""),
    ]
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        lines.append("failed slides:")
        w = max(len(r.slide_id) for r in failed[:max_failed])
        for r in failed[:max_failed]:
            lines.append(f"  {r.slide_id:<{w}}  {r.reason}")
        if len(failed) > max_failed:
            lines.append(f"  ... and {len(failed) - max_failed} more (see manifest.csv)")
    return "\n".join(lines)
