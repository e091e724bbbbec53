"""The metrics logger every training loop writes through: JSON Lines, CSV, optional TensorBoard,
and PNG plots.

Per logged step, one row ``{"step": n, **metrics}``; a metric is a number or a list of numbers
(per-class values, named by ``names``). Files in ``out_dir``:

- ``metrics.jsonl``: one JSON object per row, appended (the live log);
- ``metrics.csv``: the same rows flattened (list values become ``<key>_<name>`` columns), appended
  while the columns stay the same and rewritten atomically when a new column appears;
- ``<name>.png`` from :meth:`MetricsLogger.plot`, ``metrics.json`` from
  :meth:`MetricsLogger.write_json`, both written atomically.

Resume: constructed with ``resume_step`` (the checkpoint's step), the logger keeps the rows of
the previous run up to that step and rewrites both files atomically, so rows logged after the
last checkpoint of an interrupted run are not duplicated when the resumed run logs them again.
A fresh run (``resume_step=None``) starts empty files. Only the enabled logger (rank 0) writes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi.atomic import atomic_path, atomic_write_text


def json_safe(o: Any) -> Any:
    """``o`` with every NaN float replaced by None, through dicts, lists and tuples (JSON has no
    NaN: an unmeasured figure is written as null)."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


class MetricsLogger:
    """See the module docstring. ``names`` maps a list-valued key to its element names."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        names: dict[str, Sequence[str]] | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.out = Path(out_dir)
        self.jsonl = self.out / "metrics.jsonl"
        self.csv = self.out / "metrics.csv"
        self.names = {k: list(v) for k, v in (names or {}).items()}
        self.rows: list[dict[str, Any]] = []
        self._columns: list[str] | None = None
        self._tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.rows = [r for r in self._previous_rows() if int(r["step"]) <= resume_step]
        self._rewrite()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None  # TensorBoard is optional
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.out / "tensorboard"))

    # --- files ------------------------------------------------------------------------------------
    def _previous_rows(self) -> list[dict[str, Any]]:
        """Rows of the previous run: the JSON Lines log (a torn last line is dropped), else the CSV
        of runs that predate it."""
        if self.jsonl.exists():
            rows = []
            for line in self.jsonl.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # the line being written when the run was killed
            return rows
        if self.csv.exists():
            with open(self.csv, newline="") as f:
                return [
                    {k: (float(v) if k != "step" else int(v)) for k, v in r.items() if v not in (None, "")}
                    for r in csv.DictReader(f)
                ]
        return []

    def _flat(self, row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in row.items():
            if isinstance(v, (list, tuple)):
                labels = self.names.get(k) or [str(i) for i in range(len(v))]
                for name, x in zip(labels, v):
                    out[f"{k}_{name}"] = x
            else:
                out[k] = v
        return out

    def _rewrite(self) -> None:
        flat = [self._flat(r) for r in self.rows]
        cols = list(dict.fromkeys(["step", *(k for r in flat for k in r)]))  # first-seen order
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(flat)
        atomic_write_text(self.csv, buf.getvalue())
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._columns = cols

    def log(self, step: int, **metrics: Any) -> None:
        """Record one row (numbers, or lists of numbers)."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            row[k] = [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)
        self.rows.append(row)
        flat = self._flat(row)
        if self._columns is None or set(flat) - set(self._columns):
            self._rewrite()
        else:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns, restval="").writerow(flat)
        if self._tb is not None:
            for k, v in self._flat(row).items():
                if k != "step":
                    self._tb.add_scalar(k, float(v), step)

    # --- reading and plots ------------------------------------------------------------------------
    def series(self, key: str) -> tuple[list[int], list[Any]]:
        """``(steps, values)`` of the rows that have ``key`` (NaN values left out)."""
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            xs.append(int(r["step"]))
            ys.append(v)
        return xs, ys

    def plot(
        self, path: str | Path, keys: Sequence[str], *, ylim: dict[str, tuple[float, float]] | None = None
    ) -> Path | None:
        """One PNG at ``path`` with one panel per key that has values (list-valued keys draw one
        line per element, labelled with ``names``); None when no key has values."""
        if not self.enabled:
            return None
        from matplotlib.figure import Figure

        keys = [k for k in keys if self.series(k)[0]]
        if not keys:
            return None
        fig = Figure(figsize=(5 * len(keys) if len(keys) > 1 else 5, 3.2), dpi=100)
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        for ax, key in zip(axes, keys):
            xs, ys = self.series(key)
            marker = "." if len(xs) < 50 else None
            if isinstance(ys[0], list):
                labels = self.names.get(key) or [str(i) for i in range(len(ys[0]))]
                for i, label in enumerate(labels):
                    ax.plot(xs, [y[i] for y in ys], marker=marker, label=label)
                ax.legend(fontsize=7)
            else:
                ax.plot(xs, ys, marker=marker)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            if ylim and key in ylim:
                ax.set_ylim(*ylim[key])
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        return path

    def write_json(self, path: str | Path, **extra: Any) -> Path | None:
        """``{**extra, "history": rows}`` as JSON, atomically."""
        if not self.enabled:
            return None
        path = Path(path)
        atomic_write_text(path, json.dumps({**extra, "history": self.rows}, indent=1))
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
