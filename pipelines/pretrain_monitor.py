"""Monitoring for training jobs: per-step metrics to CSV (and TensorBoard when installed),
RankMe of embeddings, and PNG plots of loss, lr and RankMe.

RankMe (Garrido et al. 2023) is ``exp(H(p))`` with ``p = σ / ||σ||₁ + ε`` over the singular values
σ of an (N, D) embedding matrix: the effective rank, between 1 (collapse) and min(N, D).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of an (N, D) embedding matrix (1 = collapsed)."""
    s = torch.linalg.svdvals(embeddings.detach().double())
    p = s / s.sum().clamp(min=eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


class MetricsLogger:
    """Append-only CSV of per-step metrics (rank 0 only); TensorBoard when available.

    On resume the CSV is cut back to the checkpoint's step, so rows logged after the last
    checkpoint of an interrupted run are not duplicated."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self._fields: list[str] | None = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None  # TensorBoard is optional
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def _rewrite(self) -> None:
        fields = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "step", k))
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields or ["step"])
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)
        self._fields = fields or None

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        if self._fields is None or set(row) - set(self._fields):
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._fields).writerow(row)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key)
            if v not in (None, ""):
                val = float(v)
                if not math.isnan(val):
                    xs.append(int(r["step"]))
                    ys.append(val)
        return xs, ys

    def plot(self, out_dir: str | Path, keys: tuple[str, ...] = ("loss", "lr", "rankme")) -> list[Path]:
        """One PNG per metric (matplotlib, Agg)."""
        if not self.enabled:
            return []
        from matplotlib.figure import Figure

        written = []
        for key in keys:
            xs, ys = self.series(key)
            if not xs:
                continue
            fig = Figure(figsize=(5, 3.2), dpi=100)
            ax = fig.subplots()
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = Path(out_dir) / f"{key}.png"
            fig.savefig(path)
            written.append(path)
        return written

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
