"""Group-aware train/val/test splits: tiles of one patient (or slide) never straddle splits.

:func:`group_split` assigns every item a split so that each *group* lies wholly in one, stratified
by label as far as the groups allow, deterministic for a seed. It is one call of sklearn's
``StratifiedGroupKFold`` with :data:`FOLDS` = 20 folds (fewer when there are fewer groups): whole
folds go to test, val and train in proportion to the requested fractions, so the fractions are met
to the nearest 1/20 of the items (or 1/n_groups), and every fold, hence every split, keeps the
label mix as closely as whole groups permit. A group holding several labels is fine.

:func:`check_group_leaks` takes split assignments given by the user (a ``split`` column) and finds
the groups that appear in more than one split. With ``fix=False`` it raises
:class:`SplitLeakError` naming them; with ``fix=True`` it moves each such group wholly to the split
that holds most of its items (ties: the first of train, val, test), and returns what it moved.

:func:`split_summary` counts items, groups and labels per split, and lists the labels a split
lacks, for the run's report.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

SPLITS = ("train", "val", "test")
FOLDS = 20


class SplitLeakError(InputError):
    """A patient/slide group appears in more than one split (a user-facing
    :class:`~pipelines.errors.InputError`: ``slidestream`` prints it on one line, exit 2)."""


@dataclass(frozen=True)
class GroupMove:
    """One leaking group moved wholly to one split: its item counts per split before the move."""

    group: str
    found_in: dict[str, int]
    moved_to: str

    @property
    def items_moved(self) -> int:
        return sum(n for s, n in self.found_in.items() if s != self.moved_to)

    def where(self) -> str:
        """``group 'P7' (train 5, test 2)``."""
        counts = ", ".join(f"{s} {n}" for s, n in self.found_in.items())
        return f"group {self.group!r} ({counts})"

    def __str__(self) -> str:
        return f"{self.where()} -> {self.moved_to} ({self.items_moved} items moved)"


def _as_groups(groups: Sequence, n: int) -> np.ndarray:
    g = np.asarray([str(v) for v in groups], dtype=object)
    if len(g) != n:
        raise ValueError(f"{len(g)} group values for {n} items")
    empty = int(sum(1 for v in g if v.strip() == "" or v == "nan"))
    if empty:
        raise ValueError(
            f"{empty} items have no group (patient/slide id); fill the group column for every item"
        )
    return g


def _fold_counts(k: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Folds for test and val (at least one each when asked for, leaving one for train)."""
    n_test = max(1, round(test_fraction * k)) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * k)) if val_fraction > 0 else 0
    if n_test + n_val >= k:
        raise ValueError(
            f"{k} groups cannot fill train{', val' if n_val else ''}{', test' if n_test else ''} "
            f"with whole groups; add groups or ask for fewer splits"
        )
    return n_test, n_val


def group_split(
    labels: Sequence,
    groups: Sequence,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> np.ndarray:
    """Split names (``"train"``, ``"val"``, ``"test"``), one per item, with no group in two splits.

    ``labels`` and ``groups`` are per item (any hashable values; groups compared as strings).
    A fraction of 0 leaves that split empty. Deterministic for equal inputs and ``seed``."""
    y = np.asarray(labels)
    g = _as_groups(groups, len(y))
    if len(y) == 0:
        raise ValueError("no items to split")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction and test_fraction must be >= 0 and sum below 1; got {val_fraction} and {test_fraction}"
        )
    out = np.full(len(y), "train", dtype=object)
    if val_fraction == 0 and test_fraction == 0:
        return out
    n_groups = len(set(g))
    k = min(FOLDS, n_groups)
    n_test, n_val = _fold_counts(k, val_fraction, test_fraction)
    from sklearn.model_selection import StratifiedGroupKFold

    _, y_codes = np.unique(y, return_inverse=True)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "the least populated class has fewer members than n_splits": expected with rare labels;
        # split_summary reports which labels a split then lacks.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = [test for _, test in sgkf.split(np.zeros(len(y)), y_codes, g)]
    for i, idx in enumerate(folds):
        out[idx] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def check_group_leaks(
    splits: Sequence[str], groups: Sequence, *, fix: bool = False, source: str | None = None
) -> tuple[np.ndarray, list[GroupMove]]:
    """Check that no group appears in two splits. Returns the (possibly fixed) split per item and
    the moves made. ``fix=False`` raises :class:`SplitLeakError` naming the leaking groups; ``fix
    =True`` moves each wholly to the split holding most of its items (ties: train, val, test
    order). ``source`` (a file name) is named in the messages."""
    s = np.asarray([str(v) for v in splits], dtype=object)
    g = _as_groups(groups, len(s))
    where = f" in {source}" if source else ""
    bad = sorted(set(s) - set(SPLITS))
    if bad:
        raise ValueError(f"unknown split names{where}: {bad}; use {', '.join(SPLITS)}")
    per_group: dict[str, Counter] = {}
    for grp, sp in zip(g, s):
        per_group.setdefault(grp, Counter())[sp] += 1
    leaks = {grp: c for grp, c in sorted(per_group.items()) if len(c) > 1}
    if not leaks:
        return s, []
    moves = [
        GroupMove(
            grp,
            {sp: c[sp] for sp in SPLITS if sp in c},
            max((sp for sp in SPLITS if sp in c), key=lambda sp: (c[sp], -SPLITS.index(sp))),
        )
        for grp, c in leaks.items()
    ]
    if not fix:
        shown = "; ".join(m.where() for m in moves[:10])
        more = f"; and {len(moves) - 10} more" if len(moves) > 10 else ""
        raise SplitLeakError(
            f"{len(moves)} group(s) straddle splits{where}: {shown}{more}. Put each group's items in "
            f"one split, or let the job fix it (each group moves to the split holding most of its items)"
        )
    fixed = s.copy()
    for m in moves:
        fixed[g == m.group] = m.moved_to
    return fixed, moves


def split_summary(splits: Sequence[str], labels: Sequence, groups: Sequence) -> dict:
    """``{split: {"items", "groups", "labels": {label: count}, "missing_labels": [...]}}`` over the
    splits present, labels as strings (JSON-ready)."""
    s = np.asarray([str(v) for v in splits], dtype=object)
    y = np.asarray([str(v) for v in labels], dtype=object)
    g = _as_groups(groups, len(s))
    all_labels = sorted(set(y))
    out = {}
    for sp in SPLITS:
        m = s == sp
        if not m.any():
            continue
        counts = Counter(y[m])
        out[sp] = {
            "items": int(m.sum()),
            "groups": len(set(g[m])),
            "labels": {lab: int(counts[lab]) for lab in all_labels if counts[lab]},
            "missing_labels": [lab for lab in all_labels if not counts[lab]],
        }
    return out
