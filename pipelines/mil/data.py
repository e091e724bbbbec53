"""Bags for slide-level MIL: a labels CSV joined with the feature files of ``slidestream embed``.

The labels CSV has a ``slide_id`` column, one or more label columns (``label`` by default), and
optionally ``patient_id`` (folds never split a patient) and ``split`` (``train``/``val``/``test``,
a fixed split instead of cross-validation). A slide's features are ``FEATURES/<slide_id>.h5``
(or ``FEATURES/<safe_slide_id(slide_id)>.h5``), and only there: a slide id is a name, so ``../x``,
an absolute path or a symlink out of ``FEATURES`` is refused (recorded as a skip with the reason).

Nothing is dropped silently: a row without a feature file, with an unreadable feature file or an
empty label is recorded in ``skipped`` with its reason (written to ``skipped.csv`` with a warning
on stderr by :func:`report_skips`), or raises when ``on_missing="error"``.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi.atomic import atomic_path
from wsi.io import read_features, safe_slide_id

from ..errors import InputError


class MILDataError(InputError):
    """Bad labels CSV or feature files; the message names the file and the fix."""


@dataclass
class Skip:
    slide_id: str
    reason: str


@dataclass
class MILDataset:
    slide_ids: list[str]
    bags: list[np.ndarray]  # (N_i, D) float32
    coords: list[np.ndarray]  # (N_i, 2) int64
    paths: list[Path]
    patients: list[str]
    splits: list[str | None]
    tasks: list[str]  # label columns; tasks[0] is the primary task
    classes: dict[str, list[str]]  # task -> class names (index = class id)
    targets: dict[str, np.ndarray]  # task -> (n,) int64, -1 where a secondary label is empty
    skipped: list[Skip] = field(default_factory=list)

    @property
    def in_dim(self) -> int:
        return int(self.bags[0].shape[1])

    def __len__(self) -> int:
        return len(self.slide_ids)


def _sort_classes(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


class OutsideFeaturesError(MILDataError):
    """A labels CSV slide id that would read a file outside ``--features``."""


def feature_path(features_dir: Path, slide_id: str) -> Path | None:
    """The feature file of ``slide_id`` in ``features_dir`` (``<slide_id>.h5``, else
    ``<safe_slide_id(slide_id)>.h5``), or None. A slide id is a name, never a path: one with a
    path separator, ``..`` or an absolute path, or whose file is a symlink that leads out of
    ``features_dir``, raises :class:`OutsideFeaturesError`."""
    if not slide_id or slide_id in (".", "..") or any(sep in slide_id for sep in ("/", "\\", "\0")):
        raise OutsideFeaturesError(
            f"slide_id {slide_id!r} is a path, not a name: feature files are looked up only inside "
            f"{features_dir}; use the file's name without .h5 (as `slidestream embed` writes it)"
        )
    root = features_dir.resolve()
    for name in (f"{slide_id}.h5", f"{safe_slide_id(slide_id)}.h5"):
        p = features_dir / name
        if p.is_file():
            if p.resolve().parent != root:
                raise OutsideFeaturesError(
                    f"{p} is a link to {p.resolve()}, outside {features_dir}; feature files are read "
                    f"only inside --features (copy the file in)"
                )
            return p
    return None


def read_labels(path: str | Path, tasks: list[str]) -> list[dict[str, str]]:
    """Rows of the labels CSV, checked for the needed columns and duplicate slide ids."""
    path = Path(path)
    if not path.is_file():
        raise MILDataError(f"labels file not found: {path}")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    need = ["slide_id", *tasks]
    missing = [c for c in need if c not in cols]
    if missing:
        raise MILDataError(
            f"{path}: missing column(s) {missing}; found {cols}. The CSV needs slide_id "
            f"and the label column(s) {tasks} (choose them with --label-columns)"
        )
    seen: set[str] = set()
    for i, r in enumerate(rows, start=2):
        sid = r["slide_id"]
        if not sid:
            raise MILDataError(f"{path}, line {i}: empty slide_id")
        if sid in seen:
            raise MILDataError(f"{path}, line {i}: slide_id {sid!r} appears twice; give each slide one row")
        seen.add(sid)
        if "split" in r and r["split"] not in ("", "train", "val", "test"):
            raise MILDataError(f"{path}, line {i}: split {r['split']!r} must be train, val or test")
    return rows


def load_dataset(
    labels_csv: str | Path,
    features_dir: str | Path,
    tasks: list[str] | None = None,
    *,
    classes: dict[str, list[str]] | None = None,
    on_missing: str = "skip",
) -> MILDataset:
    """Join the labels CSV with the feature files.

    ``classes`` fixes the class names (and order) per task; a label outside them raises. Without
    it the classes are the sorted label values (numerically when all are numbers).
    ``on_missing``: ``"skip"`` records slides without (readable) features in ``skipped``;
    ``"error"`` raises instead.
    """
    tasks = list(tasks or ["label"])
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise MILDataError(f"features directory not found: {features_dir} (run `slidestream embed` first)")
    if on_missing not in ("skip", "error"):
        raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
    rows = read_labels(labels_csv, tasks)
    skipped: list[Skip] = []
    kept: list[tuple[dict, np.ndarray, np.ndarray, Path]] = []
    dim = None
    for r in rows:
        sid = r["slide_id"]
        if not r[tasks[0]]:
            skipped.append(Skip(sid, f"empty {tasks[0]!r} label"))
            continue
        try:
            p = feature_path(features_dir, sid)
        except OutsideFeaturesError as e:
            if on_missing == "error":
                raise MILDataError(f"{labels_csv}: {e}") from None
            skipped.append(Skip(sid, str(e)))
            continue
        if p is None:
            msg = f"no feature file {features_dir / (sid + '.h5')}"
            if on_missing == "error":
                raise MILDataError(f"{labels_csv}: slide {sid!r} has {msg}; embed it or remove its row")
            skipped.append(Skip(sid, msg))
            continue
        try:
            f = read_features(p)
        except (OSError, ValueError) as e:
            if on_missing == "error":
                raise MILDataError(str(e)) from e
            skipped.append(Skip(sid, f"unreadable feature file: {e}"))
            continue
        if len(f) == 0:
            skipped.append(Skip(sid, f"feature file {p} has no tiles"))
            continue
        if dim is not None and f.features.shape[1] != dim:
            raise MILDataError(
                f"{p}: feature dimension {f.features.shape[1]} differs from {dim} of the other "
                f"slides; embed all slides with the same encoder"
            )
        dim = f.features.shape[1]
        kept.append((r, f.features.astype(np.float32, copy=False), f.coords.astype(np.int64, copy=False), p))
    if not kept:
        raise MILDataError(
            f"no slide of {labels_csv} has a usable feature file in {features_dir} "
            f"({len(skipped)} skipped, e.g. {skipped[0].reason if skipped else 'no rows'})"
        )
    cls: dict[str, list[str]] = {}
    targets: dict[str, np.ndarray] = {}
    for t in tasks:
        values = {r[t] for r, *_ in kept if r[t]}
        if classes and t in classes:
            names = [str(c) for c in classes[t]]
            bad = sorted(values - set(names))
            if bad:
                raise MILDataError(
                    f"{labels_csv}: column {t!r} has value(s) {bad} that are not among the "
                    f"classes {names} of the config; fix the labels or the config"
                )
        else:
            names = _sort_classes(values)
        if len(names) < 2:
            raise MILDataError(
                f"{labels_csv}: column {t!r} has only the class(es) {names}; MIL needs two or more"
            )
        index = {c: i for i, c in enumerate(names)}
        cls[t] = names
        targets[t] = np.array([index[r[t]] if r[t] else -1 for r, *_ in kept], dtype=np.int64)
    return MILDataset(
        slide_ids=[r["slide_id"] for r, *_ in kept],
        bags=[b for _, b, _, _ in kept],
        coords=[c for _, _, c, _ in kept],
        paths=[p for *_, p in kept],
        patients=[r.get("patient_id") or r["slide_id"] for r, *_ in kept],
        splits=[r.get("split") or None for r, *_ in kept],
        tasks=tasks,
        classes=cls,
        targets=targets,
        skipped=skipped,
    )


def report_skips(skipped: list[Skip], out_dir: str | Path) -> Path | None:
    """Write ``out_dir/skipped.csv`` (slide_id, reason) and one warning line on stderr."""
    if not skipped:
        return None
    out = Path(out_dir) / "skipped.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "reason"])
        for s in skipped:
            w.writerow([s.slide_id, s.reason])
    print(
        f"warning: skipped {len(skipped)} slide(s), e.g. {skipped[0].slide_id}: {skipped[0].reason}; "
        f"see {out}",
        file=sys.stderr,
    )
    return out


def collect_feature_files(items: list[str | Path]) -> list[Path]:
    """Feature files from a mix of directories (all ``*.h5`` inside) and files; missing ones raise."""
    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = sorted(p.glob("*.h5"))
            if not found:
                raise MILDataError(f"no .h5 feature files in {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise MILDataError(f"feature file not found: {p}")
    return out
