"""The MIL model of a run: one head per task on the same bag (:class:`MultiTaskMIL`), batched
prediction, and the model directory — ``model.json`` (head, input dim, tasks, classes, config,
folds) and ``fold<k>.safetensors`` per fold (never pickled)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.mil import MILOutput, UncertaintyWeighting, bag_loss, create_head, pad_bags
from wsi.atomic import atomic_path, atomic_write_text

from ..config import to_dict
from ..errors import InputError, MissingInputError
from .config import MILConfig, MILHeadConfig


def head_kwargs(h: MILHeadConfig) -> dict:
    kw: dict = {"dropout": h.dropout, "proj_dim": h.proj_dim}
    if h.name == "abmil":
        kw.update(hidden=h.hidden or 128, attn_dim=h.attn_dim)
    else:
        kw["hidden"] = h.hidden
    if h.name == "noisy_and":
        kw.update(a=h.a, learn_slope=h.learn_slope, b_init=h.b_init, prior=h.prior)
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


#: head options a model.json may set (what :func:`head_kwargs` writes)
HEAD_KEYS = frozenset({"dropout", "proj_dim", "hidden", "attn_dim", "a", "learn_slope", "b_init", "prior"})


def _head_kwargs(meta: dict, source: Path) -> dict:
    kw = meta.get("head_kwargs") or {}
    bad = [k for k in kw if k not in HEAD_KEYS] if isinstance(kw, dict) else ["(not a mapping)"]
    if bad or not all(
        v is None or isinstance(v, (int, float)) and (not isinstance(v, bool) or k == "learn_slope")
        for k, v in kw.items()
    ):
        raise InputError(
            f"{source}: head_kwargs {kw!r} hold option(s) {bad or 'with values that are not numbers'} that `mil train` "
            f"never writes ({sorted(HEAD_KEYS)}, numbers); the model directory was edited or is not slidestream's"
        )
    return dict(kw)


def load_model_dir(path: str | Path, folds: list[int] | None = None) -> tuple[dict, list[MultiTaskMIL]]:
    """``(meta, models)`` from a directory written by ``slidestream mil train``; weights are read
    with safetensors (never unpickled)."""
    from safetensors.torch import load_file

    path = Path(path)
    mj = path / "model.json"
    if not mj.is_file():
        raise MissingInputError(
            f"{mj} not found: --model must be a directory written by `slidestream mil train`"
        )
    meta = json.loads(mj.read_text())
    chosen = list(range(meta["n_folds"])) if folds is None else folds
    models = []
    for k in chosen:
        if not 0 <= k < meta["n_folds"]:
            raise InputError(f"fold {k} does not exist in {path} (it has folds 0..{meta['n_folds'] - 1})")
        wp = path / f"fold{k}.safetensors"
        if not wp.is_file():
            raise MissingInputError(f"{wp} missing; retrain or choose another --fold")
        kw = _head_kwargs(meta, mj)
        if meta["head"] == "noisy_and":
            kw.setdefault("learn_slope", False)  # model directories from before the learned slope
        m = MultiTaskMIL(
            meta["head"],
            meta["in_dim"],
            {t: len(meta["classes"][t]) for t in meta["tasks"]},
            kw,
            meta["config"].get("multitask_weighting", "sum"),
        )
        try:
            sd = load_file(str(wp))
        except Exception as e:  # noqa: BLE001 - safetensors' errors (a pickle, a damaged header) are not OSErrors
            raise InputError(
                f"{wp}: not a readable safetensors file ({type(e).__name__}: {e}); model directories hold "
                f"safetensors written by `slidestream mil train` (nothing is unpickled)"
            ) from None
        m.load_state_dict(sd)
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
