"""``slidestream tissue train``: the reproducible recipe for the tissue U-Net weights, and
fine-tuning on user pairs.

Without ``--pairs`` it trains on composited thumbnails with exact labels
(:mod:`wsi.tissue.synth`, real tissue from the demo slide and the real test-data slides): a pool
of composites is generated once from ``--seed``, then each step takes random crops with flips and
90° rotations, BCE + Dice loss, AdamW over the shared optimiser groups (no weight decay on biases
and norms) with the shared warm-up + cosine schedule (:mod:`pipelines.training`; the warm-up is
at most a tenth of the run). With ``--pairs DIR`` it
fine-tunes on user pairs (thumbnail + mask images, e.g. exported from QuPath), optionally mixed with
composites (``--synthetic-fraction``); ``--init`` starts from existing weights (default for
fine-tuning: the shipped ones). Weights are written as safetensors (never pickle) with their
architecture in the header, and a ``.json`` recipe (command, arguments, sources, metrics) beside.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import MissingInputError
from .config import SHIPPED, TissueTrainConfig


def command_line(cfg: TissueTrainConfig) -> str:
    """The ``slidestream tissue train`` command line that reproduces ``cfg``: ``--out`` plus a
    ``KEY=VALUE`` for every setting that differs from the defaults."""
    from ..config import to_dict

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    mine, default = flat(to_dict(cfg)), flat(to_dict(TissueTrainConfig()))
    parts = ["slidestream", "tissue", "train", "--out", str(cfg.out)]
    for k, v in mine.items():
        if k not in ("out", "progress") and v != default.get(k):
            parts.append(f"{k}={json.dumps(v) if isinstance(v, (list, type(None))) else v}")
    return shlex.join(parts)


# --- data ------------------------------------------------------------------------------------
def load_pairs(directory: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """User pairs from ``directory``: files ``<id>_thumb.png`` + ``<id>_mask.png``, or
    sub-directories (or the directory itself) holding ``thumb.png`` + ``mask.png``. The mask is
    resized (nearest) to the thumbnail when sizes differ; non-zero = tissue."""
    from PIL import Image

    directory = Path(directory)
    if not directory.is_dir():
        raise MissingInputError(f"--pairs {directory} is not a directory of thumbnail/mask pairs")
    found: list[tuple[Path, Path]] = []
    for d in [directory, *sorted(p for p in directory.iterdir() if p.is_dir())]:
        if (d / "thumb.png").exists() and (d / "mask.png").exists():
            found.append((d / "thumb.png", d / "mask.png"))
    for t in sorted(directory.glob("*_thumb.png")):
        m = t.with_name(t.name[: -len("_thumb.png")] + "_mask.png")
        if not m.exists():
            raise MissingInputError(f"{t} has no mask {m.name} beside it")
        found.append((t, m))
    if not found:
        raise MissingInputError(
            f"no pairs in {directory}: expected <id>_thumb.png + <id>_mask.png or */thumb.png + */mask.png"
        )
    out = []
    for t, m in found:
        rgb = np.asarray(Image.open(t).convert("RGB"))
        mask = Image.open(m).convert("L")
        if mask.size != (rgb.shape[1], rgb.shape[0]):
            mask = mask.resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.NEAREST)
        out.append((rgb, np.asarray(mask) > 0))
    return out


def _crop(
    rng: np.random.Generator, rgb: np.ndarray, mask: np.ndarray, crop: int
) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    if h < crop or w < crop:
        ph, pw = max(0, crop - h), max(0, crop - w)
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        mask = np.pad(mask, ((0, ph), (0, pw)), mode="reflect")
        h, w = mask.shape
    y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    r, m = rgb[y : y + crop, x : x + crop], mask[y : y + crop, x : x + crop]
    k = int(rng.integers(4))
    r, m = np.rot90(r, k), np.rot90(m, k)
    if rng.random() < 0.5:
        r, m = r[:, ::-1], m[:, ::-1]
    return np.ascontiguousarray(r), np.ascontiguousarray(m)


def _batch(rng, synth, user, frac, batch, crop):
    import torch

    xs, ys = [], []
    for _ in range(batch):
        use_synth = not user or (synth and rng.random() < frac)
        src = synth if use_synth else user
        rgb, mask = src[int(rng.integers(len(src)))][:2]
        r, m = _crop(rng, rgb, mask, crop)
        xs.append(r)
        ys.append(m)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float()
    # light photometric jitter on top of the generator's: per-image channel gains and brightness
    g = torch.from_numpy(rng.uniform(0.92, 1.08, (batch, 3, 1, 1)).astype(np.float32))
    b = torch.from_numpy(rng.uniform(-10, 10, (batch, 1, 1, 1)).astype(np.float32))
    x = (x * g + b).clamp(0, 255)
    y = torch.from_numpy(np.stack(ys)).float()[:, None]
    return x, y


# --- training --------------------------------------------------------------------------------
def train(cfg: TissueTrainConfig, *, command: str | None = None) -> dict:
    """Train (or fine-tune) the tissue U-Net and write ``cfg.out`` (+ ``cfg.out`` with suffix
    .json). Returns the recipe dict written to the JSON."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from models.seg import tissue_net
    from wsi.tissue import synth as tissue_synth

    from ..errors import ConfigError
    from ..training import apply_schedules, lr_schedule, optimizer_for, seed_everything

    steps, seed, batch, crop, lr = cfg.steps, cfg.seed, cfg.batch_size, cfg.crop, cfg.optim.lr
    pairs, init, threads, progress = cfg.pairs, cfg.init, cfg.threads, cfg.progress
    t_start = time.time()
    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: weights are written as .safetensors")
    torch.set_num_threads(max(1, threads))
    seed_everything(seed)
    rng = np.random.default_rng(seed)

    user = load_pairs(pairs) if pairs is not None else []
    frac = cfg.synthetic_fraction if cfg.synthetic_fraction is not None else (0.25 if user else 1.0)
    if init is None and user and SHIPPED.exists() and out.resolve() != SHIPPED.resolve():
        init = SHIPPED
    sources = tissue_synth.load_sources(tissue_synth.default_source_paths(cfg.extra_slides))
    n_synth = cfg.pool if frac > 0 else 0
    synth = []
    for i in tqdm(range(n_synth), desc="composites", disable=not progress, file=sys.stderr):
        rgb, mask, _ = tissue_synth.make_pair(sources, seed, i, size=(cfg.pool_size,) * 2, split="train")
        synth.append((rgb, mask))

    if init is not None:
        state, meta = tissue_net.read_weights(init)
        model = tissue_net.build(meta.get("config") if isinstance(meta.get("config"), dict) else None)
        model.load_state_dict(state, strict=True)
    else:
        model = tissue_net.build({"width": cfg.width, "depth": cfg.depth, "input_scale": cfg.input_scale})
    model.train()
    opt = optimizer_for(model, cfg.optim)
    warmup = min(cfg.optim.warmup_steps, steps // 10)  # at most a tenth of the run
    sched = lr_schedule(replace(cfg.optim, warmup_steps=warmup), steps)
    losses = []
    bar = tqdm(range(steps), desc="tissue train", disable=not progress, file=sys.stderr)
    for step in bar:
        apply_schedules(opt, float(sched[step]))
        x, y = _batch(rng, synth, user, frac, batch, crop)
        logits = model(tissue_net.to_input(x))
        bce = F.binary_cross_entropy_with_logits(logits, y)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        loss = bce + dice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    model.eval()
    heldout = evaluate(model, sources, n=cfg.eval_n) if cfg.eval_n > 0 else None
    seconds = time.time() - t_start
    recipe = {
        "command": command if command is not None else command_line(cfg),
        "out": str(out),
        "steps": steps,
        "seed": seed,
        "batch": batch,
        "crop": crop,
        "pool": n_synth,
        "pool_size": cfg.pool_size,
        "lr": lr,
        "loss": "BCE + soft Dice",
        "optimizer": (
            f"{cfg.optim.name}(weight_decay={cfg.optim.weight_decay:g}, none on biases and norms), "
            f"warm-up {warmup} steps + cosine to {cfg.optim.min_lr:g}"
        ),
        "config": model.config,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "init": str(init) if init is not None else None,
        "user_pairs": len(user),
        "synthetic_fraction": frac,
        "sources": [s.name for s in sources],
        "threads": threads,
        "seconds": round(seconds, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
        "heldout": heldout,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    tissue_net.save(
        model, out, metadata={"recipe": {k: recipe[k] for k in ("command", "steps", "seed", "sources")}}
    )
    from wsi.atomic import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(recipe, indent=2) + "\n")
    return recipe


def evaluate(model, sources, *, n: int = 16, seed: int = 1000, size: tuple[int, int] = (384, 384)) -> dict:
    """Mean IoU of ``model`` (threshold 0.5) and of Otsu on ``n`` held-out composites."""
    from models.seg import tissue_net
    from wsi.tissue import otsu_mask
    from wsi.tissue import synth as tissue_synth

    ious_u, ious_o = [], []
    for rgb, label, _ in tissue_synth.make_set(sources, seed, n, size=size, split="heldout", pen_every=2):
        pred = tissue_net.predict_proba(rgb, model=model) > 0.5
        ious_u.append(iou(pred, label))
        ious_o.append(iou(otsu_mask(rgb), label))
    return {
        "n": n,
        "seed": seed,
        "unet_iou": round(float(np.mean(ious_u)), 4),
        "otsu_iou": round(float(np.mean(ious_o)), 4),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
