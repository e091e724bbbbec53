"""DINO (Caron et al. 2021): self-distillation with no labels.

- :class:`DINOHead`: 3-layer MLP → bottleneck → L2 normalisation → weight-normalised linear layer
  over K prototypes whose norm (``weight_g``) is frozen to 1 (:class:`NormalizedLinear`, an
  explicit ``v / ||v||`` weight, so no deprecated ``weight_norm`` hook is involved);
- :class:`MultiCropWrapper`: runs the backbone once per run of same-sized crops and the head on all;
- :class:`DINOLoss`: cross-entropy between the sharpened, centred teacher distribution of each
  global view and the student distribution of every *other* view (same-view pairs skipped), with a
  teacher-temperature warm-up and a centre kept as an EMA of teacher outputs, averaged over ranks;
- :class:`DINO`: student, EMA teacher (no gradients) and loss; ``update_teacher(m)`` with the
  momentum from a cosine schedule 0.996 → 1 (computed by the training loop).

The centre is updated once per optimiser step from all micro-batches' teacher outputs, so gradient
accumulation gives the same loss as one big batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class NormalizedLinear(nn.Module):
    """Linear layer without bias whose weight rows are ``v / ||v||`` (weight norm with g = 1).

    With ``learn_scale=True`` the per-output norm ``g`` is a parameter (DINO's
    ``norm_last_layer=False``), initialised to 1."""

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool = False) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return F.linear(x, w)


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (max(1, nlayers) - 1)
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if use_bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, learn_scale=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops; consecutive crops of the same size share one pass."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        feats, start = [], 0
        for end in ends:
            feats.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(feats))


class DINOLoss(nn.Module):
    """DINO cross-view loss with centring and teacher-temperature warm-up (per step)."""

    def __init__(
        self,
        out_dim: int,
        *,
        n_global: int = 2,
        n_local: int = 8,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 0,
        total_steps: int = 1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.n_global, self.n_crops = n_global, n_global + n_local
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps, endpoint=False)
        rest = np.full(max(0, total_steps - len(warm)), teacher_temp)
        self.teacher_temps = np.concatenate([warm, rest])[: max(total_steps, 1)]
        self._pending_sum: torch.Tensor | None = None
        self._pending_n = 0

    def teacher_temp(self, step: int) -> float:
        return float(self.teacher_temps[min(step, len(self.teacher_temps) - 1)])

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, step: int) -> torch.Tensor:
        """``student_out`` (n_crops·B, K), ``teacher_out`` (n_global·B, K) → scalar loss."""
        s_chunks = (student_out / self.student_temp).chunk(self.n_crops)
        t = F.softmax((teacher_out - self.center) / self.teacher_temp(step), dim=-1).detach()
        t_chunks = t.chunk(self.n_global)
        total, n_terms = student_out.new_zeros(()), 0
        for iq, q in enumerate(t_chunks):
            for v, s in enumerate(s_chunks):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s.float(), dim=-1), dim=-1).mean()
                n_terms += 1
        return total / n_terms

    @torch.no_grad()
    def accumulate_center(self, teacher_out: torch.Tensor) -> None:
        s = teacher_out.detach().float().sum(0, keepdim=True)
        self._pending_sum = s if self._pending_sum is None else self._pending_sum + s
        self._pending_n += teacher_out.shape[0]

    @torch.no_grad()
    def update_center(self) -> None:
        """EMA of the mean teacher output over this step's micro-batches and all ranks."""
        if self._pending_sum is None:
            return
        total = self._pending_sum
        n = torch.tensor([float(self._pending_n)], device=total.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(n)
        batch_center = total / n
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
        self._pending_sum, self._pending_n = None, 0


class DINO(nn.Module):
    """Student and EMA teacher (same architecture, separate instances: the teacher may be built
    without drop-path) with their heads, and the loss."""

    def __init__(
        self,
        student_backbone: nn.Module,
        teacher_backbone: nn.Module,
        embed_dim: int,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        n_local: int = 8,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 0,
        total_steps: int = 1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        head = DINOHead(
            embed_dim,
            out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            use_bn=use_bn_in_head,
            norm_last_layer=norm_last_layer,
        )
        self.student = MultiCropWrapper(student_backbone, head)
        self.teacher = MultiCropWrapper(teacher_backbone, copy.deepcopy(head))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.criterion = DINOLoss(
            out_dim,
            n_global=2,
            n_local=n_local,
            student_temp=student_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            warmup_teacher_temp_steps=warmup_teacher_temp_steps,
            total_steps=total_steps,
            center_momentum=center_momentum,
        )
        self.n_global = 2

    def compute_loss(
        self, views: Sequence[torch.Tensor], step: int, student: nn.Module | None = None
    ) -> torch.Tensor:
        """Loss of one micro-batch. ``student`` is the (possibly DDP-wrapped) student module."""
        student = self.student if student is None else student
        with torch.no_grad():
            teacher_out = self.teacher(list(views[: self.n_global]))
        student_out = student(list(views))
        self.criterion.accumulate_center(teacher_out)
        return self.criterion(student_out, teacher_out, step)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        s_params = [p.detach() for p in self.student.parameters()]
        t_params = list(self.teacher.parameters())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
        for tb, sb in zip(self.teacher.buffers(), self.student.buffers()):
            tb.copy_(sb)

    def finish_step(self, momentum: float) -> None:
        """After the optimiser step: centre EMA, then teacher EMA."""
        self.criterion.update_center()
        self.update_teacher(momentum)

    def cancel_last_layer_grad(self) -> None:
        """DINO freezes the prototypes during the first steps: drop their gradient."""
        for p in self.student.head.last_layer.parameters():
            p.grad = None

    def export_backbone(self) -> nn.Module:
        return self.teacher.backbone
