"""``slidestream demo`` (``make demo``): the whole chain on the shipped CC0 slide, in minutes on a
laptop CPU, ending in ``demo-output/index.html``.

Stages: convert to OME-Zarr and read tiles through every backend → tissue masks and QC → streamed
tiles at several µm/px → an archive of slides built from real pixels (positives carry a tile of
another morphology, colours matched) → short DINO and SimCLR pretraining of a tiny ViT →
embedding of the archive with the pretrained encoder → cross-validated MIL with ROC and heatmaps,
next to the mean-pooling shortcut → segmentation fine-tuning on an exact-label task → the
pretrained encoders against random initialisation on the tissue-type probe, next to the
colour-statistics shortcut.

A stage that fails is recorded in the report with its error and the demo goes on with the stages
that do not need its output; the exit code is non-zero when any stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wsi.data import DEMO_SLIDE  # the shipped CC0 slide (package data)

from ..config import SHIPPED_CONFIGS
from .report import Section, write_index


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    from wsi.atomic import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _rel(out: Path, p: Path | str) -> str:
    return str(Path(p).resolve().relative_to(out.resolve()))


class Demo:
    def __init__(self, out: Path, slide: Path, *, quick: bool = False):
        self.out = out
        self.slide = slide
        self.quick = quick
        self.sections: list[Section] = []
        self.state: dict = {}

    def stage(
        self, key: str, title: str, what: str, fn: Callable[[Section], None], needs: tuple[str, ...] = ()
    ) -> None:
        sec = Section(key, title, what)
        self.sections.append(sec)
        n = len(self.sections)
        print(f"\n[{n}] {title} — {what}", file=sys.stderr, flush=True)
        missing = [k for k in needs if k not in self.state]
        if missing:
            sec.status, sec.error = "skipped", f"needs the output of: {', '.join(missing)}"
            print(f"    skipped: {sec.error}", file=sys.stderr)
            return
        t0 = time.perf_counter()
        try:
            fn(sec)
        except Exception as e:  # noqa: BLE001 - a demo stage failing is recorded and shown, not hidden
            sec.status, sec.error = "failed", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        sec.seconds = time.perf_counter() - t0
        print(f"    {sec.status} in {sec.seconds:.1f} s", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ stages
    def convert_and_read(self, sec: Section) -> None:
        from wsi import open_slide
        from wsi.convert import convert

        from ..cli import main as cli

        zarr_path = self.out / "CMU-1-Small-Region.zarr"
        # tile 240 = the source's tile grid: JPEG tiles are copied, not re-encoded
        convert(self.slide, zarr_path, tile=240, codec="jpeg", overwrite=True, progress=True)
        self.state["zarr"] = zarr_path
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            cli(["info", str(self.slide)])
            cli(["info", str(zarr_path)])
        sec.text = buf.getvalue()
        print(sec.text)
        ref = open_slide(self.slide, backend="openslide")
        rng = np.random.default_rng(0)
        W, H = ref.dimensions
        locs = [(int(rng.integers(0, W - 256)), int(rng.integers(0, H - 256))) for _ in range(64)]
        want = [ref.read_region(loc, 0, (256, 256)) for loc in locs]
        for name, url in (("tiff", self.slide), ("zarr", zarr_path), ("openslide", self.slide)):
            with open_slide(url, backend=name) as s:
                t0 = time.perf_counter()
                got = s.read_regions(locs, 0, (256, 256), threads=2)
                dt = time.perf_counter() - t0
                diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(got, want))
            sec.metrics.append((f"{name}: tiles/s", len(locs) / dt, "unaligned 256 px reads, 2 threads"))
            sec.metrics.append(
                (f"{name}: max |Δ| vs OpenSlide", diff, "largest pixel difference to OpenSlide's RGB")
            )
        thumb = ref.get_thumbnail((1024, 1024))
        ref.close()
        _save_png(self.out / "thumbnail.png", thumb)
        sec.figures.append(
            ("thumbnail.png", "thumbnail of the CC0 demo slide (CMU-1-Small-Region, H&E skin)")
        )

    def tissue(self, sec: Section) -> None:
        from ..cli import main as cli

        d = self.out / "tissue"
        rc = cli(
            [
                "tissue",
                "qc",
                "--slides",
                str(self.slide),
                "--out",
                str(d),
                "--tile-mpp",
                "0.5",
                "--tile-size",
                "224",
            ]
        )
        if rc:
            raise RuntimeError(f"slidestream tissue exited with {rc}")
        summary = json.loads((d / "tissue_summary.json").read_text())
        meanings = {
            "method": "U-Net on the thumbnail (shipped weights; Otsu when they are missing)",
            "tissue_fraction": "share of the slide covered by tissue",
            "tiles": "224 px tiles at 0.5 µm/px with ≥ 40 % tissue (blue boxes in the QC image)",
        }
        for row in summary["done"]:
            for k, meaning in meanings.items():
                sec.metrics.append((k, row[k], meaning))
        for p in sorted(d.glob("*_qc.png")):
            sec.figures.append(
                (_rel(self.out, p), "QC: tissue contour (mask) and the grid tiles kept for embedding")
            )

    def stream(self, sec: Section) -> None:
        from wsi.loader import TileDataset, save_mosaic_per_mpp

        ds = TileDataset(
            [str(self.slide)], mode="random", mpps=(0.25, 0.5, 1.0, 2.0), tile_size=128, seed=0, upsample=True
        )
        t0 = time.perf_counter()
        shown = save_mosaic_per_mpp(ds, self.out / "mosaic.png", per_mpp=12, ncols=12)
        dt = time.perf_counter() - t0
        sec.metrics.append(
            (
                "tiles per magnification",
                {f"{k:g} µm/px": v for k, v in shown.items()},
                "streamed tissue tiles shown per µm/px (0.25 is upsampled: the slide is 0.499 µm/px)",
            )
        )
        sec.metrics.append(("seconds", dt, "time to stream and draw them (no tile written to disk)"))
        sec.figures.append(("mosaic.png", "tiles streamed online from tissue at 0.25, 0.5, 1 and 2 µm/px"))

    def archive(self, sec: Section) -> None:
        from wsi.atomic import atomic_path

        from ..tasks import make_real_slides

        n = 24 if self.quick else 40
        info = make_real_slides(
            self.out / "archive", n_slides=n, size=896, tile=224, region_tiles=1, seed=0, demo_path=self.slide
        )
        self.state["archive"] = info
        labels = self.out / "archive" / "labels.csv"
        with atomic_path(labels) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", "label"])
            for s in info["slides"]:
                w.writerow([s["slide_id"], "positive" if s["label"] else "negative"])
        self.state["labels"] = labels
        pos = sum(s["label"] for s in info["slides"])
        sec.metrics.append(
            ("slides", len(info["slides"]), "pyramidal TIFFs cut from the demo slide's real pixels")
        )
        sec.metrics.append(
            ("positives", pos, f"slides carrying one 224 px tile of another tissue ({info['other_tissue']})")
        )

    def pretrain(self, sec: Section) -> None:
        from ..config import SHIPPED_CONFIGS, load_config
        from ..pretrain import PretrainConfig, run

        steps = 30 if self.quick else 120
        encoders = {}
        for method, config, meaning in (
            (
                "dino",
                "tiny-cpu.yaml",
                "DINO cross-entropy between teacher and student views (ln 1024 = 6.93 is a "
                "uniform teacher); at this tiny CPU scale it does not settle in two minutes",
            ),
            (
                "simclr",
                "simclr-tiny-cpu.yaml",
                "SimCLR InfoNCE loss; it falls as views of the same tile are matched",
            ),
        ):
            cfg = load_config(
                PretrainConfig,
                SHIPPED_CONFIGS / "pretrain" / config,
                overrides=[
                    f"data.slides=[{json.dumps(str(self.slide))}]",
                    f"train.steps={steps}",
                    "train.checkpoint_every=1000",
                    "train.rankme_every=20",
                    "optim.warmup_steps=10",
                    # one torch thread: the tile reader threads use the other core, and OpenMP's
                    # spinning threads slow a small model 5-20x when cores are oversubscribed
                    "train.threads=1",
                ],
            )
            res = run(cfg, out_dir=self.out / "pretrain" / method)
            encoders[method] = Path(res["backbone"])
            losses = [float(v) for v in res["losses"]]
            k = max(1, len(losses) // 10)
            sec.metrics.append(
                (
                    f"{method}: loss, mean of first → last {k} steps",
                    [sum(losses[:k]) / k, sum(losses[-k:]) / k],
                    meaning,
                )
            )
            for name, what in (
                ("loss.png", "loss per step"),
                (
                    "rankme.png",
                    "RankMe: effective rank of embeddings of a fixed probe set (higher = less collapse)",
                ),
            ):
                if (self.out / "pretrain" / method / name).exists():
                    sec.figures.append((f"pretrain/{method}/{name}", f"{method}: {what}"))
        sec.metrics.append(("steps", steps, "optimizer steps per method, tiles streamed from the demo slide"))
        self.state["encoders"] = encoders
        self.state["encoder"] = encoders[
            "simclr"
        ]  # the one whose loss falls at this scale embeds the archive

    def embed(self, sec: Section) -> None:
        from ..embed import embed_slides

        slides = [s["path"] for s in self.state["archive"]["slides"]]
        summary = embed_slides(
            slides,
            str(self.state["encoder"]),
            out=self.out / "features",
            mpp=0.5,
            tile_size=224,
            batch_size=32,
            read_threads=1,
            progress=True,
        )
        if not summary.ok:
            raise RuntimeError(f"{len(summary.failed)} slides failed: {summary.table()}")
        self.state["features"] = self.out / "features"
        sec.metrics.append(("slides embedded", len(slides), "one CLAM/TRIDENT-compatible .h5 per slide"))
        sec.metrics.append(
            ("tiles", summary.n_tiles, "224 px tissue tiles at 0.5 µm/px, embedded by the pretrained ViT")
        )
        sec.text = summary.table()

    def mil(self, sec: Section) -> None:
        from ..cli import main as cli

        d = self.out / "mil"
        rc = cli(
            [
                "mil",
                "train",
                "--features",
                str(self.state["features"]),
                "--labels",
                str(self.state["labels"]),
                "--config",
                str(SHIPPED_CONFIGS / "mil" / "abmil.yaml"),
                "--folds",
                "3",
                "--out",
                str(d),
                "--no-progress",
            ]
        )
        if rc:
            raise RuntimeError(f"slidestream mil train exited with {rc}")
        metrics = json.loads((d / "metrics.json").read_text())
        self._mil_metrics(sec, metrics)
        from ..mil import load_dataset
        from ..tasks import mean_pool_oof_auroc

        ds = load_dataset(self.state["labels"], self.state["features"])
        folds = json.loads((d / "model.json").read_text())["folds"]
        fold_of = {sid: f["fold"] for f in folds for sid in f["test_slides"]}
        shortcut = mean_pool_oof_auroc(
            ds.bags, ds.targets[ds.tasks[0]], np.array([fold_of[s] for s in ds.slide_ids])
        )
        sec.metrics.append(
            (
                "mean-pool shortcut AUROC",
                shortcut,
                "the shortcut: logistic regression on each slide's mean feature, same folds (0.5 = "
                "chance); one tile in 16 moves the mean little, unless the features set it far apart",
            )
        )
        sec.figures.append(
            ("mil/roc.png", "ROC curves of the held-out folds (positives = slides with the other tissue)")
        )
        pos = next(s for s in self.state["archive"]["slides"] if s["label"])
        hm = d / "heatmap"
        rc = cli(
            [
                "mil",
                "heatmap",
                "--model",
                str(d),
                "--features",
                str(self.state["features"] / f"{pos['slide_id']}.h5"),
                "--slide",
                pos["path"],
                "--out",
                str(hm),
                "--geojson",
            ]
        )
        if rc:
            raise RuntimeError(f"slidestream mil heatmap exited with {rc}")
        sec.figures.append(
            (
                "mil/heatmap/heatmap.png",
                f"attention heatmap of {pos['slide_id']}: the inserted tissue is at level-0 box {pos['region']}",
            )
        )

    @staticmethod
    def _mil_metrics(sec: Section, metrics: dict) -> None:
        def find(d, key):
            if isinstance(d, dict):
                if key in d:
                    return d[key]
                for v in d.values():
                    r = find(v, key)
                    if r is not None:
                        return r
            return None

        for key, meaning in (
            ("auroc", "area under the ROC curve, out-of-fold (1 = perfect, 0.5 = chance)"),
            ("balanced_accuracy", "mean of per-class recall"),
            ("f1", "F1 score of the positive class"),
        ):
            v = find(metrics.get("pooled", metrics), key)
            if v is not None:
                sec.metrics.append((key, v, meaning))

    def segment(self, sec: Section) -> None:
        from .segmentation import demo_segmentation

        res = demo_segmentation(self.out / "segment", minutes_budget=0.75 if self.quick else 1.5)
        for cls, dice in zip(res["classes"], res["dice"]):
            sec.metrics.append(
                (
                    f"Dice · {cls}",
                    dice,
                    "overlap of prediction and exact label on a held-out slide (1 = perfect)",
                )
            )
        sec.metrics.append(("steps", res["steps"], "optimizer steps that fit the time budget"))
        sec.figures.append(("segment/overlay.png", "prediction on a held-out slide next to its exact labels"))

    def evaluate(self, sec: Section) -> None:
        from .probe import demo_probe

        enc = self.state["encoders"]
        res = demo_probe(
            {"random init": "vit_tiny_patch16_224", "dino": str(enc["dino"]), "simclr": str(enc["simclr"])},
            self.out / "eval",
            quick=self.quick,
        )
        sec.text = (self.out / "eval" / "results.md").read_text()
        where = (
            f"tissue-type probe ({', '.join(res['task']['classes'])}; {res['task']['n_train']} training and "
            f"{res['task']['n_test']} test tiles in separate blocks, colours matched)"
        )
        acc: dict[str, float] = {}
        for r in res["rows"]:
            if r["probe"] in ("linear", "knn"):
                s = r["balanced_accuracy"]
                acc[f"{r['label']} {r['probe']}"] = s.mean
                runs = f"mean of {s.n} seeds, sd {s.sd:.3f}" if s.sd is not None else "one deterministic run"
                sec.metrics.append(
                    (f"{r['label']} · {r['probe']} · balanced acc", s.mean, f"{where}; {runs}")
                )
        for probe in ("linear", "knn"):
            sec.metrics.append(
                (
                    f"colour-statistics shortcut · {probe} · balanced acc",
                    res["shortcut"][probe],
                    "the same probe on each tile's colour mean, spread and histogram: chance is 1/3",
                )
            )
        best = max(("dino", "simclr"), key=lambda m: acc[f"{m} linear"])
        verdict = "beats" if acc[f"{best} linear"] > acc["random init linear"] else "does not beat"
        sec.metrics.append(
            (
                "pretraining vs random init",
                f"{best} {verdict} random init (linear {acc[f'{best} linear']:.3f} vs {acc['random init linear']:.3f})",
                "at demo scale (minutes of CPU); README gives the figure and command of a longer run",
            )
        )

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        t0 = time.perf_counter()
        self.stage(
            "convert",
            "Convert and read",
            "OME-Zarr conversion, slidestream info, tiles through every backend",
            self.convert_and_read,
        )
        self.stage(
            "tissue", "Tissue masks", "U-Net foreground mask on the thumbnail, QC overlay", self.tissue
        )
        self.stage(
            "stream", "Streamed tiles", "online tiles from tissue at several magnifications", self.stream
        )
        self.stage(
            "archive",
            "Demo archive",
            "slides built from real pixels with a known positive region",
            self.archive,
        )
        self.stage(
            "pretrain",
            "Pretraining",
            "short DINO pretraining of a tiny ViT on the streamed tiles",
            self.pretrain,
        )
        self.stage(
            "embed",
            "Embedding",
            "features of every tissue tile of the archive with the pretrained encoder",
            self.embed,
            needs=("archive", "encoder"),
        )
        self.stage(
            "mil",
            "MIL",
            "gated-attention MIL, 3-fold cross-validation, ROC and heatmap",
            self.mil,
            needs=("features", "labels"),
        )
        self.stage(
            "segment",
            "Segmentation",
            "fine-tune a small U-Net on an exact-label task from real tissue",
            self.segment,
        )
        self.stage(
            "eval",
            "Evaluation",
            "linear probe, kNN and few-shot on tissue types: pretrained vs random-init ViT",
            self.evaluate,
            needs=("encoder",),
        )
        total = time.perf_counter() - t0
        index = write_index(
            self.out,
            self.sections,
            total_seconds=total,
            header=f"Run on {self.slide.name} (CC0) and slides generated from its pixels.",
        )
        failed = [s.key for s in self.sections if s.status != "ok"]
        print(f"\ndemo finished in {total:.0f} s; open {index}", file=sys.stderr)
        if failed:
            print(f"stages not ok: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="output directory (replaced)")
    p.add_argument(
        "--slide", default=str(DEMO_SLIDE), help="the slide to run on (default: the shipped CC0 slide)"
    )
    p.add_argument("--quick", action="store_true", help="smaller settings (used by the test suite)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    slide = Path(args.slide)
    if not slide.exists():
        print(f"slidestream demo: slide not found: {slide}", file=sys.stderr)
        return 2
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return Demo(out, slide, quick=args.quick).run()
