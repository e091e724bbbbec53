"""Known answers of `slidestream finetune`, through the job itself (tiles streamed from the demo
slide): gradient accumulation equals the big batch, two gloo ranks under real torchrun equal one
process with the same global batch, a resumed run equals an uninterrupted one, and a patient group
that straddles splits is refused or moved wholly to one split.

Weights are compared as *changes* from the common initialisation (relative tolerance on the
whole tensor, tests/conftest.py's assert_close_scaled): a wrong micro-batch scale or a missing
all-reduce changes an update by a factor of 2, far outside the tolerance."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_close_scaled, torchrun

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.finetune import FinetuneConfig, SplitLeakError, build_model, run_training
from pipelines.tasks import DEMO_TILES, read_task_rows
from pipelines.training import seed_everything

#: a model without batch norm (micro-batches see the same function), no augmentation, SGD (an
#: update proportional to the gradient), so accumulation and DDP can equal the big batch exactly
EXACT = (
    f"data.train.csv={DEMO_TILES}",
    "model.encoder=test_vit",
    "augment.enabled=false",
    "optim.name=sgd",
    "optim.lr=2.0",
    "optim.warmup_steps=0",
    "optim.weight_decay=0.0",
    "train.threads=1",
    "train.progress=false",
    "train.val_every=0",
    "train.checkpoint_every=0",
    "train.steps=3",
)


def _cfg(out: Path, *overrides: str, recipe: str = "ce") -> FinetuneConfig:
    return load_config(
        FinetuneConfig,
        REPO / "pipelines" / "configs" / "finetune" / f"{recipe}.yaml",
        [f"out={out}", *overrides],
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def _initial(cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    """The job's initialisation (seed, then the model), as its checkpoint names it."""
    seed_everything(cfg.train.seed)
    built = build_model(cfg, [2], seed=cfg.train.seed)
    return {f"model.{k}": v for k, v in built.model.state_dict().items()}


def _assert_same_updates(a: Path, b: Path, init: dict[str, torch.Tensor], rtol: float) -> None:
    """Equal weight changes, up to ``rtol`` of the largest change plus the float32 rounding of the
    weights themselves (a few ulps of the largest weight)."""
    wa, wb = _weights(a), _weights(b)
    moved = 0
    for k, w0 in init.items():
        if not w0.is_floating_point():
            continue
        da, db = wa[k] - w0, wb[k] - w0
        ulps = 4 * torch.finfo(torch.float32).eps * float(w0.abs().max())
        assert_close_scaled(da, db, rtol=rtol, floor=ulps + 1e-12, msg=k)
        moved += bool(db.abs().max() > 0)
    assert moved > 10  # the runs trained (and the comparison is not of zeros)


def test_gradient_accumulation_equals_the_big_batch(tmp_path, one_torch_thread):
    big = _cfg(tmp_path / "big", *EXACT, "train.batch_size=8", "train.accum_steps=1")
    acc = _cfg(tmp_path / "acc", *EXACT, "train.batch_size=4", "train.accum_steps=2")
    ra, rb = run_training(big, quiet=True), run_training(acc, quiet=True)
    assert ra["global_batch"] == rb["global_batch"] == 8 and ra["lr"] == rb["lr"]
    _assert_same_updates(tmp_path / "big", tmp_path / "acc", _initial(big), rtol=1e-4)
    # and the check can fail: micro-batches of 4 without accumulation take other steps
    small = _cfg(tmp_path / "small", *EXACT, "train.batch_size=4", "train.accum_steps=1", "optim.lr=4.0")
    run_training(small, quiet=True)
    with pytest.raises(AssertionError):
        _assert_same_updates(tmp_path / "big", tmp_path / "small", _initial(big), rtol=1e-2)


def test_resume_equals_an_uninterrupted_run(tmp_path, one_torch_thread):
    # batch norm, augmentation and mixup (timm draws λ from numpy's global RNG): all of it resumes
    kw = (
        f"data.train.csv={DEMO_TILES}",
        "train.threads=1",
        "train.progress=false",
        "train.val_every=2",
        "train.checkpoint_every=0",
        "train.log_every=1",
        "train.steps=4",
        "train.batch_size=8",
    )
    whole = _cfg(tmp_path / "whole", *kw, recipe="mixup")
    run_training(whole, quiet=True)
    part = _cfg(tmp_path / "part", *kw, recipe="mixup")
    assert run_training(part, quiet=True, stop_after=2)["steps"] == 2
    assert not (tmp_path / "part" / "metrics.json").exists()  # an interrupted run has no outputs yet
    run_training(part, resume=True, quiet=True)
    wa, wb = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    for k in wa:
        assert_close_scaled(wb[k], wa[k], rtol=1e-6, floor=1e-9, msg=k)
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r, e in zip(rows, ref):
        assert r.keys() == e.keys()
        assert_close_scaled([r[k] for k in r], [e[k] for k in e], rtol=1e-6)
    ma = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert ma["test"]["top1"] == mb["test"]["top1"]
    assert_close_scaled(mb["test"]["loss"], ma["test"]["loss"], rtol=1e-6)


@pytest.mark.ddp
@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path, one_torch_thread):
    args = [f"--out={tmp_path / 'ddp'}", *EXACT, "train.batch_size=4", "train.steps=4"]
    proc = torchrun(
        "-m", "pipelines", "finetune", "--config", str(REPO / "pipelines/configs/finetune/ce.yaml"), *args
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 8 = 4 × 1 accumulation × 2 process(es)" in proc.stderr
    one = _cfg(tmp_path / "one", *EXACT, "train.batch_size=8", "train.steps=4")
    run_training(one, quiet=True)
    _assert_same_updates(tmp_path / "one", tmp_path / "ddp", _initial(one), rtol=1e-4)
    # evaluation gathers every rank's share: the same items and the same numbers
    md = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    mo = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert md[split]["n"] == mo[split]["n"]
        assert_close_scaled(md[split]["loss"], mo[split]["loss"], rtol=1e-4)


def _leaky_table(path: Path) -> str:
    """The demo table with a split column by block, one block's tiles put half in test."""
    rows = read_task_rows(DEMO_TILES)
    groups = sorted({r["group"] for r in rows})
    split_of = {g: ("test" if i % 5 == 0 else "val" if i % 5 == 1 else "train") for i, g in enumerate(groups)}
    leaky = next(g for g in groups if split_of[g] == "train" and sum(r["group"] == g for r in rows) >= 4)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "x", "y", "mpp", "label", "group", "split"])
        k = 0
        for r in rows:
            s = split_of[r["group"]]
            if r["group"] == leaky:
                s = "test" if k % 4 == 0 else "train"  # 1 in 4 of its tiles leak into test
                k += 1
            w.writerow(
                [str(DEMO_TILES.parent / r["slide"]), r["x"], r["y"], r["mpp"], r["label"], r["group"], s]
            )
    return leaky


def test_a_group_straddling_splits_is_refused_or_moved(tmp_path, capsys):
    table = tmp_path / "tiles.csv"
    leaky = _leaky_table(table)
    over = [
        f"data.train.csv={table}",
        "train.steps=1",
        "train.batch_size=8",
        "train.threads=1",
        "train.progress=false",
    ]
    with pytest.raises(
        SplitLeakError,
        match=rf"1 group\(s\) straddle splits in {table}: group '{leaky}' \(train \d+, test \d+\)",
    ):
        run_training(_cfg(tmp_path / "refused", *over), quiet=True)
    assert main(["finetune", "--out", str(tmp_path / "cli"), *over]) == 2  # one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "straddle splits" in err[0] and leaky in err[0]

    run_training(_cfg(tmp_path / "fixed", *over, "data.split.on_leak=fix"), quiet=True)
    report = json.loads((tmp_path / "fixed" / "splits.json").read_text())
    assert report["how"] == "given" and len(report["moves"]) == 1
    assert report["moves"][0].startswith(f"group '{leaky}' (train ") and "-> train" in report["moves"][0]
    rows = read_task_rows(table)
    n_leaky = sum(r["group"] == leaky for r in rows)
    n_train = sum(r["split"] == "train" for r in rows)
    n_test = sum(r["split"] == "test" for r in rows)
    summary = report["summary"]
    moved = -(-n_leaky // 4)  # the leaked tiles went back to train
    assert summary["train"]["items"] == n_train + moved and summary["test"]["items"] == n_test - moved
