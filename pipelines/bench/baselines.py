"""The baselines of ``slidestream bench loader``: the decode bound (every encoded tile the regions
touch, bytes in memory, decoded and resized in threads), the OpenSlide map-style dataset and its
collation, and the pixels a whole-tile reader decodes per delivered pixel."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

TILE = 224


def level_boxes(
    paths: dict[str, str], recs, size: int
) -> list[tuple[str, int, tuple[int, int, int, int], int, int]]:
    """(slide path, level, level box, x0, y0) for each record, as ``read_region_mpp`` chooses them."""
    from wsi.slide import open_slide

    out = []
    slides = {sid: open_slide(p) for sid, p in paths.items()}
    try:
        for sid, x, y, m in recs:
            level, box = slides[sid].region_for_mpp((x, y), (size, size), m)
            out.append((paths[sid], level, box, x, y))
    finally:
        for s in slides.values():
            s.close()
    return out


def decode_bound(paths: dict[str, str], recs, size: int, threads: int, *, scaled: bool = False) -> dict:
    """Tiles/s, CPU ms/tile and decoded pixels per delivered pixel of decoding every encoded tile
    each region touches (bytes preloaded in memory), cropping and resizing, in ``threads`` threads.
    ``scaled``: regions whose level box is an exact 2/4/8 multiple of the output, on that factor's
    grid, decode their tiles at the output scale (libjpeg-turbo's scaled IDCT), as the loader's
    scaled decode does; the rest in full."""
    import imagecodecs

    from wsi.backends.tiff import TiffBackend
    from wsi.decode import SCALES, decode_jpeg_scaled
    from wsi.slide import resize_rgb

    boxes = level_boxes(paths, recs, size)
    backends = {p: TiffBackend(p) for p in set(paths.values())}
    blobs: dict[tuple, bytes] = {}
    work = []
    decoded = 0
    for path, level, (lx, ly, lw, lh), _x, _y in boxes:
        be = backends[path]
        tw, th = be.level_tile_sizes[level]
        f = lw // size
        f = f if scaled and f in SCALES and lw == f * size and lx % f == 0 and ly % f == 0 else 1
        tiles = []
        for ty in range(ly // th, (ly + lh - 1) // th + 1):
            for tx in range(lx // tw, (lx + lw - 1) // tw + 1):
                key = (path, level, tx, ty, f)
                if key not in blobs:
                    blobs[key] = be.raw_jpeg_tile(level, tx, ty) if f > 1 else be.raw_tile(level, tx, ty)
                tiles.append((tx, ty, blobs[key]))
                decoded += tw * th // (f * f)
        work.append((be.jpeg_params(level), f, tw, th, lx, ly, lw, lh, tiles))
    for be in backends.values():
        be.close()

    def run(share):
        for kw, f, tw, th, lx, ly, lw, lh, tiles in share:
            tx0, ty0 = tiles[0][0], tiles[0][1]
            ntx = tiles[-1][0] - tx0 + 1
            nty = tiles[-1][1] - ty0 + 1
            sw, sh = tw // f, th // f
            canvas = np.empty((nty * sh, ntx * sw, 3), np.uint8)
            for tx, ty, b in tiles:
                t = imagecodecs.jpeg8_decode(b, **kw) if f == 1 else decode_jpeg_scaled(b, f, (th, tw))
                canvas[(ty - ty0) * sh : (ty - ty0 + 1) * sh, (tx - tx0) * sw : (tx - tx0 + 1) * sw] = t
            ox, oy = (lx - tx0 * tw) // f, (ly - ty0 * th) // f
            resize_rgb(np.ascontiguousarray(canvas[oy : oy + lh // f, ox : ox + lw // f]), (size, size))

    nb = threads * 4
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(run, [work[: min(len(work), 64)]]))  # warm-up
        t, c = time.perf_counter(), time.process_time()
        list(ex.map(run, [work[i::nb] for i in range(nb)]))
        dt, dc = time.perf_counter() - t, time.process_time() - c
    return {
        "tiles": len(work),
        "tiles_per_s": len(work) / dt,
        "cpu_ms_per_tile": 1e3 * dc / len(work),
        "decoded_per_delivered": decoded / (len(work) * size * size),
    }


class OpenSlideTiles:
    """Map-style dataset: one OpenSlide ``read_region`` per tile, resized (the CLAM/eva way) with
    the same function as the slidestream loader."""

    def __init__(self, items: list[tuple[str, int, tuple[int, int, int, int], int, int]], size: int):
        self.items = items
        self.size = size
        self._osr: dict = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        import openslide
        import torch

        from wsi.slide import resize_rgb  # the loader's own resize: like for like

        path, level, (_lx, _ly, lw, lh), x, y = self.items[i]
        osr = self._osr.get(path)
        if osr is None:
            osr = self._osr[path] = openslide.OpenSlide(path)
        img = np.asarray(osr.read_region((x, y), level, (lw, lh)).convert("RGB"))
        img = resize_rgb(img, (self.size, self.size))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "slide_id": path,
        }


def np_collate(items: list[dict]) -> dict:
    """Stack with numpy (as :func:`wsi.loader.collate_tiles` does): torch.stack would wake torch's
    intra-op threads, which spin and take CPU from readers on a small machine; the baseline should
    lose on reading, not on collation."""
    import torch

    return {
        "image": torch.from_numpy(np.stack([it["image"].numpy() for it in items])),
        "slide_id": [it["slide_id"] for it in items],
    }


def touched_per_delivered(paths: dict[str, str], recs) -> float:
    """Pixels of the encoded tiles the records' level boxes touch per delivered pixel (what a reader
    that decodes whole tiles, as OpenSlide does, decodes at least once)."""
    from wsi.slide import open_slide

    boxes = level_boxes(paths, recs, TILE)
    sizes = {}
    px = 0
    for path, level, (lx, ly, lw, lh), _x, _y in boxes:
        if path not in sizes:
            with open_slide(path) as s:
                sizes[path] = s.level_tile_sizes
        tw, th = sizes[path][level]
        px += ((lx + lw - 1) // tw - lx // tw + 1) * ((ly + lh - 1) // th - ly // th + 1) * tw * th
    return px / (len(boxes) * TILE * TILE) if boxes else 0.0
