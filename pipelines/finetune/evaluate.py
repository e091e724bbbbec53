"""Evaluation of a fine-tuned classifier on a split: class probabilities of every item (each rank
predicts its shard; rank 0 gathers them in item order), then ``metrics.json``'s object for the
split (:func:`~pipelines.finetune.metrics.classification_metrics`: ``top1``, ``top5``,
``balanced_accuracy``, ``macro_f1``, ``ece`` and per-class precision, recall, F1, support) and
its figures: a confusion matrix and a reliability diagram per split (and task).

With several tasks the split's object holds the first task's metrics at its top level and every
task's under ``tasks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.augment import normalize, to_float

from ..training import Precision, all_gather_objects
from .data import MISSING
from .metrics import classification_metrics, plot_confusion_matrix, plot_reliability_diagram


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Any,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: torch.device,
    precision: Precision,
) -> dict[str, Any] | None:
    """``{"probs": [(N, K_t) per task], "y": (N, tasks), "loss": mean CE of the first task}`` over
    all ranks (on rank 0; None elsewhere). Runs under ``fork_rng``: evaluating never moves the
    training RNG."""
    was = model.training
    model.eval()
    ids, ys = [], []
    probs: list[list[np.ndarray]] = []
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            x = normalize(to_float(batch["image"]).to(device, non_blocking=True), mean, std)
            with precision.autocast():
                _, logits = model(x)
            probs.append([F.softmax(z.float(), dim=1).cpu().numpy() for z in logits])
            ys.append(batch["y"].numpy())
            ids.append(batch["id"].numpy() if batch["id"] is not None else None)
    model.train(was)
    gathered = all_gather_objects((ids, ys, probs))
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_rank()
    ):
        return None
    all_ids = [i for g in gathered for i in g[0]]
    all_y = [y for g in gathered for y in g[1]]
    all_p = [p for g in gathered for p in g[2]]
    if not all_y:
        return None
    y = np.concatenate(all_y)
    n_tasks = len(all_p[0])
    p = [np.concatenate([b[t] for b in all_p]) for t in range(n_tasks)]
    if all(i is not None for i in all_ids):
        order = np.argsort(np.concatenate(all_ids), kind="stable")
        y, p = y[order], [q[order] for q in p]
    keep = y[:, 0] != MISSING
    eps = 1e-12
    loss = float(-np.log(p[0][keep, y[keep, 0]] + eps).mean()) if keep.any() else float("nan")
    return {"probs": p, "y": y, "loss": loss}


def split_metrics(pred: dict[str, Any], tasks: list[str], classes: list[list[str]]) -> dict[str, Any]:
    """``metrics.json``'s object for one split (see the module docstring)."""
    per_task = {}
    for t, (task, names) in enumerate(zip(tasks, classes)):
        keep = pred["y"][:, t] != MISSING
        if keep.any():
            per_task[task] = classification_metrics(pred["probs"][t][keep], pred["y"][keep, t], names)
    first = per_task.get(tasks[0], {})
    out: dict[str, Any] = {**first, "loss": pred["loss"]}
    if len(tasks) > 1:
        out["tasks"] = per_task
    return out


def split_figures(
    out: str | Path, split: str, pred: dict[str, Any], tasks: list[str], classes: list[list[str]]
) -> list[str]:
    """``confusion_<split>[_<task>].png`` and ``reliability_<split>[_<task>].png`` (atomic)."""
    out = Path(out)
    paths = []
    for t, (task, names) in enumerate(zip(tasks, classes)):
        keep = pred["y"][:, t] != MISSING
        if not keep.any():
            continue
        suffix = f"_{task}" if t else ""
        y, pr = pred["y"][keep, t], pred["probs"][t][keep]
        paths.append(
            str(
                plot_confusion_matrix(
                    out / f"confusion_{split}{suffix}.png",
                    y,
                    pr.argmax(1),
                    names,
                    f"{split}: {task} (n = {len(y)})",
                )
            )
        )
        paths.append(str(plot_reliability_diagram(out / f"reliability_{split}{suffix}.png", pr, y)))
    return paths
