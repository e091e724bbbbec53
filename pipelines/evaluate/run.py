"""``slidestream eval``: eva-style evaluation of one or several encoders side by side.

Patch tasks (a folder per class, or an HDF5/Zarr of tiles and labels; see
:mod:`pipelines.evaluate.patch_tasks`): features from each frozen encoder, then a linear probe
(early stopping), kNN (k = 20, cosine) and few-shot (SimpleShot): top-1, top-5, balanced accuracy
and macro-F1. Slide tasks (embedding + MIL cross-validation) and segmentation tasks (frozen encoder
+ 1×1 decoder): see :mod:`pipelines.evaluate.tasks`. Every seed of ``--seeds`` is a run of each
probe that depends on a seed (the linear probe, few-shot, MIL, the segmentation decoder); kNN has
no seed and runs once. A figure is the mean over its runs; a spread (sample sd) is reported only
when at least two runs measured it, with the number of runs (:class:`~.probes.Stat`). Results go
to ``results.csv``, ``results.json`` and a Markdown table per task in ``results.md`` in ``--out``;
the tables are also printed.

Encoders are loaded and their inputs prepared by :func:`models.encoders.load_encoder`: timm names
(seed-0 random init: nothing is downloaded), a ``.safetensors`` file exported by ``slidestream
pretrain`` (evaluated at the crop size and normalisation it was trained with), or ``name=path``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.encoders import Encoder, load_encoder, parse_encoder

from ..errors import ConfigError
from .config import SegTaskConfig, SlideTaskConfig
from .patch_tasks import PatchTask, load_patch_task
from .probes import Stat, few_shot, knn, linear_probe, summarise


@torch.inference_mode()
def extract_features(
    encoder: Encoder | torch.nn.Module, images: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """Pooled features of uint8 tiles (N, H, W, 3), resized to the encoder's input size and
    normalised as it expects (:meth:`models.encoders.Encoder.features`)."""
    if not isinstance(encoder, Encoder):
        encoder = load_encoder(encoder, next(encoder.parameters()).device)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        out.append(encoder.features(x, resize=True).cpu().numpy())
    return np.concatenate(out)


def evaluate_patch_task(
    task: PatchTask,
    train_feats: np.ndarray,
    test_feats: np.ndarray,
    *,
    seeds: list[int],
    shots: int = 5,
    k: int = 20,
) -> dict[str, dict[str, Stat]]:
    """Per probe: metric -> :class:`Stat` — over ``seeds`` for the linear probe and few-shot, one
    run for kNN (deterministic: repeating it would report a spread of 0 that was never measured)."""
    if not seeds:
        raise ValueError("evaluate_patch_task needs at least one seed")
    args = (train_feats, task.train_labels, test_feats, task.test_labels, task.n_classes)
    return {
        "linear": summarise([linear_probe(*args, seed=s).as_dict() for s in seeds], "seeds"),
        "knn": summarise([knn(*args, k=k).as_dict()], "run"),
        f"{shots}-shot": summarise([few_shot(*args, shots=shots, seed=s).as_dict() for s in seeds], "seeds"),
    }


def _runs(stats: list[Stat]) -> tuple[int, str]:
    """The row's number of runs (the most any metric was measured over) and what they differ in."""
    best = max(stats, key=lambda s: s.n)
    return best.n, best.over


def _cell(s: Stat, n: int) -> str:
    # a metric measured over fewer runs than its row (an undefined AUROC in a fold) says so
    return str(s) if s.n in (0, n) else f"{s} (n={s.n})"


PATCH_METRICS = ["top1", "top5", "balanced_accuracy", "macro_f1"]


def write_results(rows: list[dict], out: Path) -> str:
    """Write CSV, JSON and one Markdown table per task; return the Markdown.

    A row is ``{"task", "encoder", "probe", <metric>: Stat, ...}``. The table says over how many
    runs each row was measured (``runs``: e.g. ``3 seeds``, ``1 run``); a cell is ``mean ± sd``
    when a spread was measured, else the value alone. JSON and CSV hold ``<metric>_mean``,
    ``<metric>_sd`` (empty / null when not measured) and ``<metric>_n``."""
    import io

    from wsi.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    fixed = ("task", "encoder", "probe")
    tables, flat_rows = [], []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        metrics = list(dict.fromkeys(k for r in mine for k in r if k not in fixed))
        header = [*fixed, "runs", *metrics]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in mine:
            n, over = _runs([r[m] for m in metrics if m in r])
            runs = f"{n} {over if n != 1 else over.rstrip('s')}"
            cells = [_cell(r[m], n) if m in r else "—" for m in metrics]
            lines.append("| " + " | ".join([r["task"], r["encoder"], r["probe"], runs, *cells]) + " |")
            flat = {**{k: r[k] for k in fixed}, "runs": runs}
            for m in metrics:
                s = r.get(m, Stat(math.nan, None, 0, over))
                flat[f"{m}_mean"], flat[f"{m}_sd"], flat[f"{m}_n"] = s.mean, s.sd, s.n
            flat_rows.append(flat)
        tables.append("\n".join(lines))
    md = "\n\n".join(tables) + "\n"
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps(flat_rows, indent=2, allow_nan=True))
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for r in flat_rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=columns or list(fixed), restval="")
    writer.writeheader()
    writer.writerows(flat_rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    return md


def run_eval(
    encoders: list[str],
    patch_tasks: list[str | Path | PatchTask],
    out: str | Path,
    *,
    slide_tasks: list[str | SlideTaskConfig] = (),
    seg_tasks: list[str | SegTaskConfig] = (),
    seeds: list[int] = (0, 1, 2),
    shots: int = 5,
    k: int = 20,
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict]:
    """Evaluate every encoder on every task; returns the result rows (also written to out).

    ``seeds``: one run per seed of every seeded probe (see the module docstring)."""
    from tqdm import tqdm

    from .tasks import check_slide_task, parse_seg_task, parse_slide_task, run_seg_task, run_slide_task

    if not seeds:
        raise ConfigError("slidestream eval: --seeds needs at least one seed (e.g. --seeds 0,1,2)")
    out = Path(out)
    tasks = [t if isinstance(t, PatchTask) else load_patch_task(t) for t in patch_tasks]
    slides = [parse_slide_task(t) if isinstance(t, str) else t for t in slide_tasks]
    for st in slides:
        check_slide_task(st)
    segs = [parse_seg_task(t) if isinstance(t, str) else t for t in seg_tasks]
    specs = [parse_encoder(e) for e in encoders]
    rows: list[dict] = []
    total = len(specs) * (len(tasks) + len(slides) + len(segs))
    bar = tqdm(total=total, desc="eval", unit="task", disable=not progress, file=sys.stderr)
    for i, spec in enumerate(specs):
        enc = load_encoder(spec, "cpu")
        for task in tasks:
            t0 = time.perf_counter()
            tr = extract_features(enc, task.train_images, batch_size)
            te = extract_features(enc, task.test_images, batch_size)
            for probe, res in evaluate_patch_task(task, tr, te, seeds=list(seeds), shots=shots, k=k).items():
                rows.append({"task": task.name, "encoder": spec.label, "probe": probe, **res})
            bar.set_postfix_str(f"{spec.label} on {task.name}: {time.perf_counter() - t0:.1f}s")
            bar.update()
        for st in slides:
            res = run_slide_task(st, encoders[i], out / f"enc{i}" / st.name, seeds=list(seeds))
            rows.append({"task": st.name, "encoder": spec.label, "probe": f"mil-{st.head}", **res})
            bar.update()
        for sg in segs:
            res = run_seg_task(sg, encoders[i], out / f"enc{i}" / sg.name, seeds=list(seeds))
            rows.append({"task": sg.name, "encoder": spec.label, "probe": "1x1 decoder (frozen)", **res})
            bar.update()
    bar.close()
    write_results(rows, out)
    return rows
