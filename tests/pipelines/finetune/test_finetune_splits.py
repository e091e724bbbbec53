"""Group-aware splits (pipelines.finetune.splits): no group straddles splits, fractions and label
mix roughly kept, deterministic; user-given splits with a leak are refused or fixed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines.finetune import SPLITS, SplitLeakError, check_group_leaks, group_split, split_summary


def _items(n_groups: int, seed: int) -> tuple[list[str], list[str]]:
    """Tiles of patients: 3-12 tiles each, one tissue label per patient, 3 unequal classes."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(n_groups):
        lab = rng.choice(["tumour", "stroma", "fat"], p=[0.5, 0.3, 0.2])
        for _ in range(rng.integers(3, 13)):
            labels.append(str(lab))
            groups.append(f"P{p:03d}")
    return labels, groups


def _straddling(splits, groups) -> list[str]:
    seen: dict[str, set] = {}
    for s, g in zip(splits, groups):
        seen.setdefault(g, set()).add(s)
    return [g for g, s in seen.items() if len(s) > 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_split_keeps_groups_whole_fractions_and_label_mix(seed):
    labels, groups = _items(200, seed)
    s = group_split(labels, groups, val_fraction=0.15, test_fraction=0.2, seed=seed)
    assert _straddling(s, groups) == []
    n = len(labels)
    frac = {sp: float((s == sp).sum()) / n for sp in SPLITS}
    assert abs(frac["test"] - 0.2) < 0.05 and abs(frac["val"] - 0.15) < 0.05, frac
    overall = Counter(labels)
    for sp in SPLITS:
        in_split = Counter(lab for lab, x in zip(labels, s) if x == sp)
        for lab, c in overall.items():
            assert abs(in_split[lab] / sum(in_split.values()) - c / n) < 0.08, (sp, lab)


def test_group_split_is_deterministic():
    labels, groups = _items(80, 7)
    a = group_split(labels, groups, seed=3)
    assert np.array_equal(a, group_split(labels, groups, seed=3))
    assert not np.array_equal(a, group_split(labels, groups, seed=4))


def test_group_split_mixed_label_groups_and_options():
    """Slides holding several tissue classes are groups too; a fraction of 0 leaves a split out."""
    rng = np.random.default_rng(8)
    groups = [f"S{i // 10}" for i in range(400)]
    labels = list(rng.integers(0, 4, 400))
    s = group_split(labels, groups, val_fraction=0.0, test_fraction=0.25, seed=0)
    assert _straddling(s, groups) == [] and set(s) == {"train", "test"}
    assert set(group_split(labels, groups, val_fraction=0, test_fraction=0)) == {"train"}
    with pytest.raises(ValueError, match="cannot fill"):
        group_split([0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="no group"):
        group_split([0, 1, 0], ["a", "", "b"])


def test_leak_is_refused_naming_the_groups():
    splits = ["train", "train", "test", "val", "val", "test"]
    groups = ["P1", "P1", "P1", "P2", "P2", "P3"]
    with pytest.raises(
        SplitLeakError, match=r"1 group\(s\) straddle splits in labels.csv: group 'P1' \(train 2, test 1\)"
    ):
        check_group_leaks(splits, groups, source="labels.csv")


def test_leak_is_fixed_and_reported():
    splits = ["train", "test", "test", "val", "val", "test", "train", "val", "train"]
    groups = ["P1", "P1", "P1", "P2", "P2", "P3", "P4", "P4", "P5"]
    fixed, moves = check_group_leaks(splits, groups, fix=True)
    assert _straddling(fixed, groups) == []
    assert [(m.group, m.found_in, m.moved_to, m.items_moved) for m in moves] == [
        ("P1", {"train": 1, "test": 2}, "test", 1),  # majority
        ("P4", {"train": 1, "val": 1}, "train", 1),  # tie: train before val
    ]
    assert str(moves[0]) == "group 'P1' (train 1, test 2) -> test (1 items moved)"
    assert list(fixed) == ["test", "test", "test", "val", "val", "test", "train", "train", "train"]
    again, none = check_group_leaks(fixed, groups, fix=True)
    assert none == [] and list(again) == list(fixed)


def test_leak_checker_rejects_unknown_split_names():
    with pytest.raises(ValueError, match="unknown split names in x.csv: \\['validation'\\]"):
        check_group_leaks(["train", "validation"], ["a", "b"], source="x.csv")


def test_split_summary_reports_missing_labels():
    s = ["train", "train", "test", "test"]
    summary = split_summary(s, ["a", "b", "a", "a"], ["P1", "P2", "P3", "P3"])
    assert summary["train"] == {"items": 2, "groups": 2, "labels": {"a": 1, "b": 1}, "missing_labels": []}
    assert summary["test"] == {"items": 2, "groups": 1, "labels": {"a": 2}, "missing_labels": ["b"]}
    assert "val" not in summary
