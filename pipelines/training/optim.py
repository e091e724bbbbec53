"""Optimiser components shared by every training job (pretraining, segmentation, MIL, tissue).

- :class:`OptimConfig`: the one optimiser/schedule config every job embeds as ``optim``.
- :func:`param_groups`: weight decay on weights only — none on biases, norm parameters (every
  parameter with ≤ 1 dimension), position embeddings and tokens (``pos_embed``, ``cls_token``,
  ``reg_token``, ``mask_token``, ``dist_token`` and whatever the model's ``no_weight_decay()``
  names); optional layer-wise LR decay for ViTs. Each group carries ``lr_scale`` and ``wd_scale``.
- :func:`build_optimizer`: AdamW or SGD over those groups; :func:`optimizer_for` does both
  from an :class:`OptimConfig`.
- :func:`apply_schedules`: set this step's lr and weight decay on every group (scaled per group).
- :func:`clip_gradients`: global-norm clipping; returns the norm before clipping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(kw_only=True)
class OptimConfig:
    """Optimiser and schedule settings (YAML section ``optim`` of every training job).

    The learning rate warms up linearly from 0 over ``warmup_steps`` optimiser steps, then
    follows a cosine to ``min_lr`` (:func:`pipelines.training.schedules.lr_schedule`). With
    ``lr_scaling: linear`` the peak is ``lr × global_batch / 256`` (Goyal et al.; the rule of the
    "Bag of Tricks"), stated in the job's log. Weight decay applies to weights only (never to
    biases, norm parameters, position embeddings or tokens) and may follow its own cosine from
    ``weight_decay`` to ``weight_decay_end``."""

    name: Literal["adamw", "sgd"] = "adamw"
    #: peak learning rate (with lr_scaling: linear, the peak for a global batch of 256)
    lr: float = 1e-3
    lr_scaling: Literal["none", "linear"] = "none"
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.05
    #: weight decay at the last step (cosine from weight_decay); None keeps it constant
    weight_decay_end: float | None = None
    #: global gradient-norm clipping (None or <= 0: no clipping; the norm is still reported)
    clip_grad: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    #: SGD momentum (Nesterov)
    momentum: float = 0.9
    #: layer-wise learning-rate decay for ViT blocks (e.g. 0.75; None: off)
    layer_decay: float | None = None


NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "dist_token", "register_tokens")


def _no_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            for n in fn():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def _layer_id(name: str, n_layers: int) -> int:
    """ViT layer index for layer-wise decay: embeddings 0, block i → i+1, the rest n_layers+1."""
    if any(t in name for t in ("pos_embed", "cls_token", "reg_token", "patch_embed", "mask_token")):
        return 0
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return n_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Parameter groups for an optimiser: ``weight_decay`` on ≥2-D weights only.

    With ``layer_decay`` (e.g. 0.75) the LR of ViT block i is scaled by
    ``layer_decay ** (n_layers + 1 - (i + 1))`` via the group's ``lr_scale``."""
    skip = _no_decay_names(model)
    n_layers = 0
    if layer_decay is not None:
        ids = [
            int(m.group(1)) for n, _ in model.named_parameters() if (m := re.search(r"blocks\.(\d+)\.", n))
        ]
        n_layers = max(ids) + 1 if ids else 0
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (
            p.ndim <= 1 or name in skip or any(name.endswith(t) or f"{t}." in name for t in NO_DECAY_NAMES)
        )
        lid = _layer_id(name, n_layers) if layer_decay is not None else 0
        key = (no_decay, lid)
        if key not in groups:
            scale = float(layer_decay ** (n_layers + 1 - lid)) if layer_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "wd_scale": 0.0 if no_decay else 1.0,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(
    groups: list[dict],
    name: str = "adamw",
    lr: float = 1e-3,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over ``groups`` (the ``names`` lists are kept out of it)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(clean, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(clean, lr=lr, momentum=momentum, nesterov=True)
    raise ConfigError(f"unknown optimizer {name!r}; use optim.name=adamw or optim.name=sgd")


def optimizer_for(model: nn.Module | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` over ``model``'s :func:`param_groups` (or over ready ``groups``).
    The learning rate is set per step by :func:`apply_schedules`."""
    groups = model if isinstance(model, list) else param_groups(model, cfg.weight_decay, cfg.layer_decay)
    return build_optimizer(groups, cfg.name, cfg.lr, betas=tuple(cfg.betas), momentum=cfg.momentum)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set this step's lr (× each group's ``lr_scale``) and weight decay (× ``wd_scale``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if weight_decay is not None:
            g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (skipped when None or ≤ 0); return the norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        norms = torch.stack([p.grad.detach().float().norm() for p in params])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
