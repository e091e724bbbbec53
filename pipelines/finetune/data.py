"""The data of ``slidestream finetune``: which items (tiles, images, annotated slides) form the
train, val and test splits, their labels per task, and the report on how they were split.

Sources (``data.train`` / ``data.val`` / ``data.test``, one kind each; :class:`SourceConfig`):

- a **CSV of tiles** ``slide, x, y, <label columns>[, mpp][, group][, split]``: level-0 top-left
  corners, read at ``mpp`` (column, else ``data.mpp``) and ``data.tile_size`` px through the
  online loader (:class:`wsi.loader.TileDataset` with ``tiles=``; slide paths relative to the
  CSV's folder); several label columns make a multi-task run (an empty cell: no label for that
  task);
- an **ImageFolder** ``ROOT/CLASS/*.png|jpg|jpeg|tif|tiff`` (one task; groups from
  ``data.group_pattern``, else every image its own group);
- **annotated slides** (QuPath GeoJSON with classified regions): tiles sampled inside the regions
  at ``data.mpp`` (:class:`wsi.loader.TileDataset` with ``within="annotations"``, class-balanced
  :class:`wsi.sampling.LabelSampler` for training, a grid of at most ``data.eval_max_tiles``
  tiles for evaluation); a tile's label is the class covering most of its annotated pixels.

Splits. Each item's split is its CSV ``split`` column when there is one, else the split whose
source it came from. When only ``data.train`` is given and it has no ``split`` column, it is cut
by group with :func:`~pipelines.finetune.splits.group_split` (``data.split`` fractions). Then
every split is checked with :func:`~pipelines.finetune.splits.check_group_leaks` — a patient or
slide group in two splits stops the job (``data.split.on_leak: error``, a
:class:`~pipelines.finetune.splits.SplitLeakError` naming the groups) or is moved wholly to one
split (``fix``) — and :func:`~pipelines.finetune.splits.split_summary` reports items, groups and
labels per split (``splits.json``). Annotated slides take part as one item per slide (group: the
slide entry's ``group``, else the slide's id).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, MissingInputError
from .config import FinetuneConfig, FinetuneDataConfig, FinetuneSlideConfig
from .splits import SPLITS, check_group_leaks, group_split, split_summary

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: a missing label (multi-task CSV cell left empty); cross-entropy's ignore_index
MISSING = -100


@dataclass
class Items:
    """Items of one kind with their labels, groups and splits (one row per item).

    ``refs``: CSV ``(slide_url, x, y, mpp)``; ImageFolder image paths; slides
    :class:`~pipelines.finetune.config.FinetuneSlideConfig`. ``raw``: label strings per task
    (slides: none, their labels come from the annotations)."""

    kind: str
    sources: list[str]
    refs: list[Any]
    raw: dict[str, list[str]]
    groups: list[str]
    splits: list[str]
    #: whether each item's split was given (source or split column) rather than drawn
    given: bool = True

    def take(self, mask: np.ndarray) -> Items:
        idx = np.flatnonzero(mask)
        return Items(
            self.kind,
            self.sources,
            [self.refs[i] for i in idx],
            {t: [v[i] for i in idx] for t, v in self.raw.items()},
            [self.groups[i] for i in idx],
            [self.splits[i] for i in idx],
            self.given,
        )


@dataclass
class SplitData:
    """One split, ready for a loader: ``kind``, ``refs`` and ``y`` (N, tasks) int64 class
    indices (:data:`MISSING` where a task has no label; slides: None)."""

    kind: str
    refs: list[Any]
    y: np.ndarray | None
    groups: list[str]

    def __len__(self) -> int:
        return len(self.refs)


@dataclass
class FinetuneData:
    """Tasks (label columns), their class names, the splits present and the split report."""

    tasks: list[str]
    classes: list[list[str]]
    splits: dict[str, SplitData]
    report: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> list[int]:
        return [len(c) for c in self.classes]


# --- reading sources -----------------------------------------------------------------------------
def _is_url(s: str) -> bool:
    return "://" in s


def read_csv_source(path: str, data: FinetuneDataConfig, split: str) -> Items:
    """The rows of a tile CSV (see the module docstring); errors name the file, row and fix."""
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"tile table {p} not found; check data.{split}.csv")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    need = ["slide", "x", "y", *data.label_columns]
    missing = [c for c in need if c not in cols]
    if missing:
        raise InputError(
            f"{p}: missing column(s) {missing} (has {cols}); a tile table needs slide, x, y and the "
            f"label columns {data.label_columns} (data.label_columns)"
        )
    if not rows:
        raise InputError(f"{p}: no rows")
    group_col = data.group_column if data.group_column in cols else "slide"
    refs, groups, splits = [], [], []
    raw: dict[str, list[str]] = {t: [] for t in data.label_columns}
    for i, r in enumerate(rows, start=2):
        slide = r["slide"]
        if not slide:
            raise InputError(f"{p}, row {i}: empty slide; every row names its slide")
        url = slide if _is_url(slide) or Path(slide).is_absolute() else str(p.parent / slide)
        try:
            x, y = int(float(r["x"])), int(float(r["y"]))
            mpp = float(r["mpp"]) if r.get("mpp") else float(data.mpp)
        except ValueError:
            raise InputError(f"{p}, row {i}: x, y and mpp must be numbers, got {r}") from None
        if x < 0 or y < 0 or mpp <= 0:
            raise InputError(f"{p}, row {i}: x, y must be >= 0 and mpp > 0 (level-0 top-left corner)")
        refs.append((url, x, y, mpp))
        for t in data.label_columns:
            raw[t].append(r[t])
        if len(data.label_columns) == 1 and not r[data.label_columns[0]]:
            raise InputError(f"{p}, row {i}: empty label {data.label_columns[0]!r}; label every tile")
        groups.append(r[group_col] or slide)
        splits.append(r.get("split") or split)
    if "split" in cols:
        bad = sorted({s for s in splits if s not in SPLITS})
        if bad:
            raise InputError(f"{p}: unknown split name(s) {bad}; the split column holds train, val or test")
    return Items("csv", [str(p)], refs, raw, groups, splits, given="split" in cols or split != "train")


def read_imagefolder(root: str, data: FinetuneDataConfig, split: str) -> Items:
    """``ROOT/CLASS/*`` images (see the module docstring)."""
    r = Path(root)
    if not r.is_dir():
        raise MissingInputError(f"image folder {r} not found; check data.{split}.imagefolder")
    if len(data.label_columns) != 1:
        raise ConfigError(f"{r}: an ImageFolder has one task (its folder names); use one label column")
    pattern = re.compile(data.group_pattern) if data.group_pattern else None
    refs, labels, groups = [], [], []
    for cls_dir in sorted(d for d in r.iterdir() if d.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            refs.append(str(f))
            labels.append(cls_dir.name)
            if pattern is not None:
                m = pattern.search(f.name)
                if m is None:
                    raise InputError(
                        f"{f}: data.group_pattern {data.group_pattern!r} does not match the file name; "
                        "every image needs a group"
                    )
                groups.append(m.group(1) if m.groups() else m.group(0))
            else:
                groups.append(str(f.relative_to(r)))
    if not refs:
        raise InputError(f"{r}: no images in ROOT/CLASS/ ({', '.join(IMAGE_SUFFIXES)})")
    task = data.label_columns[0]
    return Items("imagefolder", [str(r)], refs, {task: labels}, groups, [split] * len(refs), split != "train")


def read_slides(slides: list[FinetuneSlideConfig], split: str) -> Items:
    """Annotated slides: one item per slide (its labels come from its annotations)."""
    from wsi.io import safe_slide_id

    for s in slides:
        for what, v in (("slide", s.slide), ("annotations", s.annotations)):
            if not _is_url(v) and not Path(v).exists():
                raise MissingInputError(f"{v} not found; check data.{split}.slides ({what})")
    groups = [s.group or safe_slide_id(s.slide) for s in slides]
    return Items("slides", [s.slide for s in slides], list(slides), {}, groups, [split] * len(slides), True)


def read_source(data: FinetuneDataConfig, split: str) -> Items | None:
    src = getattr(data, split)
    kind = src.kind()
    if kind == "csv":
        return read_csv_source(src.csv, data, split)
    if kind == "imagefolder":
        return read_imagefolder(src.imagefolder, data, split)
    if kind == "slides":
        return read_slides(src.slides, split)
    return None


def annotation_classes(slides: list[FinetuneSlideConfig]) -> list[str]:
    """Class names used in the slides' GeoJSON annotations (validated against each slide)."""
    from wsi.annotations import load_geojson
    from wsi.slide import open_slide

    names: set[str] = set()
    for s in slides:
        with open_slide(s.slide, mpp=s.mpp) as slide:
            slide.require_mpp()
            names.update(load_geojson(s.annotations, slide_dimensions=slide.dimensions).class_names)
    return sorted(names)


# --- splits --------------------------------------------------------------------------------------
def _merge(parts: list[Items]) -> Items:
    kinds = {p.kind for p in parts}
    if len(kinds) > 1:
        raise InputError(
            f"one split holds items of different kinds {sorted(kinds)} after moving groups; give each "
            "group's items in one source, or fix the splits by hand"
        )
    tasks = list(parts[0].raw)
    return Items(
        parts[0].kind,
        [s for p in parts for s in p.sources],
        [r for p in parts for r in p.refs],
        {t: [v for p in parts for v in p.raw[t]] for t in tasks},
        [g for p in parts for g in p.groups],
        [s for p in parts for s in p.splits],
    )


def assign_splits(items: list[Items], data: FinetuneDataConfig) -> tuple[list[Items], dict]:
    """Set every item's split (drawn by group when only an unsplit training source is given),
    check and fix leaks across all items; returns the items and ``{"how", "moves"}``."""
    sp = data.split
    how = "given"
    if len(items) == 1 and not items[0].given and (sp.val_fraction > 0 or sp.test_fraction > 0):
        it = items[0]
        labels = next(iter(it.raw.values())) if it.raw else it.groups
        try:
            drawn = group_split(
                labels, it.groups, val_fraction=sp.val_fraction, test_fraction=sp.test_fraction, seed=sp.seed
            )
        except ValueError as e:
            raise InputError(f"{it.sources[0]}: cannot split by group: {e}") from None
        it.splits = [str(s) for s in drawn]
        how = f"group_split(val_fraction={sp.val_fraction}, test_fraction={sp.test_fraction}, seed={sp.seed})"
    splits = [s for it in items for s in it.splits]
    groups = [g for it in items for g in it.groups]
    source = ", ".join(s for it in items for s in it.sources)
    fixed, moves = check_group_leaks(splits, groups, fix=data.split.on_leak == "fix", source=source)
    k = 0
    for it in items:
        it.splits = [str(s) for s in fixed[k : k + len(it.refs)]]
        k += len(it.refs)
    return items, {"how": how, "moves": [str(m) for m in moves]}


def _encode(raw: list[str], classes: list[str], task: str, source: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({v for v in raw if v and v not in index})
    if unknown:
        raise InputError(
            f"{source}: label(s) {unknown[:10]} of {task!r} are not in data.classes[{task!r}] = {classes}; "
            "add them or fix the labels"
        )
    return np.array([index[v] if v else MISSING for v in raw], dtype=np.int64)


def load_data(cfg: FinetuneConfig) -> FinetuneData:
    """Read the sources of ``cfg.data``, split them by group, encode the labels (see the module
    docstring)."""
    d = cfg.data
    if not d.label_columns:
        raise ConfigError("data.label_columns is empty; name at least one label column")
    read = [it for split in SPLITS if (it := read_source(d, split)) is not None]
    if not read:
        raise ConfigError(
            "no training data: give data.train.csv, data.train.imagefolder or data.train.slides"
        )
    items, how = assign_splits(read, d)
    tasks = list(d.label_columns)
    classes: list[list[str]] = []
    slides = [s for it in items if it.kind == "slides" for s in it.refs]
    for t in tasks:
        if t in d.classes:
            classes.append(list(d.classes[t]))
            continue
        found = {v for it in items for v in it.raw.get(t, []) if v}
        if slides and t == tasks[0]:
            found |= set(annotation_classes(slides))
        classes.append(sorted(found))
    for t, c in zip(tasks, classes):
        if len(c) < 2:
            raise InputError(f"task {t!r} has {len(c)} class(es) {c}; a classifier needs at least 2")
    unknown = set(d.classes) - set(tasks)
    if unknown:
        raise ConfigError(f"data.classes names {sorted(unknown)}, which are not label columns {tasks}")
    splits: dict[str, SplitData] = {}
    for split in SPLITS:
        parts = [it.take(np.array([s == split for s in it.splits])) for it in items]
        parts = [p for p in parts if p.refs]
        if not parts:
            continue
        m = _merge(parts)
        y = None
        if m.kind != "slides":
            src = ", ".join(m.sources)
            y = np.stack([_encode(m.raw[t], c, t, src) for t, c in zip(tasks, classes)], axis=1)
        splits[split] = SplitData(m.kind, m.refs, y, m.groups)
    if "train" not in splits:
        raise InputError("no items are left in the train split; check the split column and data.split")
    report = {
        **how,
        "groups": "data.group_column / slide" if items[0].kind == "csv" else "see data.group_pattern",
        "summary": _summary(items, tasks),
    }
    return FinetuneData(tasks, classes, splits, report)


def _summary(items: list[Items], tasks: list[str]) -> dict:
    splits = [s for it in items for s in it.splits]
    groups = [g for it in items for g in it.groups]
    labels = []
    for it in items:
        raw = it.raw.get(tasks[0])
        labels += [(raw[i] or "(none)") if raw else "(annotated slide)" for i in range(len(it.refs))]
    return split_summary(splits, labels, groups)
