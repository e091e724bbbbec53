"""SimCLR (Chen et al. 2020): projection head and the NT-Xent / InfoNCE loss.

For a batch of N pairs, the 2N normalised projections ``z`` form logits ``z_i·z_j / τ``; the
positive of row i is its other view, its own similarity is masked out, and the loss is the mean
cross-entropy over all 2N rows.

Negatives across ranks: with ``gather=True`` (default) and torch.distributed initialised, every
rank all-gathers the projections with ``torch.distributed.nn.functional.all_gather`` (which carries
gradients back to the rank that produced them), so each row sees the 2·N·world_size − 2 negatives
of the global batch, as in the paper. With ``gather=False`` negatives are local to each rank.
Gradient accumulation changes the set of negatives, so for SimCLR it is not equivalent to one big
batch (for DINO it is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear → (BatchNorm) → ReLU → Linear, the SimCLR projection MLP."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, use_bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SimCLRModel(nn.Module):
    """Backbone + projection head applied to a list of views (one pass per view size)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(views, torch.Tensor):
            views = [views]
        return self.head(self.backbone(torch.cat(list(views))))


def _gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(z)
    return torch.cat(parts), dist.get_rank()


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True
) -> torch.Tensor:
    """NT-Xent loss of paired projections ``z1[i] ↔ z2[i]`` (each (N, D); normalised here)."""
    n = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    rank = 0
    if gather:
        all1, rank = _gather_with_grad(z1)
        all2, _ = _gather_with_grad(z2)
    else:
        all1, all2 = z1, z2
    m = all1.shape[0]  # pairs in the (global) batch
    keys = torch.cat([all1, all2])  # (2M, D)
    queries = torch.cat([z1, z2])  # (2N, D) local rows
    logits = queries @ keys.T / temperature
    local = torch.arange(n, device=z1.device) + rank * n
    self_idx = torch.cat([local, local + m])
    pos_idx = torch.cat([local + m, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx)


class SimCLR(nn.Module):
    """SimCLR student only (no teacher): ``compute_loss(views)`` with two views."""

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        *,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        use_bn_in_head: bool = False,
        temperature: float = 0.1,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.student = SimCLRModel(backbone, ProjectionHead(embed_dim, hidden_dim, out_dim, use_bn_in_head))
        self.teacher = None
        self.temperature = temperature
        self.gather = gather
        self.n_global = 2

    def compute_loss(
        self, views: Sequence[torch.Tensor], step: int, student: nn.Module | None = None
    ) -> torch.Tensor:
        if len(views) != 2:
            raise ValueError(f"SimCLR takes exactly two views, got {len(views)}")
        student = self.student if student is None else student
        z = student(list(views))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.temperature, gather=self.gather)

    def finish_step(self, momentum: float) -> None:
        """Nothing to update after the optimiser step (no teacher, no centre)."""

    def cancel_last_layer_grad(self) -> None:
        """SimCLR has no frozen prototype layer."""

    def export_backbone(self) -> nn.Module:
        return self.student.backbone
