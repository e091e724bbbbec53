"""Training of slide-level MIL heads: the per-fold loop (the shared optimiser groups — no weight
decay on biases and norms — and warm-up + cosine schedule of :mod:`pipelines.training`, early
stopping on a validation split, class weights or balanced sampling, optional
uncertainty-weighted multi-task loss) and the folds over patients.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

from models.mil import MILOutput, bag_loss, pad_bags

from ..errors import InputError
from ..training import apply_schedules, clip_gradients, lr_schedule, optimizer_for
from .config import MILConfig
from .model import MultiTaskMIL, head_kwargs


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
    opt = optimizer_for(model, cfg.optim)  # no weight decay on biases, norms, the standardisation
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
    bs = cfg.train.batch_size
    steps_per_epoch = math.ceil(len(bags) / bs)
    total = steps_per_epoch * cfg.train.epochs
    warmup = cfg.optim.warmup_steps + steps_per_epoch * cfg.train.warmup_epochs
    lrs = lr_schedule(replace(cfg.optim, warmup_steps=warmup), total)
    best = (math.inf, -1, None)
    history = []
    step = 0
    bar = tqdm(range(cfg.train.epochs), desc=desc, file=sys.stderr, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        run = 0.0
        for idx in _batches(len(bags), bs, rng, sample_w):
            x, m = pad_bags(
                [torch.from_numpy(_subsample(bags[i], cfg.max_instances, rng)).to(device) for i in idx]
            )
            tg = {t: torch.from_numpy(y[idx]).to(device) for t, y in targets.items()}
            apply_schedules(opt, float(lrs[min(step, len(lrs) - 1)]))
            loss = model.loss(model(x, m), tg, cw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), cfg.optim.clip_grad)
            opt.step()
            run += loss.item() * len(idx)
            step += 1
        rec = {"epoch": epoch, "train_loss": run / len(bags)}
        if val_bags:
            vl = _eval_loss(model, val_bags, val_targets, cw, device, bs)
            rec["val_loss"] = vl
            if vl < best[0] - 1e-6:
                best = (vl, epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= cfg.train.patience:
                history.append(rec)
                break
        history.append(rec)
        bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k != "epoch"})
    if best[2] is not None:
        model.load_state_dict(best[2])
        return FitResult(model, best[1], best[0], history)
    return FitResult(model, len(history) - 1, float("nan"), history)


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
            raise InputError(
                "the split column is set for some slides and empty for others; fill it for all or none"
            )
        s = np.asarray(splits)
        tr, va, te = (np.flatnonzero(s == k) for k in ("train", "val", "test"))
        if len(tr) == 0 or len(te) == 0:
            raise InputError("a fixed split needs slides marked 'train' and 'test'")
        if len(va) == 0 and val_fraction > 0:
            tr, va = _carve(tr, y, groups, val_fraction, seed)
        return [(tr, va, te)]
    if n_folds < 2:
        raise InputError(f"cross-validation needs --folds >= 2 (got {n_folds}); or give a split column")
    if len(set(patients)) < n_folds:
        raise InputError(f"{len(set(patients))} patients cannot fill {n_folds} folds; lower --folds")
    counts = np.bincount(y[y >= 0])
    if counts[counts > 0].min() < n_folds:
        raise InputError(
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
