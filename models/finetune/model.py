"""The fine-tuned classifier and what decides how its encoder trains.

:class:`Classifier`: an encoder (a timm backbone built with ``num_classes=0``, returning pooled
features (B, D)) and one linear head per task; optionally a projection head (SupCon).

**Which parameters train** (:func:`set_trainable`): ``full`` (all), ``linear`` (a linear probe:
the encoder frozen) or ``last_n`` (the last N *blocks* of the encoder and what follows them).
Blocks are timm's own parameter groups (``model.group_matcher(coarse=False)``, as timm's
layer-decay code groups them: ViT ``blocks.i``, ResNet ``layerS.i``, ConvNeXt ``stages.S.blocks.i``);
trailing groups holding only 1-D parameters (a final norm, e.g. ConvNeXt's ``head.norm``) always
train and do not count as blocks. Batch-norm layers whose parameters are all frozen stay in eval
mode while the classifier trains (their running statistics are part of the frozen encoder).

**Zero-γ initialisation** (:func:`zero_init_residual`; He et al., "Bag of Tricks", 2019, after
Goyal et al. 2017): every residual block ``x + F(x)`` starts as the identity, ``F(x) = 0``.

- ResNet-style blocks whose branch ends in a norm: the last norm's γ is 0 — timm's
  ``zero_init_last()`` of each block (ResNet ``bn2``/``bn3``, and any timm block that has it).
- ViT blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` have no norm at the end of a branch.
  The literal analogue is LayerScale's γ (Touvron et al. 2021): where the block has LayerScale
  (timm ``ls1``/``ls2`` with ``gamma``, built when ``init_values`` is given) its γ is set to 0.
  Otherwise the last linear layer of each branch — the attention output projection
  ``attn.proj`` and the MLP's ``fc2`` — starts at zero (weight and bias), which makes the block
  the identity in the same way; its gradient is not zero (its input is not), so it trains.
- Architectures with neither are left as timm initialises them (ConvNeXt's own LayerScale starts
  at 1e-6, close to this already).

Zero-γ is an initialisation: it is applied to randomly initialised encoders only, never on top
of pretrained weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Mode = Literal["full", "linear", "last_n"]


class Classifier(nn.Module):
    """``encoder`` (features (B, ``dim``)) + one linear head per task (``n_classes``) + an optional
    projection head (``proj_dim``: Linear → ReLU → Linear, as SupCon's)."""

    def __init__(
        self,
        encoder: nn.Module,
        dim: int,
        n_classes: Sequence[int],
        *,
        head_dropout: float = 0.0,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not n_classes or min(n_classes) < 2:
            raise ValueError(f"every task needs at least 2 classes, got {list(n_classes)}")
        self.encoder = encoder
        self.dim = int(dim)
        self.dropout = nn.Dropout(head_dropout)
        self.heads = nn.ModuleList(nn.Linear(dim, int(k)) for k in n_classes)
        self.projector = (
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, int(proj_dim)))
            if proj_dim
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(features (B, D), [logits (B, K_t) per task])``."""
        f = self.encoder(x)
        h = self.dropout(f)
        return f, [head(h) for head in self.heads]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projection head's output (SupCon normalises it)."""
        if self.projector is None:
            raise RuntimeError("this classifier was built without a projection head (proj_dim)")
        return self.projector(features)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters(recurse=False)
                ):
                    m.eval()
        return self


def block_groups(encoder: nn.Module) -> list[list[str]]:
    """The encoder's parameter names grouped by timm's ``group_matcher(coarse=False)``, in order
    (stem first)."""
    matcher = getattr(encoder, "group_matcher", None)
    if not callable(matcher):
        raise ValueError(
            f"{type(encoder).__name__} has no timm group_matcher, so its blocks are unknown; "
            "use model.mode=full or linear"
        )
    from timm.models import group_parameters

    groups = group_parameters(encoder, matcher(coarse=False))
    return [list(groups[k]) for k in sorted(groups)]


def set_trainable(model: Classifier, mode: Mode, last_n: int = 1) -> list[str]:
    """Freeze what ``mode`` leaves out (see the module docstring); return the names of the
    encoder parameters that train. Heads and projector always train."""
    enc = model.encoder
    params = dict(enc.named_parameters())
    if mode == "full":
        keep = set(params)
    elif mode == "linear":
        keep = set()
    elif mode == "last_n":
        groups = block_groups(enc)
        tail: list[str] = []
        while groups and all(params[n].ndim <= 1 for n in groups[-1]):
            tail += groups.pop()
        blocks = groups[1:]  # group 0 is the stem / embeddings
        if not 1 <= last_n <= len(blocks):
            raise ValueError(
                f"model.last_n={last_n}: the encoder has {len(blocks)} blocks; use 1..{len(blocks)}"
            )
        keep = set(tail).union(*blocks[-last_n:])
    else:
        raise ValueError(f"unknown mode {mode!r}; use full, linear or last_n")
    for name, p in params.items():
        p.requires_grad_(name in keep)
    for p in [*model.heads.parameters(), *(model.projector.parameters() if model.projector else [])]:
        p.requires_grad_(True)
    return [n for n in params if n in keep]


def zero_init_residual(encoder: nn.Module) -> list[str]:
    """Zero-γ initialisation of every residual block (see the module docstring); returns the
    names of the parameters set to zero (empty when the architecture has no such blocks)."""
    zeroed: list[str] = []
    for name, m in encoder.named_modules():
        prefix = f"{name}." if name else ""
        fn = getattr(m, "zero_init_last", None)
        if callable(fn) and m is not encoder:
            fn()
            zeroed += [
                prefix + n
                for n, p in m.named_parameters()
                if p.ndim == 1 and n.endswith("weight") and not bool(p.detach().any())
            ]
            continue
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        proj, fc2 = getattr(attn, "proj", None), getattr(mlp, "fc2", None)
        if not (isinstance(proj, nn.Linear) and isinstance(fc2, nn.Linear)):
            continue
        ls = [getattr(m, k, None) for k in ("ls1", "ls2")]
        with torch.no_grad():
            if all(isinstance(getattr(s, "gamma", None), nn.Parameter) for s in ls):
                for k, s in zip(("ls1", "ls2"), ls):
                    s.gamma.zero_()
                    zeroed.append(f"{prefix}{k}.gamma")
                continue
            for path, lin in (("attn.proj", proj), ("mlp.fc2", fc2)):
                lin.weight.zero_()
                zeroed.append(f"{prefix}{path}.weight")
                if lin.bias is not None:
                    lin.bias.zero_()
                    zeroed.append(f"{prefix}{path}.bias")
    return zeroed
