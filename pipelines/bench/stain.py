"""``slidestream bench stain``: stain-normalisation throughput, slidestream's batched transforms
against the library baseline (torchstain's torch backend, one image per call), in the same run.

Tiles are real H&E read from the shipped demo slide (``wsi/data/CMU-1-Small-Region.svs``,
tissue-filled 224×224 tiles), the target is fitted once on another tile, and each method normalises
the same ``--tiles`` tiles: slidestream in batches of ``--batch-size``, torchstain image by image
(it has no batch API). Reported per method: images/s of each and the ratio. ``--device cuda`` runs
both on the GPU. ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import numpy as np
import torch

from wsi.data import DEMO_SLIDE

DEMO = DEMO_SLIDE  # the shipped CC0 slide (package data: found from an installed package too)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiles", type=int, default=64, help="tiles normalised per method (default 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="slidestream batch size (default 32)")
    parser.add_argument("--size", type=int, default=224, help="tile side in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is kept (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def demo_tiles(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) uint8 tissue tiles from the demo slide and one target tile."""
    import wsi

    with wsi.open_slide(DEMO) as slide:
        w, h = slide.dimensions
        thumb = slide.get_thumbnail((w // 16, h // 16))
        tissue = thumb.mean(axis=2) < 200
        rng = np.random.default_rng(0)
        tiles: list[np.ndarray] = []
        tries = 0
        while len(tiles) < n + 1:
            tries += 1
            if tries > 100 * (n + 1):
                raise RuntimeError(f"{DEMO}: too little tissue for {n} tiles of {size} px")
            x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
            if tissue[(y + size // 2) // 16, (x + size // 2) // 16]:
                tiles.append(slide.read_region((x, y), 0, (size, size)))
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()
    return batch[1:], batch[0]


def _best(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def run(
    *, tiles: int = 64, batch_size: int = 32, size: int = 224, repeats: int = 3, device: str = "cpu"
) -> dict:
    """Images/s per method for slidestream and torchstain on the same tiles and device."""
    import torchstain

    from models.stain import Macenko, Reinhard

    batch, target = demo_tiles(tiles, size)
    batch, target = batch.to(device), target.to(device)
    ours = {"macenko": Macenko().to(device).fit(target), "reinhard": Reinhard().to(device).fit(target)}
    ref_m = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ref_m.fit(target)
    ref_m.HERef, ref_m.maxCRef = ref_m.HERef.to(device), ref_m.maxCRef.to(device)
    ref_r = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    ref_r.fit(target.cpu())
    refs = {
        "macenko": lambda img: ref_m.normalize(img, stains=False),
        "reinhard": lambda img: ref_r.normalize(img.cpu()),
    }
    rows = []
    with torch.no_grad():
        for method, norm in ours.items():
            norm(batch[:2])  # warm-up
            t_ours = _best(
                lambda norm=norm: [norm(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)],
                repeats,
                device,
            )
            ref = refs[method]
            ref(batch[0])
            t_ref = _best(lambda ref=ref: [ref(img) for img in batch], repeats, device)
            rows.append(
                {
                    "method": method,
                    "slidestream_images_per_s": len(batch) / t_ours,
                    "torchstain_images_per_s": len(batch) / t_ref,
                    "x_torchstain": t_ref / t_ours,
                }
            )
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "tiles": len(batch),
        "tile_size": size,
        "batch_size": batch_size,
        "baseline": f"torchstain {version('torchstain')} torch backend, one image per call",
        "rows": rows,
    }


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    result = run(
        tiles=args.tiles, batch_size=args.batch_size, size=args.size, repeats=args.repeats, device=args.device
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"stain normalisation, {result['tiles']} tiles of {result['tile_size']} px on {result['device']} "
        f"({result['torch_threads']} threads); baseline: {result['baseline']}"
    )
    print(f"{'method':<10} {'slidestream img/s':>18} {'torchstain img/s':>17} {'x torchstain':>13}")
    for r in result["rows"]:
        print(
            f"{r['method']:<10} {r['slidestream_images_per_s']:>18.1f} {r['torchstain_images_per_s']:>17.1f} "
            f"{r['x_torchstain']:>13.2f}"
        )
    return 0
