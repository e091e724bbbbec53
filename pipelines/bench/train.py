"""``slidestream bench train``: pretraining throughput with streamed tiles vs tensors in memory.

The same model, batch and augmentation run ``--steps`` optimiser steps per window, fed by the
online loader (tiles read and decoded from the slides while training) or by random uint8 tensors
already in memory (the loader-free ceiling). Each feed has its own window — no loader thread or
worker is alive while the in-memory feed is timed (``loader_processes_during_in_memory`` says so)
— and ``--rounds`` alternate them; ``ratio = streamed / in-memory`` steps/s of the best windows;
≥ 0.95 means the loader is not the bottleneck. Each feed also reports process-tree CPU seconds per
step and RSS at the start and end of its window; the streamed feed its decode resources
(``loader_procs_x_threads``) and decoded pixels per delivered pixel. Not a timed test: figures
depend on the machine.

``--probe`` adds the known-answer check of pretraining: a tiny pretraining run on the demo slide
(``--pretrain-steps``), then kNN (k=10, cosine) and linear-probe (logistic regression) accuracy of
frozen features on held-out real-tile tasks — ``source`` (which real slide a tile comes from: the
demo slide vs the TCGA frozen section, given with ``--testdata DIR``) and ``mpp`` (which of 0.5 / 1 / 2 µm/px
a tile was read at) — with train/test tiles from alternating 512 µm squares, for the pretrained
backbone and for the same architecture at random initialisation.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import SHIPPED_CONFIGS, load_config
from pipelines.pretrain import (
    PretrainConfig,
    TensorLoader,
    build_augment,
    build_loader,
    build_method,
    forward_backward,
    probe_views,
)
from pipelines.training import Stream, build_optimizer, param_groups
from wsi.data import DEMO_SLIDE

from .resources import load_avg, measure, worker_pids

DEFAULT_CONFIG = SHIPPED_CONFIGS / "pretrain" / "tiny-cpu.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="pretraining config (default: tiny-cpu)"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per window (after 2 warm-up steps)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="windows per feed, alternating (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--probe", action="store_true", help="also run the kNN / linear-probe known-answer check"
    )
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="steps of the --probe pretraining run"
    )
    parser.add_argument(
        "--testdata",
        type=Path,
        default=None,
        help="folder holding histolab/tcga-cr-7395-01a-01-ts1.svs for the probe's source task",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


class _Feed:
    """One model + optimiser + augmentation fed by one stream; ``step()`` returns its seconds."""

    def __init__(self, cfg: PretrainConfig, stream: Stream | None) -> None:
        torch.manual_seed(cfg.train.seed)
        self.method = build_method(cfg)
        self.opt = build_optimizer(
            param_groups(self.method.student, cfg.optim.weight_decay), cfg.optim.name, lr=1e-4
        )
        self.augment = build_augment(cfg)
        self.gen = torch.Generator().manual_seed(0)
        self.stream = stream
        self.i = 0

    def step(self) -> float:
        tic = time.perf_counter()
        images = self.stream.next()["image"]
        forward_backward(self.method, self.method.student, [self.augment(images, self.gen)], self.i)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.method.finish_step(0.996)
        self.i += 1
        return time.perf_counter() - tic


def _window(feed: _Feed, steps: int, warmup: int) -> dict[str, float]:
    """``warmup`` untimed steps, then ``steps`` timed ones: wall and process-tree CPU seconds, RSS."""
    for _ in range(warmup):
        feed.step()
    with measure() as w:
        for _ in range(steps):
            feed.step()
    return {"seconds": w.wall_s, "cpu_s": w.cpu_s, "rss_start_mb": w.rss_start_mb, "rss_end_mb": w.rss_end_mb}


def throughput(cfg: PretrainConfig, steps: int, warmup: int = 2, rounds: int = 2) -> dict[str, Any]:
    """Streamed vs in-memory feeds, each measured in its own window: the in-memory window runs with
    no loader alive (no reader threads, no workers), the streamed window starts its loader and stops
    it (threads joined, workers shut down) before the next window. Rounds alternate the windows
    (in-memory, streamed, in-memory, ...) so drifting load hits both; the fastest window of each
    feed is reported."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    s = cfg.data.tile_size
    tensors = torch.randint(
        0,
        256,
        (cfg.train.batch_size * 4, 3, s, s),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    in_memory = _Feed(cfg, Stream(TensorLoader(tensors, cfg.train.batch_size)))
    streamed = _Feed(cfg, None)
    windows: dict[str, list[dict]] = {"in_memory": [], "streamed": []}
    read_stats: dict = {}
    children_during_in_memory = 0
    before = set(worker_pids())  # processes this benchmark did not start (another loader's workers)

    def loader_children() -> int:
        return len(set(worker_pids()) - before)

    try:
        for _ in range(rounds):
            children_during_in_memory = max(children_during_in_memory, loader_children())
            windows["in_memory"].append(_window(in_memory, steps, warmup))
            children_during_in_memory = max(children_during_in_memory, loader_children())
            loader = build_loader(cfg)
            streamed.stream = Stream(loader)
            try:
                windows["streamed"].append(_window(streamed, steps, warmup))
                read_stats = loader.read_stats
            finally:
                streamed.stream.close()
                loader.close()
                del loader
                gc.collect()
    finally:
        in_memory.stream.close()
    batch = cfg.train.batch_size
    rates = {}
    for name, ws in windows.items():
        best = min(ws, key=lambda w: w["seconds"])
        rates[name] = {
            "steps_per_s": steps / best["seconds"],
            "images_per_s": steps * batch / best["seconds"],
            "seconds": best["seconds"],
            "cpu_s_per_step": min(w["cpu_s"] for w in ws) / steps,
            "rss_start_mb": round(best["rss_start_mb"], 1),
            "rss_end_mb": round(best["rss_end_mb"], 1),
            "windows": len(ws),
        }
    d = cfg.data
    return {
        "model": cfg.model.arch,
        "method": cfg.ssl.method,
        "batch_size": batch,
        "tile_size": s,
        "global_size": cfg.augment.global_size,
        "steps": steps,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "num_workers": d.num_workers,
        "read_threads": d.read_threads,
        # the streamed feed's processes x decode threads (the training process computes in both)
        "loader_procs_x_threads": max(1, d.num_workers) * d.read_threads,
        "aligned": d.aligned,
        "scaled_decode": d.scaled_decode,
        "decoded_per_delivered": read_stats.get("decoded_per_delivered"),
        "loader_processes_during_in_memory": children_during_in_memory,
        "load_avg": round(load_avg(), 2),
        **rates,
        "ratio": rates["streamed"]["steps_per_s"] / rates["in_memory"]["steps_per_s"],
    }


# --------------------------------------------------------------------------- probe task
PROBE_SLIDES = {  # name -> (path relative to the shipped data or the test-data folder, µm/px when the file lacks it)
    "cmu1": ("shipped", DEMO_SLIDE.name, None),
    "tcga-cr-frozen": ("testdata", "histolab/tcga-cr-7395-01a-01-ts1.svs", 0.25),
}
PROBE_MPPS = (0.5, 1.0, 2.0)


def probe_tiles(
    repo: Path,
    task: str = "mpp",
    tile: int = 64,
    per_label: int = 300,
    block_um: float = 512.0,
    testdata: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Real tissue tiles with labels and a train/test flag for a probe task.

    ``task="mpp"``: which magnification (0.5 / 1.0 / 2.0 µm/px) a tile was read at, over the real
    slides available (colour gives no shortcut: same slides in every class). ``task="source"``:
    which slide a tile comes from (at 1 µm/px). Tissue = mean chroma (max−min channel) ≥ 18 and
    mean brightness ≤ 225. Train and test tiles come from alternating ``block_um`` squares of the
    slide (checkerboard), so no test tile overlaps a training tile."""
    from wsi import open_slide

    mpps = PROBE_MPPS if task == "mpp" else (1.0,)
    pools: dict[tuple[int, bool], list[np.ndarray]] = {}
    names = [f"{m} um/px" for m in mpps] if task == "mpp" else []
    for name, (root, rel, fallback) in PROBE_SLIDES.items():
        base = repo if root == "shipped" else testdata
        if base is None:
            continue
        path = (Path(base) / rel).resolve()
        if not path.exists():
            continue
        if task == "source":
            names.append(name)
        with open_slide(path) as sl:
            slide_mpp = sl.mpp or fallback
        with open_slide(path, mpp=slide_mpp) as sl:
            w, h = sl.dimensions
            bpx = block_um / slide_mpp
            for mi, mpp in enumerate(mpps):
                step = int(round(tile * mpp / slide_mpp))
                for y0 in range(0, h - step + 1, step):
                    for x0 in range(0, w - step + 1, step):
                        img = sl.read_region_mpp((x0, y0), (tile, tile), mpp)
                        chroma = float((img.max(2).astype(int) - img.min(2)).mean())
                        if chroma < 18 or float(img.mean()) > 225:
                            continue
                        label = mi if task == "mpp" else len(names) - 1
                        split = (int(x0 // bpx) + int(y0 // bpx)) % 2 == 0
                        pools.setdefault((label, split), []).append(img)
    rng = np.random.default_rng(0)
    xs, ys, train = [], [], []
    for (label, split), imgs in sorted(pools.items()):
        for i in rng.permutation(len(imgs))[: per_label // 2]:
            xs.append(imgs[i])
            ys.append(label)
            train.append(split)
    return np.stack(xs), np.array(ys), np.array(train), names


@torch.no_grad()
def _features(model: torch.nn.Module, images: np.ndarray, size: int) -> np.ndarray:

    model.eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return torch.cat([model(probe_views(c, size)) for c in x.split(128)]).numpy()


def probe_scores(feats: np.ndarray, labels: np.ndarray, train: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    f = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-8)
    knn = KNeighborsClassifier(n_neighbors=10).fit(f[train], labels[train])
    scaler = StandardScaler().fit(feats[train])
    lin = LogisticRegression(max_iter=3000, C=0.1).fit(scaler.transform(feats[train]), labels[train])
    return {
        "knn_acc": float((knn.predict(f[~train]) == labels[~train]).mean()),
        "linear_acc": float((lin.predict(scaler.transform(feats[~train])) == labels[~train]).mean()),
    }


def probe(
    cfg: PretrainConfig,
    repo: Path,
    pretrain_steps: int | None,
    out: Path,
    tasks: tuple[str, ...] = ("mpp", "source"),
    testdata: Path | None = None,
) -> dict[str, Any]:
    from models import backbones
    from pipelines.pretrain import run

    if pretrain_steps:
        cfg.train.steps = pretrain_steps
    cfg.train.checkpoint_every = 0
    result = run(cfg, out_dir=out)
    torch.manual_seed(cfg.train.seed)
    random_init = backbones.create(cfg.model.arch, img_size=cfg.model.img_size, **cfg.model.timm_kwargs)
    pretrained = backbones.create(None, weights=result["backbone"])  # arch and timm kwargs from metadata
    size = cfg.augment.global_size
    report: dict[str, Any] = {
        "pretrain_steps": cfg.train.steps,
        "loss_first": result["losses"][0],
        "loss_last": result["losses"][-1],
        "tasks": {},
    }
    for task in tasks:
        images, labels, train, names = probe_tiles(repo, task, tile=cfg.data.tile_size, testdata=testdata)
        if len(names) < 2:
            continue  # the source task needs the second real slide (--testdata)
        report["tasks"][task] = {
            "classes": names,
            "n_train": int(train.sum()),
            "n_test": int((~train).sum()),
            "random_init": probe_scores(_features(random_init, images, size), labels, train),
            "pretrained": probe_scores(_features(pretrained, images, size), labels, train),
        }
    return report


def main(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, [*args.overrides, "train.progress=false"])
    report: dict[str, Any] = {"bench": "train", **throughput(cfg, args.steps, rounds=args.rounds)}
    if args.probe:
        repo = DEMO_SLIDE.parent  # the shipped data (wsi.data), also from an installed package
        with tempfile.TemporaryDirectory() as tmp:
            cfg_probe = load_config(PretrainConfig, args.config, args.overrides)
            report["probe"] = probe(cfg_probe, repo, args.pretrain_steps, Path(tmp), testdata=args.testdata)
    if args.json:
        print(json.dumps(report))
        return 0
    s, m = report["streamed"], report["in_memory"]
    print(
        f"{report['model']} ({report['method']}), batch {report['batch_size']}, {report['tile_size']} px tiles, "
        f"{report['threads']} torch threads, loader {report['num_workers']} workers x {report['read_threads']} "
        f"read threads, {report['steps']} steps x {report['rounds']} windows per feed, load avg {report['load_avg']}"
    )
    for name, r in (("streamed tiles", s), ("in-memory", m)):
        print(
            f"  {name:15s}: {r['steps_per_s']:.3f} steps/s  {r['images_per_s']:.1f} images/s  "
            f"{r['cpu_s_per_step']:.2f} CPU s/step  RSS {r['rss_start_mb']:.0f} -> {r['rss_end_mb']:.0f} MB"
        )
    dpd = report["decoded_per_delivered"]
    print(
        f"  streamed: aligned={report['aligned']} scaled_decode={report['scaled_decode']}, decoded/delivered "
        f"{dpd if dpd is None else round(dpd, 2)}; loader processes alive during in-memory windows: "
        f"{report['loader_processes_during_in_memory']}"
    )
    print(
        f"  ratio streamed/in-memory: {report['ratio']:.3f} "
        f"({'loader is not the bottleneck' if report['ratio'] >= 0.95 else 'loader-bound'})"
    )
    if "probe" in report:
        p = report["probe"]
        print(
            f"  probe: pretraining {p['pretrain_steps']} steps, loss {p['loss_first']:.3f} -> {p['loss_last']:.3f}"
        )
        for task, r in p["tasks"].items():
            print(
                f"  task {task} ({', '.join(r['classes'])}; {r['n_train']} train / {r['n_test']} test tiles)"
            )
            for k in ("random_init", "pretrained"):
                print(f"    {k:12s} kNN {r[k]['knn_acc']:.3f}  linear {r[k]['linear_acc']:.3f}")
    sys.stdout.flush()
    return 0
