"""Training of slide-level MIL heads: the typed config, the per-fold training loop (AdamW,
warm-up + cosine, early stopping on a validation split, class weights or balanced sampling,
optional uncertainty-weighted multi-task loss) and cross-validation over patients.

A trained model directory holds ``model.json`` (head, input dim, tasks, classes, config, folds)
and ``fold<k>.safetensors`` per fold; :func:`load_model_dir` rebuilds the fold models.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from models.mil import MILOutput, UncertaintyWeighting, bag_loss, create_head, pad_bags
from pipelines.config import to_dict
from pipelines.schedules import warmup_cosine
from wsi.atomic import atomic_path, atomic_write_text


@dataclass(kw_only=True)
class HeadConfig:
    name: Literal["abmil", "noisy_and", "mean", "max"] = "abmil"
    hidden: int | None = 128  # ABMIL attention width / instance-classifier hidden layer (None: linear)
    attn_dim: int | None = None  # ABMIL only; defaults to hidden
    proj_dim: int | None = None  # optional Linear+ReLU input projection
    dropout: float = 0.0
    a: float = 10.0  # noisy-AND slope


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    epochs: int = 40
    warmup_epochs: int = 2
    batch_size: int = 8
    patience: int = 10  # early stopping: epochs without a better validation loss


@dataclass(kw_only=True)
class MILConfig:
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    label_columns: list[str] = field(default_factory=lambda: ["label"])
    classes: dict = field(default_factory=dict)  # task -> fixed class names (optional)
    folds: int = 5
    val_fraction: float = 0.2  # validation split carved from each training fold
    balance: Literal["weights", "sampler", "none"] = "weights"
    multitask_weighting: Literal["uncertainty", "sum"] = "uncertainty"
    max_instances: int | None = 4096  # random subsample of larger bags while training
    standardize: bool = True  # z-score features with the training instances' mean/sd (kept in the model)
    bootstrap: int = 1000  # bootstrap resamples for the 95% intervals
    on_missing: Literal["skip", "error"] = "skip"
    seed: int = 0
    device: str = "cpu"


def head_kwargs(h: HeadConfig) -> dict:
    kw: dict = {"dropout": h.dropout, "proj_dim": h.proj_dim}
    if h.name == "abmil":
        kw.update(hidden=h.hidden or 128, attn_dim=h.attn_dim)
    else:
        kw["hidden"] = h.hidden
    if h.name == "noisy_and":
        kw["a"] = h.a
    return kw


class MultiTaskMIL(nn.Module):
    """One head per task on the same bag; ``forward`` returns ``{task: MILOutput}``.

    Features are standardised first with the buffers ``feat_mean``/``feat_std`` (identity until
    :func:`fit` sets them from the training instances; saved with the weights)."""

    def __init__(self, head: str, in_dim: int, n_classes: dict[str, int], kw: dict, weighting: str = "sum"):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.tasks = list(n_classes)
        self.heads = nn.ModuleDict({t: create_head(head, in_dim, c, **kw) for t, c in n_classes.items()})
        self.weighting = (
            UncertaintyWeighting(len(self.tasks))
            if (weighting == "uncertainty" and len(self.tasks) > 1)
            else None
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, MILOutput]:
        x = (x - self.feat_mean) / self.feat_std
        return {t: h(x, mask) for t, h in self.heads.items()}

    def loss(
        self,
        outs: dict[str, MILOutput],
        targets: dict[str, torch.Tensor],
        class_weights: dict[str, torch.Tensor | None],
    ) -> torch.Tensor:
        losses = []
        for t in self.tasks:
            y = targets[t]
            keep = y >= 0
            if not bool(keep.any()):
                losses.append(outs[t].probs.sum() * 0.0)
                continue
            o = outs[t]
            sub = MILOutput(o.logits[keep], o.probs[keep], o.instance_scores[keep], None, o.multilabel)
            losses.append(bag_loss(sub, y[keep], class_weights.get(t)))
        if self.weighting is not None:
            return self.weighting(losses)
        return torch.stack(losses).sum()


def _class_weights(y: np.ndarray, n: int) -> np.ndarray:
    y = y[y >= 0]
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n * np.maximum(counts, 1)), 0.0)
    return w


@dataclass
class FitResult:
    model: MultiTaskMIL
    best_epoch: int
    best_val_loss: float
    history: list[dict]


def _batches(n: int, bs: int, rng: np.random.Generator, weights: np.ndarray | None) -> list[np.ndarray]:
    if weights is not None:
        idx = rng.choice(n, size=n, replace=True, p=weights / weights.sum())
    else:
        idx = rng.permutation(n)
    return [idx[i : i + bs] for i in range(0, n, bs)]


def _subsample(b: np.ndarray, k: int | None, rng: np.random.Generator) -> np.ndarray:
    if k is None or len(b) <= k:
        return b
    return b[np.sort(rng.choice(len(b), k, replace=False))]


@torch.no_grad()
def predict_bags(
    model: nn.Module, bags: list[np.ndarray], device: str = "cpu", batch_size: int = 16
) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Slide probabilities ``{task: (n, C)}`` and instance scores ``{task: [ (N_i,) ]}``."""
    model.eval()
    probs: dict[str, list] = {}
    inst: dict[str, list] = {}
    for i in range(0, len(bags), batch_size):
        chunk = [
            torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).to(device)
            for b in bags[i : i + batch_size]
        ]
        x, m = pad_bags(chunk)
        outs = model(x, m)
        for t, o in outs.items():
            probs.setdefault(t, []).append(o.probs.cpu().numpy())
            for j, b in enumerate(chunk):
                inst.setdefault(t, []).append(o.instance_scores[j, : b.shape[0]].cpu().numpy())
    return {t: np.concatenate(v) for t, v in probs.items()}, inst


def _eval_loss(model: MultiTaskMIL, bags, targets, cw, device, bs) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(bags), bs):
            x, m = pad_bags([torch.from_numpy(b).to(device) for b in bags[i : i + bs]])
            tg = {t: torch.from_numpy(y[i : i + bs]).to(device) for t, y in targets.items()}
            outs = model(x, m)
            k = len(x)
            # plain (unweighted) sum of task losses: comparable across epochs
            loss = sum(_masked(outs[t], tg[t], cw.get(t)) for t in model.tasks)
            total += float(loss) * k
            n += k
    return total / max(n, 1)


def _masked(o: MILOutput, y: torch.Tensor, w) -> torch.Tensor:
    keep = y >= 0
    if not bool(keep.any()):
        return torch.zeros(())
    return bag_loss(
        MILOutput(o.logits[keep], o.probs[keep], o.instance_scores[keep], None, o.multilabel), y[keep], w
    )


def fit(
    cfg: MILConfig,
    bags: list[np.ndarray],
    targets: dict[str, np.ndarray],
    n_classes: dict[str, int],
    val_bags: list[np.ndarray] | None = None,
    val_targets: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train one model; early stopping on the validation loss when a validation set is given
    (the weights of the best epoch are returned), otherwise the last epoch."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = cfg.device
    in_dim = bags[0].shape[1]
    model = MultiTaskMIL(cfg.head.name, in_dim, n_classes, head_kwargs(cfg.head), cfg.multitask_weighting).to(
        device
    )
    if cfg.standardize:
        allx = np.concatenate(bags).astype(np.float64)
        model.feat_mean.copy_(torch.from_numpy(allx.mean(0)).float())
        sd = allx.std(0)
        model.feat_std.copy_(
            torch.from_numpy(np.where(sd > 1e-6, sd, 1.0)).float()
        )  # constant features: unscaled
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    primary = next(iter(n_classes))
    cw_np = {t: _class_weights(y, n_classes[t]) for t, y in targets.items()}
    cw = (
        {t: torch.tensor(w, dtype=torch.float32, device=device) for t, w in cw_np.items()}
        if cfg.balance == "weights"
        else {}
    )
    sample_w = None
    if cfg.balance == "sampler":
        y = targets[primary]
        sample_w = np.where(y >= 0, cw_np[primary][np.maximum(y, 0)], 0.0)
    bs = cfg.optim.batch_size
    steps_per_epoch = math.ceil(len(bags) / bs)
    total = steps_per_epoch * cfg.optim.epochs
    lrs = warmup_cosine(cfg.optim.lr, cfg.optim.min_lr, total, steps_per_epoch * cfg.optim.warmup_epochs)
    best = (math.inf, -1, None)
    history = []
    step = 0
    bar = tqdm(range(cfg.optim.epochs), desc=desc, file=sys.stderr, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        run = 0.0
        for idx in _batches(len(bags), bs, rng, sample_w):
            x, m = pad_bags(
                [torch.from_numpy(_subsample(bags[i], cfg.max_instances, rng)).to(device) for i in idx]
            )
            tg = {t: torch.from_numpy(y[idx]).to(device) for t, y in targets.items()}
            for g in opt.param_groups:
                g["lr"] = float(lrs[min(step, len(lrs) - 1)])
            loss = model.loss(model(x, m), tg, cw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += loss.item() * len(idx)
            step += 1
        rec = {"epoch": epoch, "train_loss": run / len(bags)}
        if val_bags:
            vl = _eval_loss(model, val_bags, val_targets, cw, device, bs)
            rec["val_loss"] = vl
            if vl < best[0] - 1e-6:
                best = (vl, epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= cfg.optim.patience:
                history.append(rec)
                break
        history.append(rec)
        bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k != "epoch"})
    if best[2] is not None:
        model.load_state_dict(best[2])
        return FitResult(model, best[1], best[0], history)
    return FitResult(model, len(history) - 1, float("nan"), history)


# --- splits -------------------------------------------------------------------------------------


def _sgkf(y: np.ndarray, groups: list[str], n_splits: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
        np.zeros(len(y)), y, groups
    )


def make_folds(
    y: np.ndarray, patients: list[str], splits: list[str | None], n_folds: int, val_fraction: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``[(train, val, test)]`` index arrays. With a ``split`` column (all rows set): one fold
    from it (a validation set is carved from train when no row says ``val``). Otherwise
    stratified group k-fold over patients; the validation set is carved from each training fold
    the same way, so no patient is in two of train/val/test."""
    len(y)
    groups = np.asarray(patients)
    if any(s is not None for s in splits):
        if any(s is None for s in splits):
            raise ValueError(
                "the split column is set for some slides and empty for others; fill it for all or none"
            )
        s = np.asarray(splits)
        tr, va, te = (np.flatnonzero(s == k) for k in ("train", "val", "test"))
        if len(tr) == 0 or len(te) == 0:
            raise ValueError("a fixed split needs slides marked 'train' and 'test'")
        if len(va) == 0 and val_fraction > 0:
            tr, va = _carve(tr, y, groups, val_fraction, seed)
        return [(tr, va, te)]
    if n_folds < 2:
        raise ValueError(f"cross-validation needs --folds >= 2 (got {n_folds}); or give a split column")
    if len(set(patients)) < n_folds:
        raise ValueError(f"{len(set(patients))} patients cannot fill {n_folds} folds; lower --folds")
    counts = np.bincount(y[y >= 0])
    if counts[counts > 0].min() < n_folds:
        raise ValueError(
            f"the rarest class has {int(counts[counts > 0].min())} slides, fewer than the {n_folds} "
            f"folds; lower --folds or add slides"
        )
    out = []
    for tr, te in _sgkf(y, list(groups), n_folds, seed):
        va = np.array([], dtype=np.int64)
        if val_fraction > 0:
            tr, va = _carve(tr, y, groups, val_fraction, seed)
        out.append((tr, va, te))
    return out


def _carve(tr: np.ndarray, y: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int):
    """Split a validation part of about ``val_fraction`` off ``tr`` (stratified, by patient); with
    too few slides per class the fraction grows (at most 1/2) or no validation set is made."""
    smallest = np.bincount(y[tr]).astype(float)
    smallest = int(smallest[smallest > 0].min())
    k = min(max(2, round(1 / val_fraction)), smallest)
    if k < 2 or len(set(groups[tr])) < k:
        return tr, np.array([], dtype=np.int64)
    sub_tr, sub_va = next(_sgkf(y[tr], list(groups[tr]), k, seed + 1))
    return tr[sub_tr], tr[sub_va]


# --- model directory ----------------------------------------------------------------------------


def save_model_dir(
    out: Path,
    cfg: MILConfig,
    in_dim: int,
    tasks: list[str],
    classes: dict[str, list[str]],
    models: list[nn.Module],
    fold_info: list[dict],
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for k, m in enumerate(models):
        sd = {n: t.detach().cpu().contiguous() for n, t in m.state_dict().items()}
        with atomic_path(out / f"fold{k}.safetensors") as tmp:
            save_file(sd, str(tmp), metadata={"fold": str(k), "head": cfg.head.name})
    meta = {
        "format": "slidestream-mil/1",
        "head": cfg.head.name,
        "head_kwargs": head_kwargs(cfg.head),
        "in_dim": int(in_dim),
        "tasks": tasks,
        "classes": classes,
        "n_folds": len(models),
        "folds": fold_info,
        "config": to_dict(cfg),
    }
    atomic_write_text(out / "model.json", json.dumps(meta, indent=2, default=str))


def load_model_dir(path: str | Path, folds: list[int] | None = None) -> tuple[dict, list[MultiTaskMIL]]:
    """``(meta, models)`` from a directory written by ``slidestream mil train``; weights are read
    with safetensors (never unpickled)."""
    from safetensors.torch import load_file

    path = Path(path)
    mj = path / "model.json"
    if not mj.is_file():
        raise FileNotFoundError(
            f"{mj} not found: --model must be a directory written by `slidestream mil train`"
        )
    meta = json.loads(mj.read_text())
    chosen = list(range(meta["n_folds"])) if folds is None else folds
    models = []
    for k in chosen:
        if not 0 <= k < meta["n_folds"]:
            raise ValueError(f"fold {k} does not exist in {path} (it has folds 0..{meta['n_folds'] - 1})")
        wp = path / f"fold{k}.safetensors"
        if not wp.is_file():
            raise FileNotFoundError(f"{wp} missing; retrain or choose another --fold")
        m = MultiTaskMIL(
            meta["head"],
            meta["in_dim"],
            {t: len(meta["classes"][t]) for t in meta["tasks"]},
            meta["head_kwargs"],
            meta["config"].get("multitask_weighting", "sum"),
        )
        m.load_state_dict(load_file(str(wp)))
        m.eval()
        models.append(m)
    return meta, models


def ensemble_predict(models: list[MultiTaskMIL], bags: list[np.ndarray]):
    """Mean over fold models of slide probabilities and instance scores."""
    probs_sum: dict[str, np.ndarray] = {}
    inst_sum: dict[str, list[np.ndarray]] = {}
    for m in models:
        p, s = predict_bags(m, bags)
        for t in p:
            probs_sum[t] = probs_sum.get(t, 0) + p[t]
            inst_sum[t] = [a + b for a, b in zip(inst_sum[t], s[t])] if t in inst_sum else s[t]
    k = len(models)
    return {t: v / k for t, v in probs_sum.items()}, {t: [a / k for a in v] for t, v in inst_sum.items()}
