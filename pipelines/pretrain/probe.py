"""RankMe on a fixed probe set: how far pretraining is from collapse, measured while it runs.

RankMe (Garrido et al. 2023) is ``exp(H(p))`` with ``p = σ / ||σ||₁ + ε`` over the singular values
σ of an (N, D) embedding matrix: the effective rank, between 1 (collapse) and min(N, D). The probe
set is drawn once (own seed) with the same loader settings as training; its tiles are embedded by
the backbone that will be exported (DINO teacher, SimCLR student), preprocessed the way the
exported encoder's users preprocess (:func:`models.encoders.preprocess`).
"""

from __future__ import annotations

import torch

from .config import PretrainConfig
from .data import make_dataset


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of an (N, D) embedding matrix (1 = collapsed)."""
    s = torch.linalg.svdvals(embeddings.detach().double())
    p = s / s.sum().clamp(min=eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def build_probe(cfg: PretrainConfig) -> torch.Tensor | None:
    """A fixed set of ``cfg.data.probe_tiles`` tiles (own seed, read in this process) for RankMe."""
    n = cfg.data.probe_tiles
    if n <= 0:
        return None
    from wsi.loader import make_loader

    ds = make_dataset(cfg, seed=cfg.data.seed + 7919, samples_per_epoch=n, rank=0, world_size=1)
    loader = make_loader(ds, batch_size=n, num_workers=0)
    batches = [b["image"] for b in loader]
    return torch.cat(batches) if batches else None


def probe_views(images: torch.Tensor, size: int) -> torch.Tensor:
    """Probe tiles resized to the global crop size and normalised (no random augmentation)."""
    from models.augment import normalize, to_float

    x = to_float(images)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return normalize(x)


@torch.no_grad()
def probe_rankme(method, probe: torch.Tensor, size: int, device: torch.device) -> float:
    """RankMe of the exported backbone's embeddings of the probe tiles."""
    backbone = method.export_backbone()
    was_training = backbone.training
    backbone.eval()
    feats = torch.cat([backbone(probe_views(chunk.to(device), size)).float() for chunk in probe.split(64)])
    backbone.train(was_training)
    return rankme(feats)
