"""The loss of one micro-batch for each recipe (``loss.name``), on the losses of
:mod:`models.finetune` (formulas and papers in their docstrings):

- ``ce``: cross-entropy with ``label_smoothing`` (torch's), or timm's soft-target cross-entropy on
  mixup/cutmix batches (``loss.mixup``; smoothing folded into the soft targets); several tasks
  (label columns) are combined by learned uncertainty weighting (``loss.multitask``);
- ``kd``: ``(1 − α)·CE + α·τ²·KL(p_teacher^τ ‖ p^τ)`` with any trained classifier as teacher (its
  logits cached per item when its input never changes: no augmentation, no mixup);
- ``tfkd_self``: the same loss with a trained copy of the student (same architecture) as teacher;
- ``tfkd_reg``: KD from the hand-designed virtual teacher;
- ``self_distill``: two distorted views through the network, CE on both plus KL each way;
- ``supcon``: stage 1 the supervised contrastive loss of two views' projections (the encoder and
  the projection head train), stage 2 cross-entropy of the linear head on the frozen encoder.

Each returns ``(loss, logits of the first task, targets)`` — the last two for the running
training accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.augment import normalize
from models.finetune import (
    TeacherLogitCache,
    UncertaintyWeighting,
    criterion,
    kd_loss,
    self_distillation_loss,
    supcon_loss,
    tfkd_reg_loss,
)

from .config import FinetuneConfig
from .data import MISSING
from .loaders import Augment


class Trainable(nn.Module):
    """What the optimiser updates and DDP synchronises: the classifier and, for several tasks,
    the uncertainty weights. ``forward`` is the classifier's."""

    def __init__(self, model: nn.Module, n_tasks: int, weighting: str) -> None:
        super().__init__()
        self.model = model
        self.weighting = UncertaintyWeighting(n_tasks) if n_tasks > 1 and weighting == "uncertainty" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model(x)


class Projected(nn.Module):
    """SupCon stage 1: the encoder's features through the projection head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.project(self.model.encoder(x))


@dataclass
class Teacher:
    """A frozen teacher with its own input normalisation, and an optional per-item logit cache."""

    model: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cache: TeacherLogitCache | None = None

    @torch.no_grad()
    def logits(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        def run() -> torch.Tensor:
            return self.model(normalize(x, self.mean, self.std))[1][0].float()

        if self.cache is not None and ids is not None:
            return self.cache(ids, run).to(x.device)
        return run()


@dataclass
class Objective:
    """Everything a recipe's loss needs besides the batch (built once by the training loop)."""

    cfg: FinetuneConfig
    n_classes: list[int]
    augment: Augment
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mixup: Any = None
    teacher: Teacher | None = None

    def _views(self, images: torch.Tensor, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        return self.augment(images, gen).to(device, non_blocking=True)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)

    def __call__(
        self, net: nn.Module, batch: dict, gen: torch.Generator, device: torch.device, *, stage: int = 2
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss of one micro-batch (``net``: the DDP-wrapped :class:`Trainable`, or
        :class:`Projected` in SupCon's stage 1)."""
        L = self.cfg.loss
        y = batch["y"].to(device, non_blocking=True)
        if L.name == "supcon" and stage == 1:
            v = torch.cat([self._views(batch["image"], gen, device) for _ in range(2)])
            z = F.normalize(net(self._input(v)).float(), dim=1)
            b = y.shape[0]
            feats = torch.stack([z[:b], z[b:]], dim=1)
            return (
                supcon_loss(
                    feats, y[:, 0], temperature=L.supcon.temperature, base_temperature=L.supcon.temperature
                ),
                z[:b, :0],
                y[:, 0],
            )
        if L.name == "self_distill":
            v = torch.cat([self._views(batch["image"], gen, device) for _ in range(2)])
            f, logits = net(self._input(v))
            b = y.shape[0]
            z1, z2 = logits[0][:b], logits[0][b:]
            loss = self_distillation_loss(
                z1,
                z2,
                y[:, 0],
                weight=L.self_distill.weight,
                features=(f[:b], f[b:]),
                mmd_weight=L.self_distill.mmd_weight,
            )
            return loss, z1, y[:, 0]
        x = self._views(batch["image"], gen, device)
        target: torch.Tensor = y[:, 0]
        if self.mixup is not None:
            x, target = self.mixup(x, y[:, 0])
        _, logits = net(self._input(x))
        z = logits[0]
        if L.name in ("kd", "tfkd_self"):
            assert self.teacher is not None
            t = self.teacher.logits(x, batch.get("id"))
            loss = kd_loss(z, t, target, alpha=L.kd.alpha, temperature=L.kd.temperature)
        elif L.name == "tfkd_reg":
            r = L.tfkd_reg
            loss = tfkd_reg_loss(
                z, target, alpha=r.alpha, temperature=r.temperature, correct_prob=r.correct_prob
            )
        else:
            soft = self.mixup is not None
            ce = criterion(0.0 if soft else L.label_smoothing, soft_targets=soft)
            losses = [ce(z.float(), target)] if soft else []
            for k in range(1 if soft else 0, len(logits)):
                yk = y[:, k]
                has = yk != MISSING  # a multi-task table may leave a task's cell empty
                losses.append(
                    ce(logits[k][has].float(), yk[has]) if bool(has.any()) else logits[k].sum() * 0.0
                )
            weighting = getattr(_unwrap(net), "weighting", None)
            loss = weighting(losses) if weighting is not None else torch.stack(losses).sum()
        return loss, z, target


def _unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)


def train_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 of a training batch (soft targets: their argmax); NaN when there are no logits."""
    if logits.numel() == 0 or logits.shape[1] == 0:
        return float("nan")
    t = target.argmax(1) if target.ndim == 2 else target
    keep = t != MISSING
    if not bool(keep.any()):
        return float("nan")
    return float((logits.detach().argmax(1)[keep] == t[keep]).float().mean())
